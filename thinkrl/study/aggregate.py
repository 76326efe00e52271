"""Reading finished runs and evaluations, aggregating them across seeds, writing a study folder.

A *result* is one folder: a run folder (``summary.json``: ``initial_eval``/``final_eval``, plus ``config.yaml`` and
``metrics.jsonl``) or a ``thinkrl eval`` folder (``results.json``: one value per ``<mode>/<metric>``, plus
``settings.json``). Results of one *point* (one recipe, several seeds) are aggregated per metric with
``study_stats.describe`` (mean, sample sd, Student-t interval over seeds), and the training curves of a point's
runs (reward, held-out NLL gain of thoughts over the null thought, null rate, copy rate) become mean ± sd bands.
The copy gauge (``rl.copy_gauge``) needs nothing of its own here: ``copy_rate``, ``copy_rate_target`` and
``reward_copy_share`` are metrics of the runs' held-out evaluations and of the evaluation folders like any other, so
each point reports them (mean ± sd over seeds) wherever its results have them.

``write_study`` writes ``study.json`` (everything, per-seed values included), ``study.md`` (tables) and
``plots/<curve>.png``. The maths is in ``study.stats``; this module only reads and writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkrl.errors import ConfigError
from thinkrl.run.recipe import flatten, may_change, recorded_recipe
from thinkrl.run.state import CHECKPOINT_PREFIX
from thinkrl.study import stats as study_stats

# name → (metrics.jsonl key, or (a, b) for a − b; axis label)
CURVES: dict[str, tuple[Any, str]] = {
    "reward": ("train/reward", "training reward (mean over thoughts, nats)"),
    "nll_gain": (("eval/nll_null", "eval/nll_thought"), "held-out NLL gain over the null thought (nats/token)"),
    "null_rate": ("train/null_rate", "training null rate (no thought beats the null thought)"),
    "copy_rate": ("train/copy_rate", "training copy rate (thoughts containing the first target token)"),
}
# Run-folder keys that do not make two runs different points: the seed, and what may change on resume except the
# length (runs of 40 and 80 steps are different points).
_SAME_POINT_EXCEPT = ("trainer.seed",)


@dataclass
class Result:
    """One run or evaluation folder: its metrics (name → value), training curves and what identifies its point."""

    folder: str
    kind: str  # "run" | "eval"
    seed: int | None
    metrics: dict[str, float]
    identity: dict[str, Any] = field(default_factory=dict)  # flattened recipe minus seed and operational keys
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    # eval folders: per metric, the per-item (values, weights, resampling units, item ids) from items.jsonl
    items: dict[str, tuple[list, list, list, list]] = field(default_factory=dict)
    thoughts: list[dict] = field(default_factory=list)  # eval folders: every sampled thought (``thought_rows``)


def _identity(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in recipe.items():
        inner = key[len(prefix) :] if key.startswith(prefix) else None
        if inner is not None and (inner in _SAME_POINT_EXCEPT or (inner != "trainer.max_steps" and may_change(inner))):
            continue
        out[key] = value
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def read_curves(metrics_path: Path) -> dict[str, dict[int, float]]:
    """``CURVES`` from a run's metrics.jsonl: {name: {step: value}} (the last record of a step wins)."""
    by_step: dict[int, dict] = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                by_step.setdefault(int(record["step"]), {}).update(record)
    curves: dict[str, dict[int, float]] = {}
    for name, (key, _) in CURVES.items():
        points = {}
        for step, record in sorted(by_step.items()):
            if isinstance(key, tuple):
                a, b = (_number(record.get(k)) for k in key)
                value = a - b if a is not None and b is not None else None
            else:
                value = _number(record.get(key))
            if value is not None and math.isfinite(value):
                points[step] = value
        curves[name] = points
    return curves


def read_run(folder: Path) -> Result:
    """A finished run folder: every numeric ``initial_eval``/``final_eval`` metric of summary.json (``positions``, a
    count, left out) and ``<stage>/nll_gain`` = nll_null − nll_thought."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    metrics: dict[str, float] = {}
    for stage in ("initial_eval", "final_eval"):
        evals = summary.get(stage) or {}
        if evals.get("nll_null") is not None and evals.get("nll_thought") is not None:
            metrics[f"{stage}/nll_gain"] = evals["nll_null"] - evals["nll_thought"]
        for key, value in evals.items():
            number = _number(value) if value is not None else math.nan  # None: a NaN written as JSON null
            if key != "positions" and number is not None:
                metrics[f"{stage}/{key}"] = number
    compute = summary.get("compute") or {}
    if compute.get("flops_total") is not None:  # training FLOPs (thinkrl/run/compute.py) and the steps they bought
        metrics["compute/flops_total"] = float(compute["flops_total"])
        metrics["compute/steps"] = float(summary.get("steps", math.nan))
    recipe = recorded_recipe(folder)
    recipe = flatten(recipe) if recipe is not None else {}
    return Result(
        str(folder),
        "run",
        recipe.get("trainer.seed"),
        metrics,
        _identity(recipe),
        read_curves(folder / "metrics.jsonl"),
    )


def read_eval(folder: Path) -> Result:
    """A ``thinkrl eval`` folder: the value of every ``<mode>/<metric>`` in results.json (its bootstrap interval over
    items is not carried: the spread across seeds is what a study measures)."""
    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    metrics = {}
    for key, metric in results.get("metrics", {}).items():
        value = metric.get("value") if isinstance(metric, dict) else metric
        metrics[key] = math.nan if value is None else float(value)
    settings_path = folder / "settings.json"
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
    # The evaluated model's own folder differs per training seed: its recorded recipe (minus seed and operational
    # keys) and its checkpoint (``final``, or the checkpoint's name) identify it; a plain model is named in
    # recipe.model.default.path.
    flat = {k: v for k, v in flatten(settings).items() if k not in ("seed", "model", "checkpoint", "output_dir")}
    if settings.get("checkpoint"):
        flat["checkpoint"] = _checkpoint_label(Path(settings["checkpoint"]))
    seed = settings.get("seed", results.get("seed"))
    if settings.get("checkpoint") and isinstance(settings.get("recipe"), dict):  # a trained model: its training seed
        seed = settings["recipe"].get("trainer", {}).get("seed", seed)
    items, thoughts = _read_items(folder, results)
    for key, (values, weights, _, _) in items.items():  # metrics added since the evaluation wrote results.json
        if key not in metrics and values:
            total = sum(weights)  # 0: reward_copy_share without any positive reward is 0, as eval reports it
            empty = 0.0 if key.endswith("/reward_copy_share") else math.nan
            metrics[key] = sum(v * w for v, w in zip(values, weights)) / total if total else empty
    return Result(str(folder), "eval", seed, metrics, _identity(flat, "recipe."), items=items, thoughts=thoughts)


def _checkpoint_label(checkpoint: Path) -> str:
    """``final`` for the last checkpoint of a finished run, else the checkpoint's name: compute-matched baselines
    stop at the step their FLOP budget allows, which differs by a step or two between seeds, and their final
    checkpoints must still be one point."""
    summary = checkpoint.parent / "summary.json"
    try:
        steps = json.loads(summary.read_text(encoding="utf-8")).get("steps") if summary.is_file() else None
    except (OSError, ValueError):
        steps = None
    return "final" if steps is not None and checkpoint.name == f"{CHECKPOINT_PREFIX}{steps}" else checkpoint.name


def _read_items(folder: Path, results: dict) -> tuple[dict[str, tuple[list, list, list, list]], list[dict]]:
    """Per-item values of an evaluation's metrics (``eval.metrics.per_item_clusters``) and its sampled thoughts
    (``thought_rows``); both empty without items.jsonl."""
    from thinkrl.eval.metrics import per_item_clusters

    path = folder / "items.jsonl"
    if not path.is_file() or not results.get("task"):
        return {}, []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    values, weights, units, ids = per_item_clusters(results["task"], records, results.get("modes", []))
    thoughts = thought_rows(results["task"], records, str(folder))
    return {k: (values[k], weights[k], units[k], ids[k]) for k in values}, thoughts


def _no_thought_total(task: str, rec: dict) -> float | None:
    """The item's gold log-prob with no thought (summed over its tokens), when recorded."""
    if task == "text":
        return float(sum(rec["logp"]["none"])) if "none" in rec.get("logp", {}) else None
    key = "answer_logp" if task == "gsm8k" else "gold_logp"
    return rec["none"][key] if key in rec.get("none", {}) else None


def _thought_totals(task: str, rec: dict) -> list[float] | None:
    if task == "text":
        rows = rec.get("logp", {}).get("sampled")
        return [float(sum(r)) for r in rows] if rows else None
    sampled = rec.get("sampled", {})
    totals = sampled.get("answer_logp" if task == "gsm8k" else "gold_logp")
    return list(totals) if totals is not None else None


def _copies(thought: dict) -> str:
    if thought.get("copies_target"):
        return "target"
    return "y_1" if thought.get("copies_first") else ""


def thought_rows(task: str, records: list[dict], folder: str) -> list[dict]:
    """Every sampled thought of an evaluation with its gain per gold token over the null thought (``vs_null``) and
    over no thought (``vs_none``, when scored), the item, its gold tokens, (text) the context's tail and ``copies``:
    ``target`` / ``y_1`` when the thought holds the whole gold target / its first token (the copy gauge), else ''."""
    rows = []
    for rec in records:
        n = max(1, int(rec.get("answer_tokens", 1)))
        none, totals = _no_thought_total(task, rec), _thought_totals(task, rec)
        for j, thought in enumerate(rec.get("thoughts", [])):
            rows.append(
                {
                    "folder": folder,
                    "id": rec["id"],
                    "thought": thought.get("text", ""),
                    "vs_null": thought["reward"] / n,
                    "vs_none": (totals[j] - none) / n if none is not None and totals is not None else None,
                    "gold": "".join(rec.get("target_tokens", [])),
                    "copies": _copies(thought),
                    "context": rec.get("context") or rec.get("question"),
                }
            )
    return rows


def extreme_thoughts(results: list[Result], n: int = 3) -> dict[str, list[dict]]:
    """The ``n`` held-out thoughts of a point's evaluations that helped most and hurt most, by gain per gold token
    over the null thought (the quantity rewards measure)."""
    rows = sorted((row for r in results for row in r.thoughts), key=lambda row: row["vs_null"])
    return {"helped": rows[::-1][:n], "hurt": rows[:n]} if rows else {}


def read_result(folder: str | Path) -> Result:
    folder = Path(folder)
    if (folder / "summary.json").is_file():
        return read_run(folder)
    if (folder / "results.json").is_file():
        return read_eval(folder)
    if (folder / "config.yaml").is_file():
        raise ConfigError(f"{folder} is a run folder without summary.json (unfinished?); finish it or leave it out")
    raise ConfigError(f"{folder} holds neither a run's summary.json nor an evaluation's results.json")


def group_by_point(results: list[Result]) -> dict[str, list[Result]]:
    """Results with the same identity form one point, labelled by the keys whose values tell the points apart
    (``all`` when there is one point); points in order of first appearance."""
    groups: dict[str, list[Result]] = {}
    identities: dict[str, dict] = {}
    for result in results:
        key = json.dumps(result.identity, sort_keys=True, default=str)
        groups.setdefault(key, []).append(result)
        identities[key] = result.identity
    if len(groups) == 1:
        return {"all": next(iter(groups.values()))}
    keys: list[str] = []
    for identity in identities.values():
        keys += [k for k in identity if k not in keys]
    differing = [k for k in keys if len({json.dumps(i.get(k), default=str) for i in identities.values()}) > 1]
    labels = {
        key: ", ".join(f"{k}={identity.get(k, 'unset')}" for k in differing) for key, identity in identities.items()
    }
    return {labels[key]: members for key, members in groups.items()}


def _is_lm_baseline(result: Result) -> bool:
    return result.kind == "eval" and result.identity.get("recipe.learner.objective") == "lm"


def matched_baseline_gain(thought: Result, baseline: Result) -> tuple | None:
    """Per item, the compute-matched LM baseline's no-thought NLL minus the thought model's NLL after its sampled
    thoughts (per token, > 0: thoughts win), over the items both evaluated: (values, weights, units, ids), or None
    when either lacks the per-item values."""
    sampled = next((k for k in thought.items if k.startswith("sampled:") and k.endswith("/nll")), None)
    if sampled is None or "none/nll" not in baseline.items:
        return None
    base = dict(zip(baseline.items["none/nll"][3], baseline.items["none/nll"][0]))
    values, weights, units, ids = thought.items[sampled]
    keep = [i for i, item in enumerate(ids) if item in base]
    return (
        [base[ids[i]] - values[i] for i in keep],
        [weights[i] for i in keep],
        [units[i] for i in keep],
        [ids[i] for i in keep],
    )


def add_matched_baselines(points: dict[str, list[Result]]) -> None:
    """Evaluations of compute-matched LM baselines (recipe ``learner.objective=lm``) beside evaluations of thought
    runs: each thought result gets ``matched_lm/delta_nll`` against the baseline of the same training seed, its
    per-item values too, so the study pools it like any metric."""
    baselines = {r.seed: r for results in points.values() for r in results if _is_lm_baseline(r)}
    for results in points.values():
        for r in results:
            if r.kind != "eval" or _is_lm_baseline(r) or r.seed not in baselines:
                continue
            gain = matched_baseline_gain(r, baselines[r.seed])
            if gain and gain[0]:
                r.items["matched_lm/delta_nll"] = gain
                r.metrics["matched_lm/delta_nll"] = sum(v * w for v, w in zip(gain[0], gain[1])) / sum(gain[1])


def aggregate(points: dict[str, list[Result]], level: float = 0.95) -> dict:
    """Per point: every metric across its results (``study_stats.describe`` + the values) and the curve bands."""
    add_matched_baselines(points)
    out = []
    for label, results in points.items():
        names: list[str] = []
        for r in results:
            names += [n for n in r.metrics if n not in names]
        metrics = {}
        for name in names:
            values = [r.metrics.get(name) for r in results]
            metrics[name] = {**study_stats.describe(values, level), "values": values}
            if results and all(name in r.items for r in results):
                metrics[name]["pooled"] = pooled_items([r.items[name] for r in results], level)
        extremes = extreme_thoughts(results)
        curve_names = [n for n in CURVES if any(r.curves.get(n) for r in results)]
        curves = {n: study_stats.band([r.curves.get(n, {}) for r in results]) for n in curve_names}
        out.append(
            {
                "label": label,
                "n": len(results),
                "seeds": [r.seed for r in results],
                "folders": [r.folder for r in results],
                "metrics": metrics,
                "curves": curves,
                **({"thoughts": extremes} if extremes else {}),
            }
        )
    return {
        "level": level,
        "interval": f"{level:.0%} Student-t interval of the mean over seeds: mean ± t_(n-1) · sd / sqrt(n)",
        "points": out,
    }


# ---------------------------------------------------------------- writing


def pooled_items(per_result: list[tuple], level: float = 0.95) -> dict:
    """One metric's items of every result together: the (weighted) mean with a percentile-bootstrap interval that
    resamples units (an item, or a text window) with all their values, across results alike; the same held-out
    item seen by three seeds is one unit, not three independent ones."""
    from thinkrl.eval.stats import bootstrap_ci

    values = [v for vals, *_ in per_result for v in vals]
    weights = [w for _, ws, *_ in per_result for w in ws]
    units = [u for _, _, us, *_ in per_result for u in us]
    return bootstrap_ci(values, weights, groups=units, seed=0, level=level)


def _fmt(x: float | None, decimals: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    if abs(x) >= 1e6:  # FLOP counts
        return f"{x:.4g}"
    decimals = 1 if abs(x) >= 100 else decimals
    return f"{x:.{decimals}f}" if round(x, decimals) else f"{0.0:.{decimals}f}"  # no "-0.0000"


def format_cell(stats: dict, n_point: int) -> str:
    """``mean ± sd [low, high]``; the mean alone below two values; ``(n=k)`` when a seed lacks the metric;
    evaluations add ``· pooled v [low, high]`` (items of all seeds, bootstrap)."""
    text = _fmt(stats["mean"])
    if stats["n"] >= 2:
        text += f" ± {_fmt(stats['sd'])} [{_fmt(stats['ci_low'])}, {_fmt(stats['ci_high'])}]"
    if stats["n"] != n_point:
        text += f" (n={stats['n']})"
    pooled = stats.get("pooled")
    if pooled:
        text += f" · pooled {_fmt(pooled['value'])} [{_fmt(pooled['ci_low'])}, {_fmt(pooled['ci_high'])}]"
    return text


def _cell(text: str) -> str:
    """Text as one markdown table cell: on one line, pipes escaped, ``repr``-style so spaces and newlines show."""
    return "`" + repr(text)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def _relative(folder: str, base: Path | None) -> str:
    if base is None:
        return folder
    try:
        return str(Path(folder).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return folder


def markdown(study: dict, title: str, notes: list[str] | None = None, base: Path | None = None) -> str:
    """study.md's text; folders are shown relative to ``base`` (the study folder) when they lie inside it."""
    points = study["points"]
    lines = [f"# {title}", ""] + [f"{note}  " for note in notes or []]
    lines += [
        "",
        f"Across seeds: mean ± sd (sample sd, n − 1) [{study['interval']}]. Seeds are the unit; "
        f"with n = 3 the t quantile is {study_stats.t_critical(2, study['level']):.2f}. Evaluations add "
        f"`pooled`: the items of all seeds together, {study['level']:.0%} percentile bootstrap over items (an item, "
        "or a text window, with its values from every seed, as one unit).",
        "",
        "| point | n | seeds | folders |",
        "|---|---|---|---|",
    ]
    for p in points:
        folders = ", ".join(f"`{_relative(f, base)}`" for f in p["folders"])
        lines.append(f"| {p['label']} | {p['n']} | {', '.join(str(s) for s in p['seeds'])} | {folders} |")
    sections: dict[str, list[str]] = {}  # "final_eval/nll_gain" → section final_eval, row nll_gain
    for p in points:
        for name in p["metrics"]:
            section = name.split("/", 1)[0] if "/" in name else "metrics"
            if name not in sections.setdefault(section, []):
                sections[section].append(name)
    for section, names in sections.items():
        lines += ["", f"## {section}", "", "| metric | " + " | ".join(p["label"] for p in points) + " |"]
        lines.append("|---|" + "---|" * len(points))
        for name in names:
            cells = [format_cell(p["metrics"][name], p["n"]) if name in p["metrics"] else "" for p in points]
            lines.append(f"| {name.split('/', 1)[-1]} | " + " | ".join(cells) + " |")
    for p in points:
        if p.get("thoughts"):
            lines += ["", f"## Held-out thoughts that helped most and hurt most: {p['label']}", ""]
            lines += [
                "| | Δ log p / token vs null | vs no thought | thought | gold | copies | item |",
                "|---|---|---|---|---|---|---|",
            ]
            for kind in ("helped", "hurt"):
                for row in p["thoughts"][kind]:
                    cells = [
                        kind,
                        _fmt(row["vs_null"]),
                        _fmt(row["vs_none"]),
                        _cell(row["thought"]),
                        _cell(row["gold"]),
                        row.get("copies", ""),
                    ]
                    lines.append("| " + " | ".join(cells) + f" | {row['id']} (`{_relative(row['folder'], base)}`) |")
    plotted = [n for n in CURVES if any(p["curves"].get(n, {}).get("steps") for p in points)]
    if plotted:
        lines += ["", "## Curves (mean over seeds, band ± 1 sd)", ""]
        lines += [f"![{n}](plots/{n}.png)" for n in plotted]
    return "\n".join(lines) + "\n"


def plot_curves(study: dict, out: Path) -> list[str]:
    """plots/<curve>.png: one line per point (mean over seeds) with a ± 1 sd band; returns the curves drawn."""
    try:
        from thinkrl.eval.report import new_figure, save_png
    except ImportError:  # pragma: no cover - matplotlib is a dependency; a stripped install still gets the tables
        print("thinkrl: matplotlib is not installed: no plots (tables are in study.md)")
        return []
    drawn = []
    for name, (_, ylabel) in CURVES.items():
        bands = [(p["label"], p["curves"].get(name)) for p in study["points"]]
        bands = [(label, b) for label, b in bands if b and b["steps"]]
        if not bands:
            continue
        fig = new_figure(7, 4)
        ax = fig.add_subplot()
        for label, b in bands:
            (line,) = ax.plot(
                b["steps"], b["mean"], label=f"{label} (n={b['n']})", marker="." if len(b["steps"]) < 30 else None
            )
            if b["n"] >= 2:
                low = [m - s for m, s in zip(b["mean"], b["sd"])]
                high = [m + s for m, s in zip(b["mean"], b["sd"])]
                ax.fill_between(b["steps"], low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: mean over seeds, band ± 1 sd")
        ax.legend(fontsize="small")
        fig.tight_layout()
        save_png(fig, out / "plots" / f"{name}.png")
        drawn.append(name)
    return drawn


def write_study(out: str | Path, study: dict, title: str, notes: list[str] | None = None) -> None:
    """``study.json`` (with ``title`` and ``notes``), ``study.md`` and ``plots/`` into ``out``."""
    from thinkrl.eval.report import write_json
    from thinkrl.run.files import write_atomic

    out = Path(out)
    write_json(out / "study.json", {"title": title, "notes": notes or [], **study})
    plot_curves(study, out)
    write_atomic(out / "study.md", markdown(study, title, notes, out).encode("utf-8"))
