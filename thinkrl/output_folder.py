"""The one rule for every folder thinkrl writes: it never deletes or overwrites a file it did not write.

``decide(folder, kind, owns, ...)`` says what a command may do with its output folder, reading only:

- the folder does not exist or is empty: ``new``;
- it holds thinkrl's stamp (``.thinkrl``, written by the command that made it) for the same kind, or, for folders
  made before the stamp existed, the file that kind always writes parses as thinkrl's (a run's ``config.yaml``
  is a recipe, an evaluation's ``settings.json`` holds one): ``ours``, and the command resumes or refuses as it
  always did;
- anything else that is not empty is refused in one line naming the folder and the way out (another folder, or
  ``--overwrite``); with ``overwrite`` the decision is ``overwrite``, and ``remove`` lists the entries whose names
  the command itself writes, the only ones ``claim`` deletes. Everything else in the folder stays untouched.

``claim(decision)`` carries a decision out (on the main process only) and writes the stamp.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.errors import ConfigError

logger = logging.getLogger(__name__)

STAMP = ".thinkrl"

# What each command writes at the top of its folder (fnmatch patterns): --overwrite removes these and nothing else.
OWNS = {
    "train": (
        STAMP,
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "results.md",
        "rollouts",
        "checkpoint-*",
        ".tmp-checkpoint-*",
        "rank*",
        "wandb",
    ),
    "coconut": (
        STAMP,
        "config.yaml",
        "metrics.jsonl",
        "stage_results.json",
        "eval-*.json",
        "checkpoint-*",
        ".tmp-checkpoint-*",
        "wandb",
    ),
    "eval": (
        STAMP,
        "settings.json",
        "items.jsonl",
        "results.json",
        "results.md",
        "report.html",
        "plots",
        "vllm-weights",
    ),
    "sweep": (STAMP, "study.json", "study.md", "plots", "seed-*", "*=*", "baseline"),
    "aggregate": (STAMP, "study.json", "study.md", "plots"),
}  # export and compare name theirs per call (weight groups, templates)


@dataclass
class Decision:
    folder: Path
    kind: str
    state: str  # new | ours | overwrite
    remove: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        """One line for --dry-run and logs."""
        if self.state == "new":
            return f"{self.folder}: new or empty, {self.kind} writes into it"
        if self.state == "ours":
            return f"{self.folder}: written by an earlier thinkrl {self.kind}, which continues there"
        removed = ", ".join(p.name for p in self.remove) or "nothing"
        return f"{self.folder}: --overwrite removes thinkrl's own entries ({removed}) and keeps every other file"


def read_stamp(folder: Path) -> str | None:
    """The kind recorded in ``folder``'s stamp, or None."""
    try:
        return json.loads((Path(folder) / STAMP).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def decide(
    folder: str | Path,
    kind: str,
    legacy: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    owns: tuple[str, ...] | None = None,
    accept: tuple[str, ...] = (),
) -> Decision:
    """What ``kind`` may do with ``folder`` (module docstring). Read-only: every process reaches the same verdict.

    ``legacy(folder)``: whether a folder without a stamp was written by an earlier thinkrl ``kind``; ``accept``:
    other kinds whose folders this one may also continue (aggregate into a sweep's folder)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder; choose a folder for the output")
    entries = _entries(folder)
    if not entries:
        return Decision(folder, kind, "new")
    stamp = read_stamp(folder)
    if stamp == kind or stamp in accept or (stamp is None and legacy is not None and legacy(folder)):
        return Decision(folder, kind, "ours")
    if not overwrite:
        what = f"thinkrl {stamp}" if stamp else "not a thinkrl " + kind
        raise ConfigError(
            f"{folder} already holds files ({what} folder: {', '.join(p.name for p in entries[:4])}"
            f"{', ...' if len(entries) > 4 else ''}); choose a new or empty folder, or pass --overwrite to replace "
            "only the files thinkrl writes there (every other file stays)"
        )
    patterns = owns if owns is not None else OWNS[kind]
    remove = [p for p in entries if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
    return Decision(folder, kind, "overwrite", remove)


def claim(decision: Decision) -> None:
    """Create the folder, remove what an ``overwrite`` decision lists, write the stamp (main process only)."""
    folder = decision.folder
    folder.mkdir(parents=True, exist_ok=True)
    for path in decision.remove:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if decision.remove and decision.state == "overwrite":
        logger.info("%s: removed thinkrl's own %s (--overwrite)", folder, ", ".join(p.name for p in decision.remove))
    if read_stamp(folder) is None:
        (folder / STAMP).write_text(json.dumps({"kind": decision.kind, "by": "thinkrl"}) + "\n", encoding="utf-8")


def check_output_file(path: str | Path, kind: str) -> None:
    """A file a command writes whole (a benchmark's ``--json``) may replace only that command's earlier output:
    a JSON object whose ``written_by`` names it. Anything else there is refused in one line."""
    path = Path(path)
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("written_by") == kind
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(f"{path} exists and was not written by {kind}; choose another path (nothing was written)")
