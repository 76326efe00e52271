"""Study (d)'s figures, read from its output folder (``scripts/study_smollm2.sh d``), so the results page is copied
by a program: the adaptation stage and its stopping rule, the study table (``study_table.row``), the upper bound,
the copy gauge's chance level, the FLOPs of each arm, and one plot of both arms' in-training held-out NLL against
training FLOPs.

    python scripts/study_d_report.py runs/study-smollm2-d --plot docs/results/smollm2-study-d.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from study_table import HEADER, row, thoughts


def _metric(folder: Path, key: str) -> float | None:
    path = folder / "results.json"
    if not path.is_file():
        return None
    metric = json.loads(path.read_text())["metrics"].get(key)
    return metric.get("value") if isinstance(metric, dict) else metric


def eval_curve(run: Path, key: str) -> list[tuple[float, float]]:
    """(training FLOPs, eval metric) at every in-training evaluation of a run (the last line of a step wins)."""
    points: dict[int, tuple[float, float]] = {}
    flops = 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        flops = rec.get("compute/flops_total", flops)
        if key in rec:
            points[rec["step"]] = (flops, rec[key])
    return [points[s] for s in sorted(points)]


def _flops(run: Path) -> float | None:
    path = run / "summary.json"
    return json.loads(path.read_text()).get("compute", {}).get("flops_total") if path.is_file() else None


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = f" ± {statistics.stdev(values):.2e}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2e}{sd}"


def plot(out: Path, seeds: list[Path], baselines: list[Path], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, run in enumerate(seeds):
        xs, ys = zip(*eval_curve(run, "eval/nll_thought"))
        ax.plot(xs, ys, "o-", color="tab:blue", alpha=0.8, label="thought arm (NLL after thought)" if i == 0 else None)
    for i, run in enumerate(baselines):
        xs, ys = zip(*eval_curve(run, "eval/nll_base"))
        ax.plot(xs, ys, "s--", color="tab:orange", alpha=0.8, label="LM arm (NLL, no thought)" if i == 0 else None)
    ax.set_xlabel("training FLOPs (thinkrl's accounting)")
    ax.set_ylabel("held-out NLL per target token (64 test positions)")
    ax.set_title("Study (d): both arms from the same adapted start, one line per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the study's sweep folder (runs/study-smollm2-d; stage 1 in <out>-start)")
    p.add_argument("--plot", type=Path, help="where to write the FLOPs plot (PNG)")
    args = p.parse_args(argv)
    out = args.out
    start = out.parent / f"{out.name}-start"  # stage 1 and the evaluations of the adapted start
    adaptation = json.loads((start / "adapt" / "adaptation.json").read_text())
    curve = ", ".join(f"{s}: {v:.3f}" for s, v in sorted((int(k), v) for k, v in adaptation["curve"].items()))
    print(
        f"**Adaptation.** Rule: {adaptation['rule']}. Stopped at {adaptation['steps']} steps "
        f"(flat: {adaptation['flat']}, gain over the last 20%: {adaptation['gain_last_20pct']:.4f} nats). "
        f"Held-out NLL by step: {curve}.\n"
    )
    study = out / "eval" / "study" / "study.json"
    if study.is_file():
        loaded = json.loads(study.read_text())
        print(HEADER)
        print(row("d", loaded))
        print()
        print("\n".join(thoughts("d", loaded)))
        print()
    upper = _metric(start / "upper_bound", "none/nll")
    untrained = start / "untrained"
    print(f"- upper bound (the adapted model reading all 256 tokens, no thought): NLL {upper}")
    for key in (
        "none/nll",
        "null/nll",
        "sampled:4/nll",
        "sampled:4/copy_rate",
        "sampled:4/copy_rate_target",
        "sampled:4/reward_copy_share",
        "null/copy_rate",
    ):
        print(f"- untrained thoughts (the adapted start), {key}: {_metric(untrained, key)}")
    seeds = sorted(out.glob("seed-*"))
    baselines = sorted((out / "baseline").glob("seed-*"))
    thought_flops = [f for f in map(_flops, seeds) if f is not None]
    lm_flops = [f for f in map(_flops, baselines) if f is not None]
    print(
        f"- training FLOPs: thought arm {_mean_sd(thought_flops)}, LM arm {_mean_sd(lm_flops)} "
        f"({len(thought_flops)} and {len(lm_flops)} seeds)"
    )
    for run in baselines:
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        print(
            f"- {run.parent.name}/{run.name}: {summary.get('steps')} LM steps, stopped by {summary.get('stopped_by')}"
        )
    if args.plot and seeds and baselines:
        plot(out, seeds, baselines, args.plot)
        print(f"- plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
