"""``thinkrl export CHECKPOINT OUT_DIR``: a training checkpoint (sharded or not) as plain HF folders.

OUT_DIR gets one folder per weight group (``A/``, ``B/``...: config, safetensors, tokenizer; LoRA adapters merged
in, so transformers and vLLM load them as they are), ``head.safetensors`` with the mixing head and ``roles.json``
saying which folder plays which role. It runs in one process: a sharded checkpoint is gathered on load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from thinkrl.errors import ConfigError


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    from thinkrl.eval.setup import load_setup

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "trainer_state.json").is_file():
        raise ConfigError(f"{checkpoint} is not a complete checkpoint folder (checkpoint-<step>/ of a thinkrl run)")
    setup = load_setup(str(checkpoint), None, [])
    roles = setup.roles
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for group, model in roles.models.items():
        plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        plain.save_pretrained(tmp / group)
        roles.tokenizer.save_pretrained(tmp / group)
    head = {k: v.contiguous() for k, v in roles.head.state_dict().items()}
    save_file(head, str(tmp / "head.safetensors"), metadata={"form": roles.head.form})
    (tmp / "roles.json").write_text(
        json.dumps({"roles": roles.role_group, "head_form": roles.head.form, "checkpoint": str(checkpoint)}, indent=2)
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} to {out} (roles.json says which folder plays which role)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint (sharded or not) as plain HF folders, one per weight group")
    p.add_argument("checkpoint", help="a checkpoint-<step>/ folder of a thinkrl run")
    p.add_argument("out_dir", help="folder to write (replaced when it exists)")
    p.set_defaults(func=_export)
