"""The README's table for the SmolLM2 study: one row per recipe, read from each recipe's ``thinkrl aggregate``
study.json (``scripts/study_smollm2.sh`` writes it to ``runs/study-smollm2-<recipe>/eval/study``), so the figures
in the README are copied by a program, not by hand.

    python scripts/study_table.py a=runs/study-smollm2-a/eval/study b=runs/study-smollm2-b/eval/study

Prints the markdown table (per target token, mean ± sd over seeds and the pooled 95% interval over items) and,
per recipe, the three held-out thoughts that helped most and hurt most against the null thought.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _sampled_mode(metrics: dict) -> str | None:
    return next((key.split("/")[0] for key in metrics if key.startswith("sampled:")), None)


def _points(study: dict) -> tuple[dict, dict | None]:
    """(the thought run's point, the compute-matched baseline's point or None)."""
    thought = next((p for p in study["points"] if _sampled_mode(p["metrics"])), None)
    if thought is None:
        raise SystemExit("no evaluation with sampled thoughts in this study.json; aggregate the thought runs' evals")
    rest = [p for p in study["points"] if p is not thought and "none/nll" in p["metrics"]]
    return thought, (rest[0] if rest else None)


def _cell(stats: dict | None, digits: int = 4) -> str:
    """A difference: mean ± sd over seeds [pooled 95% interval over items]."""
    if not stats:
        return "–"
    text = f"{stats['mean']:+.{digits}f}"
    if stats.get("n", 1) > 1:
        text += f" ± {stats['sd']:.{digits}f}"
    if stats.get("pooled"):
        p = stats["pooled"]
        text += f" [{p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f}]"
    return text


def _plain(stats: dict | None, digits: int = 3) -> str:
    return "–" if not stats else f"{stats['mean']:.{digits}f}"


def row(name: str, study: dict) -> str:
    thought, baseline = _points(study)
    m, mode = thought["metrics"], _sampled_mode(thought["metrics"])
    cells = [
        name,
        str(thought["n"]),
        _plain(m.get(f"{mode}/nll")),
        _plain(m.get("null/nll")),
        _plain(m.get("none/nll")),
        _cell(m.get(f"{mode}/delta_nll")),
        _cell(m.get(f"{mode}/delta_nll_none")),
        _plain(m.get(f"{mode}/null_rate"), 2),
        _plain(m.get(f"{mode}/thought_len"), 1),
        _plain(m.get(f"{mode}/unfinished_rate"), 2),
        _plain(m.get(f"{mode}/copy_rate"), 3),
        _plain(baseline["metrics"].get("none/nll")) if baseline else "–",
        _cell(m.get("matched_lm/delta_nll")),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| recipe | seeds | NLL after thought | NLL null | NLL no thought | NLL(null) − NLL(thought) "
    "| NLL(no thought) − NLL(thought) | null rate | thought length | unfinished | copy rate | baseline NLL "
    "| NLL(baseline) − NLL(thought) |\n|" + "---|" * 13
)


def thoughts(name: str, study: dict) -> list[str]:
    thought, _ = _points(study)
    lines = []
    for kind in ("helped", "hurt"):
        for t in thought.get("thoughts", {}).get(kind, []):
            seed = Path(t["folder"]).name
            lines.append(
                f"- ({name}, {kind}, {seed}, item {t['id']}) thought {json.dumps(t['thought'])}: "
                f"{t['vs_null']:+.4f} vs null, {t['vs_none']:+.4f} vs no thought per token; "
                f"gold {json.dumps(t['gold'])}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", help="NAME=FOLDER (a thinkrl aggregate output with study.json)")
    args = parser.parse_args(argv)
    loaded = []
    for spec in args.studies:
        name, sep, folder = spec.partition("=")
        path = Path(folder) / "study.json"
        if not sep or not path.is_file():
            raise SystemExit(f"{spec}: give NAME=FOLDER where FOLDER/study.json exists (thinkrl aggregate --out)")
        loaded.append((name, json.loads(path.read_text(encoding="utf-8"))))
    print(HEADER)
    for name, study in loaded:
        print(row(name, study))
    print()
    for name, study in loaded:
        print("\n".join(thoughts(name, study)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
