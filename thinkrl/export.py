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


def _checkpoint_of(path: Path) -> Path:
    """A checkpoint folder as given; a run folder: its newest whole checkpoint."""
    from thinkrl.run.state import newest_intact

    if (path / "config.yaml").is_file() and not (path / "trainer_state.json").is_file():
        newest, _ = newest_intact(path)
        if newest is None:
            raise ConfigError(f"run {path} has no complete checkpoint to export; train it first")
        return newest
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from thinkrl.eval.setup import load_setup

    checkpoint, out_dir = _checkpoint_of(Path(checkpoint)), Path(out_dir)
    if not (checkpoint / "trainer_state.json").is_file():
        raise ConfigError(f"{checkpoint} is not a complete checkpoint folder (checkpoint-<step>/ of a thinkrl run)")
    setup = load_setup(str(checkpoint), None, [])
    roles = setup.roles
    written = [output_folder.STAMP, "roles.json", "head.safetensors", *roles.models]
    decision = output_folder.decide(out_dir, "export", _is_export, overwrite, owns=tuple(written))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out_dir.name}-", dir=out_dir.parent))
    try:
        for group, model in roles.models.items():
            plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            plain.save_pretrained(tmp / group)
            roles.tokenizer.save_pretrained(tmp / group)
        head = {k: v.contiguous() for k, v in roles.head.state_dict().items()}
        save_file(head, str(tmp / "head.safetensors"), metadata={"form": roles.head.form})
        (tmp / "roles.json").write_text(
            json.dumps(
                {"roles": roles.role_group, "head_form": roles.head.form, "checkpoint": str(checkpoint)}, indent=2
            )
        )
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
    from thinkrl.config import load_config
    from thinkrl.run import integrity

    checkpoint = _checkpoint_of(Path(checkpoint))
    if not (checkpoint / "trainer_state.json").is_file():
        raise ConfigError(f"{checkpoint} is not a complete checkpoint folder (checkpoint-<step>/ of a thinkrl run)")
    found = integrity.problem(checkpoint)
    if found:
        raise ConfigError(f"checkpoint {checkpoint} is broken ({found}); give another checkpoint")
    groups = list(dict.fromkeys(load_config(checkpoint.parent / "config.yaml").model.weight_groups))
    written = (output_folder.STAMP, "roles.json", "head.safetensors", *groups)
    decision = output_folder.decide(out_dir, "export", _is_export, overwrite, owns=written)
    return f"export {checkpoint} (weight groups {', '.join(groups)}) -> {decision.describe()}"


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
