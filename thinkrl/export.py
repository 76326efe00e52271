"""``thinkrl export CHECKPOINT OUT_DIR``: a training checkpoint (sharded or not) as plain HF folders.

OUT_DIR gets one folder per weight group (``A/``, ``B/``...: config, safetensors, tokenizer; LoRA adapters merged
in, so transformers and vLLM load them as they are), ``head.safetensors`` with the mixing head and ``roles.json``
saying which folder plays which role. It runs in one process: a sharded checkpoint is gathered on load.

OUT_DIR follows thinkrl's folder rule (``thinkrl.output_folder``): a new or empty folder, or an earlier export
(its entries are replaced); a folder holding anything else is refused unless ``--overwrite``, which replaces only
the entries an export writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from thinkrl import output_folder
from thinkrl.errors import ConfigError


def _is_export(folder: Path) -> bool:
    """An export written before folders carried thinkrl's stamp: its roles.json names roles and the head."""
    try:
        recorded = json.loads((folder / "roles.json").read_text(encoding="utf-8"))
        return {"roles", "head_form"} <= set(recorded)
    except (OSError, ValueError, TypeError):
        return False


def _plan(checkpoint: str | Path, out_dir: str | Path, overwrite: bool):
    """(checkpoint, the entries an export writes, folder decision), reading only: a checkpoint folder as given (it
    must be whole), a run folder's newest whole one; thinkrl's folder rule for ``out_dir``. Raises the refusals."""
    from thinkrl.config import load_config
    from thinkrl.eval.setup import locate_checkpoint

    located = locate_checkpoint(str(checkpoint))
    if located is None or located[1] is None:
        raise ConfigError(
            f"{checkpoint} is not a complete checkpoint folder (checkpoint-<step>/ of a thinkrl run) or a run with one"
        )
    run_dir, checkpoint = located
    groups = list(dict.fromkeys(load_config(run_dir / "config.yaml").model.weight_groups))
    written = (output_folder.STAMP, "roles.json", "head.safetensors", *groups)
    return checkpoint, written, output_folder.decide(out_dir, "export", _is_export, overwrite, owns=written)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from thinkrl.eval.setup import load_setup

    out_dir = Path(out_dir)
    checkpoint, written, decision = _plan(checkpoint, out_dir, overwrite)  # before any model is loaded
    setup = load_setup(str(checkpoint), None, [])
    roles = setup.roles
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out_dir.name}-", dir=out_dir.parent))
    try:
        for group, model in roles.models.items():
            plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            plain.save_pretrained(tmp / group)
            roles.tokenizer.save_pretrained(tmp / group)
        head = {k: v.contiguous() for k, v in roles.head.state_dict().items()}
        save_file(head, str(tmp / "head.safetensors"), metadata={"form": roles.head.form})
        recorded = {"roles": roles.role_group, "head_form": roles.head.form, "checkpoint": str(checkpoint)}
        (tmp / "roles.json").write_text(json.dumps(recorded, indent=2))
        if decision.state == "new" and not out_dir.exists():
            output_folder.claim(output_folder.Decision(tmp, "export", "new"))
            os.replace(tmp, out_dir)
            return out_dir
        # Into an existing folder: replace the export's own entries one by one; nothing else is touched.
        if decision.state == "ours":
            decision.remove = [out_dir / name for name in written if (out_dir / name).exists()]
        output_folder.claim(decision)
        for entry in sorted(tmp.iterdir()):
            target = out_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_export(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> str:
    """What ``export_checkpoint`` would do, reading only (``--dry-run``)."""
    checkpoint, written, decision = _plan(checkpoint, out_dir, overwrite)
    return f"export {checkpoint} (weight groups {', '.join(written[3:])}) -> {decision.describe()}"


def _export(args: argparse.Namespace) -> int:
    if args.dry_run:
        print(describe_export(args.checkpoint, args.out_dir, args.overwrite))
        return 0
    out = export_checkpoint(args.checkpoint, args.out_dir, args.overwrite)
    print(f"exported {args.checkpoint} to {out} (roles.json says which folder plays which role)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint (sharded or not) as plain HF folders, one per weight group")
    p.add_argument("checkpoint", help="a checkpoint-<step>/ folder of a thinkrl run, or a run folder (its newest)")
    p.add_argument("out_dir", help="a new or empty folder, or an earlier export's (its files are replaced)")
    from thinkrl.cli import add_dry_run, add_overwrite

    add_overwrite(p, "the entries an export writes")
    add_dry_run(p)
    p.set_defaults(func=_export)
