"""Write docs/configuration.md from thinkrl/config.py: every key of a recipe with its default and help text.

    .venv/bin/python scripts/config_doc.py            # rewrites docs/configuration.md
    .venv/bin/python scripts/config_doc.py --check    # exit 1 when the page differs from config.py (the test)

The page is generated, never edited by hand, so it cannot drift from the dataclasses it documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"


def _rows(cls, prefix: str) -> list[tuple[str, str, str]]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows += _rows(kind, key)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows


def render() -> str:
    sys.path.insert(0, str(ROOT))
    from thinkrl.config import Config

    lines = [
        "# Configuration",
        "",
        "Every key of a thought-RL recipe (`thinkrl train`, `thinkrl eval`, `thinkrl sweep`), its default and what it",
        "does. YAML files in `configs/` set values; dotted overrides on the command line win",
        "(`rollout.num_thoughts=4 learner.baseline=mean`). Generated from `thinkrl/config.py` by",
        "`scripts/config_doc.py`; do not edit by hand.",
        "",
    ]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"## `{section.name}`", "", (cls.__doc__ or "").strip().splitlines()[0], ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for key, default, text in _rows(cls, section.name):
            cell = text.replace("|", "\\|")  # a pipe inside a help text would end the cell
            lines.append(f"| `{key}` | `{default}` | {cell} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        same = PAGE.is_file() and PAGE.read_text(encoding="utf-8") == text
        if not same:
            print(f"{PAGE} differs from thinkrl/config.py: run scripts/config_doc.py", file=sys.stderr)
        return 0 if same else 1
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
