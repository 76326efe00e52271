"""Step time of 2-process DDP with gradients averaged per parameter (before) and in buckets during backward (after).

    python scripts/bench_grad_buckets.py [--steps 4] [--out runs/bench-grad-buckets] [overrides ...]

Starts itself in 2 processes under ``accelerate launch --config_file configs/accelerate/cpu-2proc.yaml`` (gloo on
CPU) on the SmolLM2-135M-Instruct GSM8K recipe (``configs/smollm2/gsm8k_cpu.yaml``), made lighter by default so that
the reduction of its 163M gradients (0.65 GB in fp32) is not lost in the forwards: 2 positions per step (one per
process), 2 thoughts of 8 tokens, contexts of 128 tokens. One Trainer takes ``--steps`` rounds of one step in each
setting, each setting first in turn so that drift hits all alike; the first round is a warm-up and is not counted:

- ``trainer.grad_bucket_mb=0``: one blocking all-reduce per parameter after backward (the loop before);
- buckets of 25 MB (DDP's size) all reduced after backward (``GradBucketReducer.overlap=False``): fewer calls only;
- buckets of 25 MB reduced from the gradient hooks while backward runs (the trainer's default).

It prints, per setting, the median of the wall time of ``Trainer.step``, of ``timing/backward`` and of
``timing/optimizer`` (which includes the wait for the reduction), the all-reduces per step on each process
(``train/grad_collectives``) and the ratios of the step times. Extra ``key=value`` overrides go to the recipe.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/smollm2/gsm8k_cpu.yaml"
LIGHTER = [
    "trainer.batch_positions=2",
    "rollout.num_thoughts=2",
    "rollout.max_thought_len=8",
    "data.context_len=128",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.dump_rollouts=false",
    "trainer.resume=never",
    "trainer.max_steps=1000",
]
# (name, trainer.grad_bucket_mb, buckets reduced from the hooks during backward)
SETTINGS = (
    ("per parameter", 0.0, False),
    ("buckets after backward", 25.0, False),
    ("buckets during backward", 25.0, True),
)


def launch(args, overrides: list[str]) -> None:
    from thinkrl.models.smollm2 import smollm2_folder

    smollm2_folder()  # converted once here, not by both processes at once
    config = ROOT / "configs/accelerate/cpu-2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), __file__, "--worker"]
    cmd += ["--steps", str(args.steps), "--out", str(args.out), *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    sys.exit(subprocess.run(cmd, cwd=ROOT, env=env).returncode)


def worker(args, overrides: list[str]) -> None:
    from thinkrl.config import load_config
    from thinkrl.run.trainer import Trainer

    cfg = load_config(RECIPE, [*LIGHTER, f"trainer.output_dir={args.out}", *overrides])
    trainer = Trainer(cfg, overwrite=True)
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in SETTINGS}
    for round_ in range(args.steps + 1):
        for name, mb, overlap in SETTINGS[round_ % 3 :] + SETTINGS[: round_ % 3]:  # each setting first in turn
            trainer.cfg.trainer.grad_bucket_mb = mb
            reducer = trainer._reducer_for(trainer._trainable())  # built, or dropped for mb=0, before the step
            if reducer is not None:
                reducer.overlap = overlap
            trainer.timings, trainer._grad_collectives = {}, 0
            started = time.perf_counter()
            trainer.step()
            row = {**trainer.timings, "step": time.perf_counter() - started, "calls": trainer._grad_collectives}
            if round_:  # the first round warms up allocators and caches
                rows[name].append(row)
            if trainer.is_main:
                print(f"round {round_} {name}: {row['step']:.3f} s", flush=True)
    if not trainer.is_main:
        return
    params = sum(p.numel() for p in trainer._trainable())
    world = trainer.accelerator.num_processes
    print(f"\nSmolLM2-135M, {world} processes (gloo, CPU), {params / 1e6:.1f}M trainable parameters")
    print(f"medians of {args.steps} steps per setting")
    print("| gradient averaging | step | backward | optimizer (incl. wait) | all-reduces per step |")
    print("|---|---|---|---|---|")
    med = {}
    for name, mb, _ in SETTINGS:
        r = rows[name]
        med[name] = statistics.median(x["step"] for x in r)
        back = statistics.median(x.get("timing/backward", 0.0) for x in r)
        opt = statistics.median(x.get("timing/optimizer", 0.0) for x in r)
        calls = ", ".join(map(str, sorted({x["calls"] for x in r})))
        print(f"| {name} (grad_bucket_mb={mb:g}) | {med[name]:.3f} s | {back:.3f} s | {opt:.3f} s | {calls} |")
    before = med[SETTINGS[0][0]]
    for name, _, _ in SETTINGS[1:]:
        print(f"step time {name} / per parameter = {med[name] / before:.3f}")
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="counted rounds (one step of each setting per round)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench-grad-buckets")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    (worker if args.worker else launch)(args, overrides)


if __name__ == "__main__":
    main()
