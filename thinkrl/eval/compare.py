"""``thinkrl prompts compare A B ...``: reasoner templates side by side on the same items and thought seeds.

Each template gets its own resumable evaluation folder under ``<output>/<template>/`` (null thought and
``sampled:K`` only); the table gathers mean reward, Δ NLL vs the null thought, null-thought rate, the task's
accuracy, thought length, unfinished rate and a few sample thoughts per template. ``compare.html`` puts the table
on top of one row per item with one column per template: that template's best thought by reward, the reward, and
whether the answer after it was right (GSM8K: its generation, when generated; CSQA: the likeliest letter).
"""

from __future__ import annotations

import json
import math
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


def thought_answer(task: str, rec: dict, j: int) -> tuple[str | None, bool | None]:
    """(answer, right) after the item's sampled thought ``j``: GSM8K the generated number (None, None when nothing
    was generated), CSQA the letter with the highest log-likelihood, text (None, None): nothing to be right about."""
    sampled = rec.get("sampled") or {}
    if task == "gsm8k" and "correct" in sampled:
        pred = sampled["pred"][j]
        return ("no number" if pred is None else str(pred)), bool(sampled["correct"][j])
    if task == "csqa" and "letter_logp" in sampled:
        scores = sampled["letter_logp"][j]
        pick = max(range(len(scores)), key=lambda c: -math.inf if scores[c] is None else scores[c])
        letter = rec["labels"][pick]
        return letter, letter == rec["gold"]
    return None, None


def _item_header(task: str, rec: dict) -> dict:
    """The item column: its question (CSQA with the choices; text: the end of the context and the true next tokens)."""
    if task == "csqa":
        choices = "\n".join(f"{lab}. {text}" for lab, text in zip(rec["labels"], rec["texts"]))
        question = f"{rec['question']}\n{choices}"
    elif task == "text":
        question = "…" + (rec.get("context") or "")[-300:] + " ⟶ " + "".join(rec.get("target_tokens", []))
    else:
        question = rec.get("question", "")
    gold = None if task == "text" else rec["gold"]
    return {"title": f"item {rec['id']}", "anchor": f"item-{rec['id']}", "question": question, "gold": gold}


def _cell(task: str, rec: dict) -> dict | None:
    """One template's view of one item: its best thought by reward, and all its thoughts (best first), each with the
    answer after it."""
    thoughts = []
    for j, t in enumerate(rec["thoughts"]):
        answer, right = thought_answer(task, rec, j)
        thoughts.append({"text": t["text"], "reward": t["reward"], "answer": answer, "right": right})
    if not thoughts:
        return None
    order = sorted(range(len(thoughts)), key=lambda j: -thoughts[j]["reward"])  # ties: the first, as argmax
    best = order[0]
    return {
        **{k: v for k, v in thoughts[best].items() if k != "text"},
        "thought": thoughts[best]["text"],
        "finished": rec["thoughts"][best].get("finished"),
        "thoughts": [thoughts[j] for j in order],
    }


def compare_items(task: str, records: dict[str, list[dict]]) -> list[dict]:
    """Rows of compare.html: one per item (in the first template's order), one cell per template in ``records``."""
    by_id = {name: {rec["id"]: rec for rec in recs} for name, recs in records.items()}
    first = next(iter(records.values()), [])
    return [
        {
            **_item_header(task, rec),
            "cells": [_cell(task, ids[rec["id"]]) if rec["id"] in ids else None for ids in by_id.values()],
        }
        for rec in first
    ]


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
    """thinkrl's folder rule for a comparison's folder: its own files are compare.json/md/html and a folder per
    template."""
    owns = (output_folder.STAMP, "compare.json", "compare.md", "compare.html", *map(template_folder, names))
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
    rows, records = [], {}
    loaded = load_setup(model, config, overrides)  # the models once: templates only change the reasoner's prompt
    for name in names:
        cfg = replace(loaded.cfg, rollout=replace(loaded.cfg.rollout, reasoner_template=name))
        setup = EvalSetup(cfg, loaded.roles, loaded.checkpoint)
        run_opts = EvalOptions(**opts, output_dir=str(out / template_folder(name)))
        evaluator = Evaluator(run_opts, setup)
        results = evaluator.run()
        records[name] = evaluator.records
        rows.append(_row(name, results, records[name], run_opts.task, samples))
    table = report.compare_table(rows, COLUMNS)
    lines = [table, ""]
    for row in rows:
        lines.append(f"**{row['template']}** sample thoughts:")
        lines += [f"- `{s!r}`" for s in row["samples"]]
    text = "\n".join(lines)
    settings = {k: v for k, v in opts.items() if k != "overwrite"}
    report.write_json(out / "compare.json", {"rows": rows, "settings": settings, "templates": names})
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    task = opts["task"]
    summary = report.compare_table_html(rows, COLUMNS, [f"{template_folder(n)}/report.html" for n in names])
    notes = [
        f"{task} · {model or config} · N={len(records[names[0]])} · seed {opts.get('seed')} · thoughts "
        f"{opts.get('thoughts')}; each template's own report.html is linked from its name."
    ]
    title = f"thinkrl prompts compare — {task} — {len(names)} templates"
    report.compare_html(out / "compare.html", title, summary, names, compare_items(task, records), notes)
    return {"rows": rows, "table": text}
