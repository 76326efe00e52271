"""``thinkrl export`` of a sharded SmolLM2-135M checkpoint: peak memory of the whole-model path vs streaming.

Run from the repository root (about 5 minutes on 2 cores, most of it the training run; ``--checkpoint`` reuses a
sharded checkpoint-<step>/ folder instead):

    .venv/bin/python scripts/bench_export.py [--recipe configs/smollm2/gsm8k_cpu.yaml] [--checkpoint DIR] [--json F]

Checkpoint. A real 2-process ``thinkrl train`` of the recipe with trainer.sharding=fsdp2 (gloo), one step, a
checkpoint after it (``TRAIN`` below): ``checkpoint-1/sharded/`` holds the models, head and AdamW state.

Memory. Each variant runs in a fresh process (this file's worker) that, after torch, transformers and thinkrl are
imported, measures its peak resident-set growth over the export as ``scripts/bench_memory.py`` measures a step: heap
trimmed, peak mark reset, VmHWM after minus VmRSS before, glibc serving every allocation of 64 KiB or more from its
own mapping so that freed tensors leave the resident set.
- whole: what ``thinkrl export`` did before streaming: the roles built whole (the pretrained weights loaded), the
  checkpoint's full model state loaded into them by DCP (``distributed.checkpoint.load_sharded``), peft's
  ``merge_and_unload`` and ``save_pretrained``;
- streamed: ``thinkrl export`` now (``export.export_checkpoint``: one tensor at a time, no model built).
The two folders must be the same (files, config, tokenizer; tensors bit for bit): exit code 1 when they are not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loading import ENV, LAUNCH, ROOT, TRAIN  # noqa: E402  (the same 2-process CPU launch and recipe)

TRAIN = [*TRAIN, "trainer.max_steps=1", "trainer.save_every=1"]  # later overrides win: one step, its checkpoint
VARIANTS = ("whole", "streamed")


def _whole_export(checkpoint: Path, out: Path) -> None:
    """The export as it was: whole models, the full checkpoint loaded into them, merged and saved by transformers."""
    from safetensors.torch import save_file

    from thinkrl.config import load_config
    from thinkrl.distributed.checkpoint import load_sharded
    from thinkrl.eval.setup import _build

    roles = _build(load_config(checkpoint.parent / "config.yaml"))
    load_sharded(checkpoint, roles)
    for group, model in roles.models.items():
        plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        plain.save_pretrained(out / group)
        roles.tokenizer.save_pretrained(out / group)
    head = {k: v.contiguous() for k, v in roles.head.state_dict().items()}
    save_file(head, str(out / "head.safetensors"), metadata={"form": roles.head.form})
    recorded = {"roles": roles.role_group, "head_form": roles.head.form, "checkpoint": str(checkpoint)}
    (out / "roles.json").write_text(json.dumps(recorded, indent=2))


def worker(variant: str, checkpoint: str, out: str) -> None:
    """One fresh process: the export's peak RSS growth, written to ``out``.json."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    from bench_memory import _follow_live_memory, measure

    import thinkrl.eval.setup  # noqa: F401  (imported before the measurement, as the modules below)
    from thinkrl.config import load_config
    from thinkrl.export import _skeleton, export_checkpoint
    from thinkrl.models.roles import build_tokenizer

    torch.set_num_threads(1)
    _follow_live_memory()
    # Both paths import the same modules lazily (transformers' model classes, the tokenizer's): load them first, so
    # the figures are the exports' own memory, not the interpreter's code and caches.
    cfg = load_config(Path(checkpoint).parent / "config.yaml")
    _skeleton(cfg.model.spec(cfg.model.weight_groups[0]), build_tokenizer(cfg), cfg)

    def run() -> float:
        if variant == "whole":
            Path(out).mkdir(parents=True)
            _whole_export(Path(checkpoint), Path(out))
        else:
            export_checkpoint(checkpoint, out)
        return 0.0

    row = measure(run, torch.device("cpu"))
    Path(f"{out}.json").write_text(json.dumps({"variant": variant, **row}))


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two export folders: file lists, tensors (bitwise), metadata, every other file's bytes
    (roles.json's checkpoint path and thinkrl's folder stamp aside)."""
    import torch
    from safetensors import safe_open

    files = [
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        for root in (a, b)
    ]
    if files[0] != files[1]:
        return [f"files: {files[0]} vs {files[1]}"]
    found = []
    for name in files[0]:
        if name.endswith(".safetensors"):
            with safe_open(a / name, "pt") as x, safe_open(b / name, "pt") as y:
                if set(x.keys()) != set(y.keys()) or x.metadata() != y.metadata():
                    found.append(f"{name}: tensor names or metadata")
                    continue
                found += [f"{name}: {k}" for k in x.keys() if not torch.equal(x.get_tensor(k), y.get_tensor(k))]
        elif name == "roles.json":
            ra, rb = (json.loads((root / name).read_text()) for root in (a, b))
            if {**ra, "checkpoint": ""} != {**rb, "checkpoint": ""}:
                found.append(name)
        elif (a / name).read_bytes() != (b / name).read_bytes():
            found.append(name)
    return found


def sharded_checkpoint(recipe: str, tmp: Path) -> Path:
    out = tmp / "train"
    cmd = [*LAUNCH, "-m", "thinkrl", "train", "--config", recipe, *TRAIN, f"trainer.output_dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_export: the training run failed:\n{done.stderr[-3000:]}")
    return out / "checkpoint-1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/smollm2/gsm8k_cpu.yaml")
    parser.add_argument("--checkpoint", help="a sharded checkpoint-<step>/ folder to export (else one is trained)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else sharded_checkpoint(args.recipe, tmp)
        if not (checkpoint / "sharded" / ".metadata").is_file():
            sys.exit(f"bench_export: {checkpoint} is not a sharded checkpoint (no sharded/.metadata)")
        rows = {}
        for variant in VARIANTS:
            out = tmp / variant
            cmd = [sys.executable, __file__, "--worker", variant, "--checkpoint", str(checkpoint), "--out", str(out)]
            done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bench_export: the {variant} export failed:\n{done.stderr[-3000:]}")
            rows[variant] = json.loads(Path(f"{out}.json").read_text())
        differ = differences(tmp / "whole", tmp / "streamed")
        params_mb = sum(p.stat().st_size for p in (tmp / "streamed").rglob("*.safetensors")) / 2**20
    whole, streamed = rows["whole"], rows["streamed"]
    print(f"\nthinkrl export of {checkpoint.name} (sharded, {params_mb:.0f} MB of safetensors written), one process\n")
    print("| path | peak RSS growth (MB) | seconds |")
    print("|---|---|---|")
    for variant in VARIANTS:
        print(f"| {variant} | {rows[variant]['peak_mb']:.0f} | {rows[variant]['seconds']:.1f} |")
    ratio = streamed["peak_mb"] / whole["peak_mb"]
    print(
        f"\nstreamed / whole: {ratio:.3f}; outputs {'identical' if not differ else 'DIFFER: ' + ', '.join(differ[:5])}"
    )
    if args.json:
        report = {"rows": rows, "ratio": ratio, "written_mb": params_mb, "differences": differ}
        Path(args.json).write_text(json.dumps(report, indent=2))
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
