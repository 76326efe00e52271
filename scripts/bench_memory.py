"""Peak memory of one training step: full-logits losses vs memory-lean losses, with and without gradient checkpointing.

Run from the repository root:

    .venv/bin/python scripts/bench_memory.py                      # SmolLM2-135M, CUDA if available, else CPU
    .venv/bin/python scripts/bench_memory.py --device cpu --threads 2 --json memory.json
    .venv/bin/python scripts/bench_memory.py --quick --json /tmp/quick.json   # tiny scratch model (the test)
    .venv/bin/python scripts/bench_memory.py --recipe configs/quiet_star/tiny_shakespeare.yaml --threads 2

``--recipe PATH [overrides]`` measures a recipe's own training step instead: the trainer is built (``Trainer``, its
batches, sampler and optimizer; no warm-up, no evaluation) and ``Trainer.step()`` runs twice, each measured as below.
Next to each step's measured peak growth it prints ``thinkrl plan``'s figure for that step (``run/memory_plan.py``,
``device=cpu``, at the batch's own longest context and thought) and their ratio, and the FLOPs the step logged
(``compute/flops``) next to the plan's, at the batch's lengths and at the recipe's maxima (a bound).

Setting (the default): ``smollm2-135m-instruct`` as one shared model (base = reasoner = interpreter), the
``configs/smollm2/gsm8k_cpu.yaml`` recipe (gate head at 0.5, null thought in the baseline group, GSM8K
positions just before the answer, context up to 256 tokens, n_ahead 6), but K = 8 thoughts of exactly 32 tokens
(``rollout.length_mode=fixed``) at the first 8 GSM8K training positions, in float32.

One training step = sampling the K thoughts (HF actor, no grad) + scoring (interpreter/base forwards, mixing head)
+ ``compute_loss`` + ``loss.backward()`` + gradient clipping + AdamW step + ``zero_grad`` — the trainer's
rollout → score_and_loss → backward → optimizer phases, from its own functions. Sampling seeds are fixed, so every
variant samples the same thoughts and must compute the same loss (the table's last column; a difference above
1e-4 · max(1, |loss|) fails the run with exit code 1).

Variants (``--variants``, comma-separated; the first is the baseline the ratios divide by):
  full        learner.lean_losses=false: log-distributions (rows, V) of scores and policy from full logits
  full+gc     the same, with model.default.gradient_checkpointing=true
  lean        learner.lean_losses=true (the default): target log-probs, policy log-probs and entropies from hidden
              states through the LM heads in checkpointed row chunks, never a (rows, V) float32 tensor
  lean+gc     lean losses and gradient checkpointing of every decoder layer

Each variant runs in a fresh process (forked from a forkserver that has only imported the libraries), builds the
models, optimizer and batch, then runs two steps. Step 1 is the step right after the build (AdamW allocates its
state in it); step 2 is a steady-state step (the optimizer state exists, gradients were set to None). Memory:
  CUDA  ``torch.cuda.max_memory_allocated()`` over the step (peak counter reset just before) minus the memory
        allocated just before it; the JSON also holds the absolute peak.
  CPU   resident-set growth: before each step free heap pages go back to the system (glibc ``malloc_trim``), the
        peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``) and the figure is VmHWM after the step minus
        VmRSS before it — for step 1 that is the peak RSS minus the RSS after the models were built. Where
        clear_refs cannot be written, ``getrusage(RUSAGE_SELF).ru_maxrss`` growth over the step (a lower bound);
        the output says which. The measuring process sets glibc's mmap threshold to 64 KiB first, so that every
        tensor of that size has its own mapping, returned when freed: with glibc's default (a threshold that rises
        to 32 MiB as large blocks are freed) freed activations stay in the heap, and the peak RSS then says more
        about fragmentation than about what the step holds (it put lean+gc level with full+gc). This makes CPU
        steps slower (a page fault per touched page of every new tensor), in every variant alike.
Wall time of each step is printed too (on CUDA after a synchronize).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see bench_rollout.py)

import torch

from thinkrl.timing import max_rss_kb, proc_status_kb

# transformers and the project's model code take seconds to import: only the forkserver imports them, once.
HEAVY_MODULES = [
    "transformers",
    "thinkrl.config",
    "thinkrl.data.sources",
    "thinkrl.rl.learner",
    "thinkrl.models.roles",
    "thinkrl.prompts",
    "thinkrl.rollout.hf_actor",
    "thinkrl.rl.scoring",
]
VARIANTS = {
    "full": ["learner.lean_losses=false"],
    "full+gc": ["learner.lean_losses=false", "model.default.gradient_checkpointing=true"],
    "lean": ["learner.lean_losses=true"],
    "lean+gc": ["learner.lean_losses=true", "model.default.gradient_checkpointing=true"],
}
SMOLLM2 = [  # configs/smollm2/gsm8k_cpu.yaml, with the benchmark's K, thought length and batch
    "model.weight_groups=[A,A,A]",
    "model.default.path=smollm2-135m-instruct",
    "head.form=gate",
    "head.init_weight=0.5",
    "data.source=gsm8k",
    "data.context_len=256",
    "data.n_ahead=6",
    "data.max_docs=64",  # the benchmark reads 8 positions: no need to tokenize all of GSM8K
    "learner.include_null=true",
    "learner.lr=1.0e-5",
    "learner.role_lr={head: 1.0e-3}",
]
QUICK = [  # a tiny scratch Llama on the synthetic task: the smoke test's setting
    "model.weight_groups=[A,A,A]",
    "model.default.scratch.hidden_size=32",
    "model.default.scratch.num_layers=2",
    "model.default.scratch.num_heads=2",
    "model.default.scratch.intermediate_size=64",
    "head.form=gate",
    "data.source=synthetic",
    "data.interpreter_window=0",
    "data.n_ahead=2",
]
LOSS_TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument(
        "--variants", default="full,full+gc,lean,lean+gc", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    p.add_argument("--k", type=int, default=8, help="K thoughts per position")
    p.add_argument("--thought-len", type=int, default=32, help="thought tokens (fixed length)")
    p.add_argument("--positions", type=int, default=8, help="thought positions in the step's batch")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the settings and every row here")
    p.add_argument("--quick", action="store_true", help="tiny scratch model, K=4, thoughts of 8, 4 positions (test)")
    p.add_argument("--recipe", default="", help="measure this recipe's own training step against thinkrl plan")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides applied last, e.g. a SmolLM2-shaped scratch model where the package is absent",
    )
    args = p.parse_args(argv)
    if args.json:  # refuse before measuring anything: a file of someone else's is never overwritten
        from thinkrl.errors import ConfigError
        from thinkrl.output_folder import check_output_file

        try:
            check_output_file(args.json, "bench_memory")
        except ConfigError as exc:
            p.error(str(exc))
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.quick:
        args.k, args.thought_len, args.positions = 4, 8, 4
    if args.recipe and not os.path.isfile(args.recipe):
        p.error(f"--recipe {args.recipe} is not a file")
    return args


# ----------------------------------------------------------------------------------------------------------------
# One variant (runs in a fresh process)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    variant: str
    device: str
    quick: bool
    k: int
    thought_len: int
    positions: int
    threads: int
    seed: int
    output_dir: str
    overrides: tuple = ()


def build_config(job: Job):
    from thinkrl.config import load_config

    return load_config(
        None,
        [
            *(QUICK if job.quick else SMOLLM2),
            f"rollout.num_thoughts={job.k}",
            f"rollout.max_thought_len={job.thought_len}",
            "rollout.length_mode=fixed",
            f"rollout.batch_positions={job.positions}",
            f"trainer.batch_positions={job.positions}",
            "trainer.report_to=none",
            f"trainer.output_dir={job.output_dir}",
            f"trainer.seed={job.seed}",
            *VARIANTS[job.variant],
            *job.overrides,
        ],
    )


def _follow_live_memory() -> bool:
    """glibc: serve every allocation of 64 KiB or more with its own mapping, returned to the system when freed (a
    fixed ``M_MMAP_THRESHOLD`` also stops glibc from raising it as large blocks are freed). Then the resident set
    follows the live tensors instead of what the heap kept from earlier phases. Returns whether it took."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16) == 1  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(step, device: torch.device) -> dict:
    """Run ``step`` once: {loss, seconds, peak_mb, peak_abs_mb, memory_method} (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        method = "cuda max_memory_allocated - allocated before the step"
        return dict(
            loss=loss, seconds=seconds, peak_mb=(peak - before) / 2**20, peak_abs_mb=peak / 2**20, method=method
        )
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        before = proc_status_kb("VmRSS")
        method = "cpu rss: VmHWM after - VmRSS before (peak mark reset)"
    except OSError:
        before = None
    if before is None:
        before, method = max_rss_kb(), "cpu ru_maxrss growth over the step (lower bound)"
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    peak = proc_status_kb("VmHWM") if method.startswith("cpu rss") else max_rss_kb()
    return dict(loss=loss, seconds=seconds, peak_mb=(peak - before) / 1024, peak_abs_mb=peak / 1024, method=method)


def run_job(job: Job) -> dict:
    """Build models, optimizer and batch; then two measured training steps."""
    import transformers

    from thinkrl.data.sources import build_pools
    from thinkrl.models.roles import build_roles
    from thinkrl.prompts import null_thought_ids
    from thinkrl.rl.learner import PositionScoring, build_optimizer, compute_loss
    from thinkrl.rl.scoring import Scorer
    from thinkrl.rollout.hf_actor import HFRolloutActor

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    live_rss = device.type == "cpu" and _follow_live_memory()
    cfg = build_config(job)
    torch.manual_seed(job.seed)
    roles = build_roles(cfg)
    for module in roles.modules().values():
        module.to(device)
    pool, _ = build_pools(cfg.data, roles.tokenizer, job.seed)
    if len(pool) < job.positions:
        raise SystemExit(f"the data has {len(pool)} positions, fewer than --positions {job.positions}")
    positions = [pool[i] for i in range(job.positions)]
    contexts, targets = [p.context_ids for p in positions], [p.target_ids for p in positions]
    pad = roles.tokenizer.pad_token_id
    actor = HFRolloutActor(cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, pad)
    null_ids = null_thought_ids(cfg.rollout.null_thought, roles.tokenizer)
    scorer = Scorer(roles, null_ids, cfg.data.interpreter_window, cfg.reward.source)
    optimizer, scheduler = build_optimizer(cfg, roles)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    seeds = list(range(1000 + job.seed, 1000 + job.seed + job.positions))  # the same thoughts in every step/variant

    def step() -> float:
        thoughts = actor.sample(contexts, cfg.rollout.num_thoughts, seeds)
        out = compute_loss(cfg, PositionScoring(roles, scorer, contexts, targets), thoughts)
        out.loss.backward()
        if cfg.learner.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.learner.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    first = measure(step, device)
    second = measure(step, device)
    if live_rss:
        for figures in (first, second):
            figures["method"] += ", glibc mmap threshold 64 KiB"
    return {
        **asdict(job),
        "params_m": sum(p.numel() for m in roles.models.values() for p in m.parameters()) / 1e6,
        "vocab": len(roles.tokenizer),
        "context_tokens": sum(len(c) for c in contexts),
        "step1": first,
        "step2": second,
    }


def run_recipe_job(recipe: str, overrides: tuple, threads: int, output_dir: str) -> dict:
    """The recipe's trainer, two measured ``Trainer.step()`` calls, and the plan of each step's batch."""
    import transformers

    from thinkrl.config import load_config
    from thinkrl.run.memory_plan import fmt_bytes, plan, resolve_archs
    from thinkrl.run.trainer import Trainer

    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    live_rss = _follow_live_memory()
    quiet = ["trainer.report_to=none", "trainer.progress=false", f"trainer.output_dir={output_dir}/run"]
    cfg = load_config(recipe, [*quiet, *overrides])
    archs = resolve_archs(cfg)
    trainer = Trainer(cfg)
    steps = []
    for _ in range(2):
        box = {}

        def step(box=box):
            box["out"] = trainer.step()
            return float(box["out"][0].get("train/loss", float("nan")))

        figures = measure(step, torch.device("cpu"))
        metrics, positions, thoughts, _ = box["out"]
        context = max(len(p.context_ids) for p in positions)
        longest = int(thoughts.lengths.max()) if thoughts is not None and thoughts.lengths.numel() else 0
        at_batch = plan(cfg, archs, device="cpu", context=context, thought_len=longest, knobs=False)
        figures.update(
            context=context,
            thought_len=longest,
            logged_flops=metrics["compute/flops"],
            plan_flops=at_batch.flops_step,
            plan_phases={k: v / 2**20 for k, v in at_batch.phases.items()},
        )
        steps.append(figures)
    bound = plan(cfg, archs, device="cpu", knobs=False)
    steps[0]["plan_mb"] = (
        plan(
            cfg, archs, device="cpu", context=steps[0]["context"], thought_len=steps[0]["thought_len"], knobs=False
        ).step1_growth
        / 2**20
    )
    steps[1]["plan_mb"] = (
        plan(
            cfg, archs, device="cpu", context=steps[1]["context"], thought_len=steps[1]["thought_len"], knobs=False
        ).step2_growth
        / 2**20
    )
    trainer.close()
    if live_rss:
        for figures in steps:
            figures["method"] += ", glibc mmap threshold 64 KiB"
    return {
        "recipe": recipe,
        "overrides": list(overrides),
        "step1": steps[0],
        "step2": steps[1],
        "bound_flops": bound.flops_step,
        "bound_step1_mb": bound.step1_growth / 2**20,
        "weights": fmt_bytes(bound.memory["weights"]),
        "params_m": sum(g["params"] for k, g in bound.groups.items() if k != "head") / 1e6,
    }


def print_recipe_table(row: dict) -> None:
    print()
    print(
        f"{'step':<6} {'measured MB':>12} {'plan MB':>9} {'plan/meas':>9} {'context':>8} {'thought':>8} "
        f"{'logged FLOPs':>14} {'plan FLOPs':>12} {'seconds':>8}"
    )
    for name in ("step1", "step2"):
        s = row[name]
        ratio = s["plan_mb"] / s["peak_mb"] if s["peak_mb"] > 0 else float("nan")
        print(
            f"{name:<6} {s['peak_mb']:>12.1f} {s['plan_mb']:>9.1f} {ratio:>9.2f} {s['context']:>8} "
            f"{s['thought_len']:>8} {s['logged_flops']:>14.4e} {s['plan_flops']:>12.4e} {s['seconds']:>8.2f}"
        )
    print(
        f"\nplan at the recipe's maximum lengths: step-1 growth {row['bound_step1_mb']:.1f} MB, "
        f"FLOPs {row['bound_flops']:.4e} (a bound for every step); {row['params_m']:.1f}M parameters"
    )
    print(
        f"MB: peak memory of the step above what was held just before it ({row['step1']['method']}); plan: "
        "thinkrl plan's growth for that step at the batch's longest context and thought (step1 with AdamW's state)."
    )


def run_fresh(pool_ctx, job: Job) -> dict:
    """``run_job`` in a fresh process (forked from the forkserver, which holds only the imported libraries)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=pool_ctx) as pool:
        return pool.submit(run_job, job).result()


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> bool:
    """The table of every variant against the first; returns whether every loss agrees with the baseline's."""
    base = rows[0]
    ok = True
    print()
    print(
        f"{'variant':<9} {'step1 MB':>9} {'ratio':>6} {'step2 MB':>9} {'ratio':>6} {'step1 s':>8} {'step2 s':>8} "
        f"{'loss':>10} {'|dloss|':>8}"
    )
    for row in rows:
        s1, s2 = row["step1"], row["step2"]
        r1 = s1["peak_mb"] / base["step1"]["peak_mb"] if base["step1"]["peak_mb"] > 0 else float("nan")
        r2 = s2["peak_mb"] / base["step2"]["peak_mb"] if base["step2"]["peak_mb"] > 0 else float("nan")
        dloss = abs(s1["loss"] - base["step1"]["loss"])
        ok &= dloss <= LOSS_TOLERANCE * max(1.0, abs(base["step1"]["loss"]))
        print(
            f"{row['variant']:<9} {s1['peak_mb']:>9.1f} {r1:>6.2f} {s2['peak_mb']:>9.1f} {r2:>6.2f} "
            f"{s1['seconds']:>8.2f} {s2['seconds']:>8.2f} {s1['loss']:>10.5f} {dloss:>8.1e}"
        )
    return ok


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.recipe:
        return main_recipe(args)
    device = args.device
    where = (
        torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"{os.cpu_count()} cores, threads {args.threads or torch.get_num_threads()}"
    )
    model = (
        "tiny scratch Llama (hidden 32, 2 layers), synthetic task" if args.quick else "smollm2-135m-instruct, GSM8K"
    )
    print(f"device    {device} ({where})  torch {torch.__version__}  transformers {version('transformers')}")
    print(
        f"settings  {model}  K={args.k} thoughts x {args.thought_len} tokens (fixed)  {args.positions} positions  "
        f"float32  variants {','.join(args.variants)} (baseline {args.variants[0]})"
        + (f"  overrides {' '.join(args.overrides)}" if args.overrides else "")
    )
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *HEAVY_MODULES])  # imported once; each variant forks a fresh child
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for variant in args.variants:
            job = Job(
                variant,
                device,
                args.quick,
                args.k,
                args.thought_len,
                args.positions,
                args.threads,
                args.seed,
                tmp,
                tuple(args.overrides),
            )
            row = run_fresh(ctx, job)
            rows.append(row)
            print(
                f"  {variant:<8} step1 +{row['step1']['peak_mb']:.1f} MB {row['step1']['seconds']:.2f} s  "
                f"step2 +{row['step2']['peak_mb']:.1f} MB {row['step2']['seconds']:.2f} s  "
                f"loss {row['step1']['loss']:.6f}",
                flush=True,
            )
    ok = print_table(rows)
    print(
        f"\nMB: peak memory of the step above what was held just before it ({rows[0]['step1']['method']}); "
        "step1 = the first step after building the models (AdamW allocates its state in it), step2 = a "
        "steady-state step. "
        f"ratio: / {args.variants[0]}. |dloss|: |loss - {args.variants[0]}'s loss| (same seeds, same thoughts)."
    )
    print(
        f"context tokens of the batch {rows[0]['context_tokens']}, vocabulary {rows[0]['vocab']}, "
        f"{rows[0]['params_m']:.1f}M parameters; total wall time {time.perf_counter() - start:.0f} s"
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump(
                {
                    "written_by": "bench_memory",
                    "settings": settings,
                    "device": device,
                    "device_name": where,
                    "rows": rows,
                },
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    if not ok:
        print("WARNING: the variants' losses differ; they did not do the same work", file=sys.stderr)
        sys.exit(1)


def main_recipe(args) -> None:
    print(
        f"device    cpu ({os.cpu_count()} cores, threads {args.threads or torch.get_num_threads()})  "
        f"torch {torch.__version__}  transformers {version('transformers')}"
    )
    print(f"recipe    {args.recipe} {' '.join(args.overrides)}")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *HEAVY_MODULES, "thinkrl.run.trainer"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            row = pool.submit(run_recipe_job, args.recipe, tuple(args.overrides), args.threads, tmp).result()
    print_recipe_table(row)
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"written_by": "bench_memory", "settings": vars(args), "device": "cpu", "recipe": row}, f, indent=1
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
