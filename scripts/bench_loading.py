"""Sharded loading of SmolLM2-135M in 2 processes: today's whole load then shard vs the meta device + per-shard reads.

Run from the repository root (about 4 minutes on 2 cores; ``--skip-training`` leaves out the two training runs):

    .venv/bin/python scripts/bench_loading.py [--recipe configs/smollm2/gsm8k_cpu.yaml] [--json out.json]

Memory. For each variant (model.sharded_loading = full | meta, without and with LoRA) one 2-process
``accelerate launch`` (gloo, fsdp2) runs this file's worker: after torch, transformers and thinkrl are imported, each
process measures its peak resident-set growth over building the recipe's models and sharding them (the trainer's own
``build_roles`` + ``shard_roles``), as ``scripts/bench_memory.py`` measures a step: heap trimmed, peak mark reset,
VmHWM after minus VmRSS before, with glibc serving every allocation of 64 KiB or more from its own mapping, so that
freed tensors leave the resident set. The table gives each process's growth and meta / full. Target: at most 0.6.

Training. Two real ``thinkrl train`` runs of the recipe in 2 processes with trainer.sharding=fsdp2, 2 steps, one per
loading mode: the first step's loss and every weight after 2 steps must agree (1e-5 and 1e-6). Exit code 1 when
they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu-2proc.yaml"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
VARIANTS = {"plain": [], "lora": ["model.default.lora.r=16"]}
TRAIN = [
    "trainer.max_steps=2",
    "trainer.save_every=2",
    "trainer.eval_every=0",
    "trainer.batch_positions=2",
    "data.eval_positions=2",
    "rollout.num_thoughts=2",
    "rollout.max_thought_len=4",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.sharding=fsdp2",
]


def worker(mode: str, recipe: str, overrides: list[str], out: str) -> None:
    """One process of a 2-process launch: the loading's peak RSS growth, written to ``out``.rank<i>.json."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from functools import partial

    import torch
    from bench_memory import _follow_live_memory, measure

    from thinkrl.config import load_config
    from thinkrl.distributed.sharding import mixed_precision, shard_roles, shard_sizes
    from thinkrl.models.meta_loading import fill_sharded
    from thinkrl.models.roles import build_roles

    torch.distributed.init_process_group("gloo")  # the launcher's environment: rank, world size, address
    rank = torch.distributed.get_rank()
    torch.set_num_threads(1)
    _follow_live_memory()
    cfg = load_config(recipe, overrides)
    box = {}

    def load() -> float:
        roles = build_roles(cfg, meta=mode == "meta")
        shard_roles(roles, torch.device("cpu"), mixed_precision("no"), partial(fill_sharded, cfg, roles.tokenizer))
        box["roles"] = roles  # held through the measurement: the shards are what a process keeps
        return 0.0

    row = measure(load, torch.device("cpu"))
    sizes = shard_sizes(box["roles"])
    row.update(rank=rank, mode=mode, params=sum(s["full"] for s in sizes.values()))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(row))
    torch.distributed.barrier()


def memory(recipe: str, tmp: Path) -> list[dict]:
    rows = []
    for variant, overrides in VARIANTS.items():
        for mode in ("full", "meta"):
            out = tmp / f"{variant}-{mode}"
            cmd = [*LAUNCH, __file__, "--worker", mode, "--recipe", recipe, "--out", str(out), *overrides]
            done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bench_loading: the {variant}/{mode} launch failed:\n{done.stderr[-3000:]}")
            for rank in (0, 1):
                rows.append({"variant": variant, **json.loads(Path(f"{out}.rank{rank}.json").read_text())})
    print(f"\npeak RSS growth while building and sharding the models ({recipe}, 2 processes, gloo)\n")
    print("| variant | process | full (MB) | meta (MB) | meta / full |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        for rank in (0, 1):
            full, meta = (
                next(r for r in rows if r["variant"] == variant and r["mode"] == m and r["rank"] == rank)["peak_mb"]
                for m in ("full", "meta")
            )
            print(f"| {variant} | {rank} | {full:.0f} | {meta:.0f} | {meta / full:.2f} |")
    return rows


def training(recipe: str, tmp: Path) -> dict:
    """Both loading modes trained 2 steps: first-step loss and weights after 2 steps, compared."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    runs, weights = {}, {}
    for mode in ("full", "meta"):
        out = tmp / f"train-{mode}"
        cmd = [*LAUNCH, "-m", "thinkrl", "train", "--config", recipe, *TRAIN]
        cmd += [f"trainer.output_dir={out}", f"model.sharded_loading={mode}"]
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"bench_loading: the {mode} training run failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = next(r for r in rows if r["step"] == 1 and "train/loss" in r)["train/loss"]
        dcp_to_torch_save(out / "checkpoint-2" / "sharded", tmp / f"{mode}.pt")
        weights[mode] = torch.load(tmp / f"{mode}.pt", map_location="cpu", weights_only=False)["model"]
    diff = max(float((weights["full"][k].float() - weights["meta"][k].float()).abs().max()) for k in weights["full"])
    result = {"loss_full": runs["full"], "loss_meta": runs["meta"], "weights_max_diff": diff}
    print("\ntraining, 2 processes, fsdp2, 2 steps")
    print(f"  first-step loss: full {runs['full']:.7f}, meta {runs['meta']:.7f}")
    print(f"  weights after 2 steps: max |full - meta| = {diff:.3g} over {len(weights['full'])} tensors")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/smollm2/gsm8k_cpu.yaml")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--worker", choices=["full", "meta"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        worker(args.worker, args.recipe, overrides, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = {"memory": memory(args.recipe, Path(tmp))}
        if not args.skip_training:
            report["training"] = training(args.recipe, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    t = report.get("training")
    if t and (abs(t["loss_full"] - t["loss_meta"]) > 1e-5 or t["weights_max_diff"] > 1e-6):
        sys.exit(1)


if __name__ == "__main__":
    main()
