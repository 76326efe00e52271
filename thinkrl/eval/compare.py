"""``thinkrl prompts compare A B ...``: reasoner templates side by side on the same items and thought seeds.

Each template gets its own resumable evaluation folder under ``<output>/<template>/`` (null thought and
``sampled:K`` only); the table gathers mean reward, Δ NLL vs the null thought, null-thought rate, the task's
accuracy, thought length, unfinished rate and a few sample thoughts per template.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from thinkrl import output_folder
from thinkrl.errors import ConfigError
from thinkrl.eval import report
from thinkrl.eval.runner import EvalOptions, Evaluator
from thinkrl.eval.setup import EvalSetup, load_setup
from thinkrl.prompts import load_reasoner_template

# The accuracy each task reports after sampled thoughts (likelihood score where no generation is run).
ACCURACY = {"gsm8k": ("accuracy_maj", "likelihood_score"), "csqa": ("letter_accuracy",), "text": ()}
COLUMNS = [
    ("template", "template"),
    ("reward_mean", "mean reward"),
    ("delta_nll", "Δ NLL vs null"),
    ("null_rate", "null rate"),
    ("accuracy", "accuracy"),
    ("thought_len", "thought len"),
    ("unfinished_rate", "unfinished"),
]


def check_templates(names: list[str]) -> None:
    """Fail before any model loads: each name must exist, parse, and hold {context} once."""
    if len(names) < 2:
        raise ConfigError("prompts compare needs at least two templates")
    for name in names:
        load_reasoner_template(name)


def _row(name: str, results: dict, records: list[dict], task: str, samples: int) -> dict:
    mode = next(m for m in results["modes"] if m.startswith("sampled"))
    metrics = results["metrics"]
    row = {"template": name}
    for key, _ in COLUMNS[1:]:
        if key == "accuracy":
            found = next((f"{mode}/{a}" for a in ACCURACY[task] if f"{mode}/{a}" in metrics), None)
            row[key] = metrics[found] if found else ""
        else:
            row[key] = metrics.get(f"{mode}/{key}", "")
    row["samples"] = [rec["thoughts"][0]["text"] for rec in records[:samples] if rec["thoughts"]]
    return row


def _is_comparison(folder: Path) -> bool:
    """A comparison written before folders carried thinkrl's stamp: its compare.json lists the templates."""
    try:
        return "templates" in json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def template_folder(name: str) -> str:
    """The folder inside a comparison that holds one template's evaluation."""
    return name.replace("/", "__")


def folder_decision(out: str | Path, names: list[str], overwrite: bool) -> output_folder.Decision:
    """thinkrl's folder rule for a comparison's folder: its own files are compare.json/md and a folder per template."""
    owns = (output_folder.STAMP, "compare.json", "compare.md", *map(template_folder, names))
    return output_folder.decide(out, "compare", _is_comparison, overwrite, owns=owns)


def compare(
    names: list[str], opts: dict, model: str | None, config: str | None, overrides: list[str], samples: int = 3
) -> dict:
    """Evaluate each template; returns {"rows": [...], "table": markdown}. ``opts`` are EvalOptions fields."""
    check_templates(names)
    opts = dict(opts)
    out = Path(opts.pop("output_dir"))
    output_folder.claim(folder_decision(out, names, opts.get("overwrite", False)))
    opts["overwrite"] = False  # each template's folder inside is new or an earlier comparison's
    rows = []
    loaded = load_setup(model, config, overrides)  # the models once: templates only change the reasoner's prompt
    for name in names:
        cfg = replace(loaded.cfg, rollout=replace(loaded.cfg.rollout, reasoner_template=name))
        setup = EvalSetup(cfg, loaded.roles, loaded.checkpoint)
        run_opts = EvalOptions(**opts, output_dir=str(out / template_folder(name)))
        evaluator = Evaluator(run_opts, setup)
        results = evaluator.run()
        records = evaluator.records
        rows.append(_row(name, results, records, run_opts.task, samples))
    table = report.compare_table(rows, COLUMNS)
    lines = [table, ""]
    for row in rows:
        lines.append(f"**{row['template']}** sample thoughts:")
        lines += [f"- `{s!r}`" for s in row["samples"]]
    text = "\n".join(lines)
    settings = {k: v for k, v in opts.items() if k != "overwrite"}
    report.write_json(out / "compare.json", {"rows": rows, "settings": settings, "templates": names})
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    return {"rows": rows, "table": text}
