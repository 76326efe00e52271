"""Is a checkpoint whole? Read before anything loads it.

Every checkpoint ends with ``manifest.json`` (written last, inside the atomic rename): each file below the folder
with its size in bytes, every rank's shard files included. ``problem(folder)`` checks the listed files are there
at those sizes and that every safetensors header reads and covers its file; checkpoints written before manifests
existed get the header check alone. A truncated weights file (a crashed disk, an interrupted copy) or a deleted
optimizer file is found here, before a library's traceback would.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
BROKEN_SUFFIX = ".broken"


def write_manifest(folder: Path) -> None:
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"its header claims {n} bytes of a {size}-byte file"
        try:
            meta = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "unreadable safetensors header"
    if 8 + n + end > size:
        return f"tensor data ends at byte {8 + n + end} of a {size}-byte file"
    return None


def problem(folder: Path) -> str | None:
    """None when ``folder`` (a checkpoint) is whole, else what is wrong with it, in a few words."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for rel, size in files.items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != size:
                return f"{rel} has {path.stat().st_size} of its {size} bytes"
    for path in sorted(folder.rglob("*.safetensors")):
        found = _safetensors_problem(path)
        if found:
            return f"{path.relative_to(folder).as_posix()}: {found}"
    return None


def set_aside(folder: Path) -> Path:
    """Rename a broken checkpoint to ``<name>.broken`` (``.broken-2`` ... if taken): kept, never resumed or counted."""
    folder = Path(folder)
    target, n = folder.with_name(folder.name + BROKEN_SUFFIX), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}{BROKEN_SUFFIX}-{n}")
    folder.rename(target)
    return target
