"""Cost of one training step with a thought at every token: parallel passes vs per-position vs plain LM training,
and the trainer's own step (``thinkrl train``) at the same shapes.

Run from the repository root (the main engineer's full grid; ``--quick`` is the test's single tiny setting):

    .venv/bin/python scripts/bench_every_token.py --json every_token.json
    .venv/bin/python scripts/bench_every_token.py --sizes tiny,large --windows 256,1024,2048 --thought-lens 4,8 \\
        --threads 1,2 --batch-windows 2 --repeats 3 --json every_token.json
    .venv/bin/python scripts/bench_every_token.py --quick --json /tmp/quick.json

Setting: B = ``--batch-windows`` windows of L random byte-token ids (L = ``--windows``, alias ``--seqs``, default
64,128,256); a thought position at every token that has n_ahead true tokens after it (slots t = 2 .. L - n_ahead, so N
= B * (L - n_ahead - 1) positions), K thoughts per position, thoughts of exactly m tokens
(``rollout.length_mode=fixed``, m = ``--thought-lens``), so every run does the same work. Models: scratch Llamas of one
shared weight group (Quiet-STaR's setting), byte tokenizer, mlp mixing head; ``tiny`` = hidden 64, 2 layers, 4 heads,
MLP 256 (the Quiet-STaR comparison's size), ``large`` = hidden 512, 8 layers, 8 heads, MLP 2048 (compute-bound on CPU).

One training step, timed from the sampling to the end of the backward pass (the trainer's rollout, score_and_loss
and backward phases; no optimizer step), with the sampling seeds fixed so that every repeat does the same thing:
  parallel      ``HFRolloutActor.sample_windows`` + ``WindowScoring`` + ``compute_loss`` + ``loss.backward()``:
                each window is read once and the thoughts of all its positions grow together, one token per pass.
  per_position  ``HFRolloutActor.sample`` (chunks of ``rollout.batch_positions``=32 positions, as the trainer
                samples) + ``PositionScoring`` + ``compute_loss`` + ``loss.backward()``: every position is its own
                sequence (its context is read again for each position). Cost grows ~ L^2, so it is run for the
                smallest L first and skipped where the L^2 extrapolation of the last measured L says one step would
                take more than ``--max-per-position-s`` (60 s): printed as "skipped (est. N s)".
  plain         the same model's plain LM forward + backward over the same rows: input_ids = the B windows, each
                repeated K times, (B*K, L), labels = input_ids. The baseline: what training without thoughts costs.
Both thought paths sample the same thoughts (same seeds) and must give the same loss: the table's last column is
|loss(parallel) - loss(per_position)| (a mismatch above 1e-4 * max(1, |loss|) fails the run with exit code 1).

What users run (``--no-trainer`` skips it):
  trainer       a real ``thinkrl train`` in a subprocess (``python -m thinkrl train``, the ``thinkrl`` command), with
                ``--config configs/quiet_star/tiny_shakespeare.yaml`` (the Quiet-STaR recipe: learner.baseline mean,
                positive_only, interpreter_null false, base_weight 0.5, entropy_coef 0, mlp head) and overrides that
                give it the row's shapes: the row's scratch size, byte tokenizer, one shared weight group [A,A,A],
                data.source=text on a file of random printable ASCII (one byte token per character) that the bench
                writes into a temporary folder, data.positions=every_k, every_k=1, data.n_ahead=n,
                data.context_len=L - n (a text document is context_len + n_ahead tokens, so each window is L tokens
                with slots t = 2 .. L - n, exactly the isolated step's windows), rollout.fused_passes=auto (the
                default; the recipe's own false is for its 128-wide model), rollout.num_thoughts=K,
                length_mode=fixed, max_thought_len=m, trainer.batch_positions=B * (L - n - 1) (the trainer takes
                batch_positions // slots-per-window = B whole windows per step), num_threads=t, no LM warm-up, no
                evaluation or checkpoint during the run, max_steps = ``--repeats`` + 1. The time is the median of
                the trainer's own ``timing/step`` (from <output_dir>/metrics.jsonl) over the steps after the first;
                each ``timing/<phase>`` (rollout, score_and_loss, backward, optimizer, sync) is the median likewise,
                and ``other`` = step - the phases' sum (drawing the batch and building its tensors, the step's
                statistics and compute accounting). ``timing/step`` is the wall time of ``Trainer.step``: sampling +
                scoring + loss + backward + gradient-norm/clip + optimizer and LR-scheduler step + sampler sync +
                statistics; the evaluation before and after the run, the rollout dump and the final checkpoint lie
                outside it. Differences from the isolated parallel step, which times only sampling + scoring + loss +
                backward: the optimizer step and the statistics; the trainer's compute counters (forward hooks); the
                thoughts' seeds (the trainer draws its own; with fixed-length thoughts the work is the same); and the
                learner settings: the isolated step keeps the config defaults (leave-one-out baseline,
                interpreter_null true: the null thought is scored as a K+1-th row, entropy bonus 0.01), the trainer
                runs the Quiet-STaR preset's (mean baseline, null thought not scored: K rows). The positions the
                trainer thought at per step are counted from its rollout dumps (<output_dir>/rollouts/, one line per
                position) and must equal the isolated step's N (a mismatch fails the run with exit code 1); the
                table prints both (N, N trn).

Ratios printed:
  trn/plain  trainer step / plain step: what a user's step of ``thinkrl train`` costs relative to plain LM training.
  trn/par    trainer step / isolated parallel step: what the trainer adds around the measured passes (less the
             null thought's scoring row, which the Quiet-STaR preset skips: it can be below 1).
  par/plain  parallel step / plain step: the price of thinking at every token relative to ordinary LM training.
             Each parallel step runs about m + 2 + n_ahead token-passes per position (m sampling passes, then the
             teacher-forced <sot> z <eot> y_0..y_{n-2} scoring pass and the null thought, plus backward), so where
             the work is compute-bound this ratio should be of the order of m + 2 + n_ahead; where per-call overhead
             dominates (the tiny model on CPU: 2*m + a few model calls of small tensors) it is larger.
  pp/par     per-position step / parallel step: the speed-up of parallel passes (grows ~ L, since the per-position
             path reads an average context of L/2 tokens per position).
  us/((m+2+n)L)  proportionality check: parallel seconds / ((m + 2 + n_ahead) * L), in microseconds. If a
             step's cost grows in proportion to the thought length + 2 + n_ahead and to the window length, this
             number stays the same across the rows of one model size and thread count; ``rel`` divides it by the
             first such row (smallest m, then smallest L).

Every isolated time is the median of ``--repeats`` timed steps after one warm-up step (``thinkrl.timing.timed_runs``);
the trainer's is the median of its ``--repeats`` steps after its first.

Peak memory of a step (MB), measured on the warm-up step of the measured shape:
  CUDA  ``torch.cuda.max_memory_allocated()`` (reset just before the step) minus the memory allocated before it.
  CPU   peak resident-set growth of the step: each measurement runs in a fresh process (forked from a forkserver
        that has only imported the libraries, so no earlier measurement's allocations or allocator caches are
        present); after building the model and one warm-up step on small windows of n_ahead + 10 tokens (lazy
        library set-up), the process's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), the step runs,
        and the figure is VmHWM after the step minus VmRSS before it. Where clear_refs cannot be written it is the
        growth of ``getrusage(RUSAGE_SELF).ru_maxrss`` over the step, a lower bound; the JSON's ``memory_method``
        says which.
  Both include the step's gradients (they are set to None before each step, as after an optimizer step).
  The trainer column has no memory figure (its process also holds the optimizer state, the evaluation and the
  data; see scripts/bench_memory.py for the trainer's memory).

Device: ``--device``, by default CUDA when ``torch.cuda.is_available()`` (``--threads`` is then ignored), else CPU with
``torch.set_num_threads(t)`` for each t of ``--threads``. ``OMP_WAIT_POLICY=PASSIVE`` unless set (see
bench_rollout.py: spinning OpenMP threads slow every op badly on shared cores). ``--json PATH`` writes every row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import numpy as np
import torch

from thinkrl.timing import default_device, max_rss_kb, proc_status_kb, timed_runs

# transformers and the project's model code take ~8 s to import: only the forkserver imports them (once), and every
# measurement process is forked from it (see ``main``); the parent never needs them.
HEAVY_MODULES = [
    "transformers",
    "thinkrl.config",
    "thinkrl.data.windows",
    "thinkrl.rl.learner",
    "thinkrl.models.roles",
    "thinkrl.rl.window_scoring",
    "thinkrl.prompts",
    "thinkrl.rollout.hf_actor",
    "thinkrl.rollout.policy",
    "thinkrl.rl.scoring",
]

SIZES = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
    "large": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048},
}
WARM_LEN = 10  # tokens of the small warm-up window run before the memory measurement
LOSS_TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]
TRAINER_RECIPE = "configs/quiet_star/tiny_shakespeare.yaml"  # the trainer column's recipe, relative to ROOT
TEXT_CHARS = string.ascii_letters + string.digits + string.punctuation + " "  # one byte-tokenizer token each
TRAINER_EVAL_POSITIONS = 8  # held-out positions of the trainer's evaluations (before and after the run, untimed)
PHASE_ORDER = ["rollout", "score_and_loss", "backward", "optimizer", "sync"]  # timing/<phase>, in a step's order


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", default="tiny,large", help=f"model sizes, comma-separated, of {', '.join(SIZES)}")
    p.add_argument(
        "--windows",
        "--seqs",
        dest="seqs",
        metavar="L,...",
        type=ints,
        default=[64, 128, 256],
        help="window lengths L, comma-separated (--seqs: the same)",
    )
    p.add_argument("--thought-lens", type=ints, default=[4, 8], help="thought lengths m, comma-separated")
    p.add_argument("--threads", type=ints, default=[1, 2], help="CPU thread counts, comma-separated (not on CUDA)")
    p.add_argument("--device", default=default_device(), help="cuda | cpu (default: cuda when there is a GPU)")
    p.add_argument("--batch-windows", type=int, default=2, help="B windows per step")
    p.add_argument("--k", type=int, default=2, help="K thoughts per position")
    p.add_argument("--n-ahead", type=int, default=2, help="true tokens scored after each thought")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median), after 1 warm-up")
    p.add_argument(
        "--max-per-position-s",
        type=float,
        default=60.0,
        help="skip per-position steps estimated longer (0: skip them all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write every row here")
    p.add_argument(
        "--trainer-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more override of the trainer column's runs, repeatable (e.g. rollout.fused_passes=true)",
    )
    p.add_argument(
        "--no-trainer",
        dest="trainer",
        action="store_false",
        help="skip the trainer column (a real `thinkrl train` at each row's shapes)",
    )
    p.add_argument(
        "--no-isolated",
        dest="isolated",
        action="store_false",
        help="skip the isolated parallel step (long windows: the trainer column and plain step only)",
    )
    p.add_argument(
        "--attention-kernel",
        choices=("merge", "flex"),
        default="merge",
        help="attention of the parallel passes (rollout.attention_kernel): the isolated step's and the trainer's",
    )
    p.add_argument("--quick", action="store_true", help="window 64, thought 4, tiny, 1 thread, 1 repeat (the test)")
    args = p.parse_args(argv)
    if args.json:  # refuse before measuring anything: a file of someone else's is never overwritten
        from thinkrl.errors import ConfigError
        from thinkrl.output_folder import check_output_file

        try:
            check_output_file(args.json, "bench_every_token")
        except ConfigError as exc:
            p.error(str(exc))
    args.sizes = [s for s in args.sizes.split(",") if s]
    if args.quick:
        args.sizes, args.seqs, args.thought_lens, args.threads, args.repeats = ["tiny"], [64], [4], [1], 1
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown --sizes {unknown}; known: {', '.join(SIZES)}")
    if min(args.seqs) < args.n_ahead + 3:
        p.error(f"--windows must be at least n_ahead + 3 = {args.n_ahead + 3} (one slot with context >= 2)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# One measurement (runs in a fresh process)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    path: str
    size: str
    seq: int
    thought_len: int  # 0 for plain
    threads: int  # 0 = torch's default (CUDA)
    device: str
    batch_windows: int
    k: int
    n_ahead: int
    repeats: int
    seed: int
    attention_kernel: str = "merge"  # --attention-kernel


def max_positions(job: Job) -> int:
    return max(512, job.seq + (job.thought_len or 1) + job.n_ahead + 8)


def build_config(job: Job):
    from thinkrl.config import load_config

    s = SIZES[job.size]
    m = job.thought_len or 1  # plain never samples; the config wants a positive length
    return load_config(
        None,
        [
            "model.tokenizer=byte",
            "model.weight_groups=[A,A,A]",
            *(f"model.default.scratch.{key}={value}" for key, value in s.items()),
            f"model.default.scratch.max_position_embeddings={max_positions(job)}",
            "head.form=mlp",
            "data.interpreter_window=0",
            f"data.n_ahead={job.n_ahead}",
            f"rollout.num_thoughts={job.k}",
            f"rollout.max_thought_len={m}",
            "rollout.length_mode=fixed",
            "trainer.report_to=none",
        ],
    )


def make_windows(job: Job, length: int, tokenizer, sot: int, eot: int) -> list:
    """B windows of random token ids (no special or marker tokens); a slot at every token with n_ahead after it."""
    from thinkrl.data.windows import Window

    banned = set(tokenizer.all_special_ids) | {sot, eot}
    allowed = np.array([i for i in range(len(tokenizer)) if i not in banned])
    g = torch.Generator().manual_seed(job.seed)
    ids = allowed[torch.randint(len(allowed), (job.batch_windows, length), generator=g).numpy()]
    slots = list(range(2, length - job.n_ahead + 1))
    return [Window(row, slots, [job.n_ahead] * len(slots), doc) for doc, row in enumerate(ids)]


def make_step(job: Job, cfg, roles, actor, scorer, windows: list, device):
    """A closure running one training step of ``job.path`` on ``windows``; returns the loss."""
    from thinkrl.data.windows import positions_of, window_batch
    from thinkrl.rl.learner import PositionScoring, compute_loss
    from thinkrl.rl.window_scoring import WindowScoring
    from thinkrl.rollout.policy import position_seeds

    model = roles.model("reasoner")
    modules = list(roles.modules().values())
    pad = roles.tokenizer.pad_token_id
    k = job.k
    if job.path == "plain":
        ids = torch.as_tensor(np.stack([w.tokens for w in windows]), dtype=torch.long)
        ids = ids.repeat_interleave(k, dim=0).to(device)  # (B*K, L): the rows the thoughts would sit on

        def forward():
            return model(input_ids=ids, labels=ids).loss

    else:
        positions = positions_of(windows)
        seeds = position_seeds(len(positions), torch.Generator().manual_seed(job.seed + 1))
        if job.path == "parallel":
            batch = window_batch(windows, pad, device)

            def forward():
                thoughts = actor.sample_windows(batch, k, seeds)
                return compute_loss(cfg, WindowScoring(cfg, roles, scorer, batch), thoughts).loss

        else:
            contexts, targets = [p.context_ids for p in positions], [p.target_ids for p in positions]

            def forward():
                thoughts = actor.sample(contexts, k, seeds)
                return compute_loss(cfg, PositionScoring(roles, scorer, contexts, targets), thoughts).loss

    def step() -> float:
        for module in modules:
            module.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def measure_memory(step, device) -> tuple[float, dict]:
    """Run ``step`` once; (its loss, {peak_mb, memory_method, ...}) — see the module docstring."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step()
        peak = torch.cuda.max_memory_allocated()
        return loss, {
            "peak_mb": (peak - before) / 2**20,
            "peak_abs_mb": peak / 2**20,
            "memory_method": "cuda max_memory_allocated - allocated before",
        }
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        rss0 = proc_status_kb("VmRSS")
    except OSError:
        rss0 = None
    if rss0 is not None:
        loss = step()
        peak = proc_status_kb("VmHWM")
        return loss, {
            "peak_mb": (peak - rss0) / 1024,
            "peak_abs_mb": peak / 1024,
            "memory_method": "rss: VmHWM after - VmRSS before (peak mark reset)",
        }
    before = max_rss_kb()
    loss = step()
    after = max_rss_kb()
    return loss, {
        "peak_mb": (after - before) / 1024,
        "peak_abs_mb": after / 1024,
        "memory_method": "ru_maxrss growth (lower bound)",
    }


def run_job(job: Job) -> dict:
    """Build the model, warm up on a small window, then: memory on the first step of the real shape (which is also
    ``timed_runs``'s warm-up call), then ``job.repeats`` timed steps."""
    import transformers

    from thinkrl.models.parallel_passes import set_attention_kernel
    from thinkrl.models.roles import build_roles
    from thinkrl.prompts import null_thought_ids
    from thinkrl.rl.scoring import Scorer
    from thinkrl.rollout.hf_actor import HFRolloutActor

    transformers.logging.set_verbosity_error()
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    cfg = build_config(job)
    torch.manual_seed(job.seed)
    roles = build_roles(cfg)
    for module in roles.modules().values():
        module.to(device)
        module.train()
    for m in roles.models.values():
        set_attention_kernel(m, job.attention_kernel)
    model = roles.model("reasoner")
    actor = HFRolloutActor(cfg.rollout, model, roles.sot_id, roles.eot_id, roles.tokenizer.pad_token_id)
    scorer = Scorer(
        roles, null_thought_ids(cfg.rollout.null_thought, roles.tokenizer), 0, cfg.reward.source
    )  # interpreter_window 0: the whole context, as parallel passes read it
    windows = make_windows(job, job.seq, roles.tokenizer, roles.sot_id, roles.eot_id)
    step = make_step(job, cfg, roles, actor, scorer, windows, device)
    small = make_windows(job, min(job.seq, job.n_ahead + WARM_LEN), roles.tokenizer, roles.sot_id, roles.eot_id)
    make_step(job, cfg, roles, actor, scorer, small, device)()  # lazy library set-up, kept out of the memory figure

    memory: dict = {}

    def first_measures_memory() -> float:
        if memory:
            return step()
        loss, found = measure_memory(step, device)
        memory.update(found)
        return loss

    runs = timed_runs(first_measures_memory, job.repeats)
    seconds = [s for _, s in runs]
    return {
        **asdict(job),
        "status": "measured",
        "positions": sum(len(w.slots) for w in windows),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "seconds": statistics.median(seconds),
        "runs": seconds,
        "loss": runs[-1][0],
        **memory,
    }


def run_fresh(pool_ctx, job: Job) -> dict:
    """``run_job`` in a fresh process (forked from the forkserver, which holds only the imported libraries)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=pool_ctx) as pool:
        return pool.submit(run_job, job).result()


# ----------------------------------------------------------------------------------------------------------------
# The trainer's own step (a real ``thinkrl train`` in a subprocess)
# ----------------------------------------------------------------------------------------------------------------
TRAINER_EXTRA: list[str] = []  # --trainer-override


def trainer_overrides(job: Job, folder: Path) -> list[str]:
    """Overrides of the Quiet-STaR recipe that give ``thinkrl train`` the row's shapes (see the module docstring)."""
    slots = job.seq - job.n_ahead - 1  # per window: t = 2 .. L - n_ahead
    return [
        "model.tokenizer=byte",
        "model.weight_groups=[A,A,A]",
        *(f"model.default.scratch.{key}={value}" for key, value in SIZES[job.size].items()),
        f"model.default.scratch.max_position_embeddings={max_positions(job)}",
        "head.form=mlp",
        "data.source=text",
        f"data.train_file={folder / 'train.txt'}",
        f"data.eval_file={folder / 'eval.txt'}",
        "data.positions=every_k",
        "data.every_k=1",
        f"data.context_len={job.seq - job.n_ahead}",  # documents of context_len + n_ahead = L tokens
        f"data.n_ahead={job.n_ahead}",
        "data.interpreter_window=0",
        f"data.eval_positions={TRAINER_EVAL_POSITIONS}",
        f"rollout.num_thoughts={job.k}",
        "rollout.length_mode=fixed",
        f"rollout.max_thought_len={job.thought_len}",
        "rollout.thought_passes=parallel",
        "rollout.fused_passes=auto",  # the recipe's false is for its 128-wide model; --trainer-override to compare
        f"trainer.batch_positions={job.batch_windows * slots}",  # // slots per window = B windows per step
        "trainer.lm_warmup_steps=0",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.log_every=1",
        "trainer.dump_rollouts=true",  # one line per position: the positions per step are counted from it
        "trainer.report_to=none",
        "trainer.progress=false",
        f"trainer.num_threads={job.threads}",
        f"trainer.max_steps={job.repeats + 1}",
        f"trainer.seed={job.seed}",
        f"trainer.output_dir={folder / 'run'}",
    ]


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(TEXT_CHARS) for _ in range(length))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_trainer(job: Job) -> dict:
    """``thinkrl train`` at the job's shapes in a temporary folder; its ``timing/*`` medians over the steps after the
    first, and what its rollout dumps say it ran (positions, windows and their length, thought lengths per step)."""
    context = job.seq - job.n_ahead
    with tempfile.TemporaryDirectory(prefix="bench_every_token_") as tmp:
        folder = Path(tmp)
        rng = random.Random(job.seed)
        # 2B whole documents of L tokens (no short tail document: the text is exactly 2B * context_len + n_ahead
        # tokens), and one held-out window
        (folder / "train.txt").write_text(random_text(rng, 2 * job.batch_windows * context + job.n_ahead))
        (folder / "eval.txt").write_text(random_text(rng, context + job.n_ahead))
        overrides = trainer_overrides(job, folder) + TRAINER_EXTRA
        env = dict(os.environ)
        if job.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        else:
            env.pop("ACCELERATE_USE_CPU", None)
        cmd = [sys.executable, "-m", "thinkrl", "train", "--config", TRAINER_RECIPE, *overrides]
        row = {**asdict(job), "recipe": TRAINER_RECIPE, "overrides": [o.replace(tmp, "<tmp>") for o in overrides]}
        started = time.perf_counter()
        log = folder / "train.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            # wait4: this child's own peak RSS (ru_maxrss, KiB on Linux), whole process: model, imports, step
            _, status, usage = os.wait4(proc.pid, 0)
        row["wall_s"] = time.perf_counter() - started
        row["peak_rss_mb"] = usage.ru_maxrss / 1024
        if os.waitstatus_to_exitcode(status) != 0:
            return row | {"status": "failed", "seconds": None, "error": log.read_text()[-3000:]}
        run_dir = folder / "run"
        steps = sorted(
            (r for r in read_jsonl(run_dir / "metrics.jsonl") if "timing/step" in r), key=lambda r: r["step"]
        )
        timed = steps[1:] or steps  # the first step sets up lazily, as the isolated paths' warm-up step
        found = {k[len("timing/") :] for r in timed for k in r if k.startswith("timing/") and k != "timing/step"}
        names = [n for n in PHASE_ORDER if n in found] + sorted(found - set(PHASE_ORDER))
        phase_runs = {name: [r.get(f"timing/{name}", 0.0) for r in timed] for name in names}
        phase_runs["other"] = [r["timing/step"] - sum(r.get(f"timing/{n}", 0.0) for n in names) for r in timed]
        seen = []  # per timed step: (positions, windows, thought lengths, thoughts per position, target lengths)
        for r in timed:
            records = read_jsonl(run_dir / "rollouts" / f"step-{r['step']:06d}.jsonl")
            seen.append(
                (
                    len(records),
                    sum(len(p["context"]) == 2 for p in records),  # each window's first slot has 2 context tokens
                    sorted({t["length"] for p in records for t in p["thoughts"]}),
                    sorted({len(p["thoughts"]) for p in records}),
                    sorted({len(p["target"]) for p in records}),
                )
            )
        positions, windows, lens, ks, targets = seen[-1]
    return row | {
        "status": "measured",
        "positions": positions,
        "positions_per_step": [s[0] for s in seen],
        "windows": windows,
        "window_tokens": positions // max(windows, 1) + 1 + job.n_ahead if windows else None,
        "thought_lens_seen": lens,
        "thoughts_per_position": ks,
        "target_lens_seen": targets,
        "seconds": statistics.median(r["timing/step"] for r in timed),
        "runs": [r["timing/step"] for r in timed],
        "phases": {name: statistics.median(v) for name, v in phase_runs.items()},
        "phase_runs": phase_runs,
        "loss": timed[-1].get("train/loss"),
        "flops_per_step": timed[-1].get("compute/flops"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Grid and report
# ----------------------------------------------------------------------------------------------------------------
def device_label(row: dict) -> str:
    return row["device"] if row["device"] != "cpu" else f"cpu x{row['threads']}"


def progress(row: dict) -> None:
    head = f"  {device_label(row):<8} {row['size']:<5} L={row['seq']:<4} m={row['thought_len'] or '-':<2} "
    if row["status"] == "skipped":
        print(f"{head}{row['path']:<12} {skipped(row)}", flush=True)
        return
    if row["status"] == "failed":
        print(f"{head}{row['path']:<12} FAILED:\n{row['error']}", flush=True)
        return
    if row["path"] == "trainer":
        runs = " ".join(f"{s:.3f}" for s in row["runs"])
        phases = " ".join(f"{name} {s:.3f}" for name, s in row["phases"].items())
        print(
            f"{head}{row['path']:<12} {row['seconds']:8.3f} s  [{phases}]  N {row['positions']} in "
            f"{row['windows']} windows of {row['window_tokens']}  loss {row['loss']:.6f}  runs [{runs}]  "
            f"(wall {row['wall_s']:.0f} s)",
            flush=True,
        )
        return
    runs = " ".join(f"{s:.3f}" for s in row["runs"])
    print(
        f"{head}{row['path']:<12} {row['seconds']:8.3f} s  peak +{row['peak_mb']:.1f} MB  loss {row['loss']:.6f}"
        f"  runs [{runs}]",
        flush=True,
    )


def fmt_s(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "skipped":
        return skipped(row)
    if row["status"] == "failed":
        return "failed"
    return f"{row['seconds']:.3f}"


def skipped(row: dict) -> str:
    est = row["estimate_s"]
    return "skipped (--max-per-position-s 0)" if est is None else f"skipped (est. {est:.0f} s)"


def fmt_mb(row: dict | None) -> str:
    return f"{row['peak_mb']:.1f}" if row and row["status"] == "measured" and "peak_mb" in row else "-"


def summarize(args, rows: list[dict]) -> tuple[list[dict], list[str]]:
    """One line per (device, size, L, m): times, ratios, proportionality, memory, loss agreement, the trainer's
    step; and the problems found (losses that differ, a trainer that failed or ran other positions)."""
    find = {(r["device"], r["threads"], r["size"], r["seq"], r["thought_len"], r["path"]): r for r in rows}
    lines, problems, first = [], [], {}
    keys = sorted(
        {(r["device"], r["threads"], r["size"], r["seq"], r["thought_len"]) for r in rows if r["thought_len"]}
    )
    order = {s: i for i, s in enumerate(args.sizes)}
    keys.sort(key=lambda x: (x[0], x[1], order[x[2]], x[4], x[3]))
    for dev, thr, size, seq, m in keys:
        par = find.get((dev, thr, size, seq, m, "parallel"))
        pp = find.get((dev, thr, size, seq, m, "per_position"))
        plain = find.get((dev, thr, size, seq, 0, "plain"))
        trainer = find.get((dev, thr, size, seq, m, "trainer"))
        passes = m + 2 + args.n_ahead
        where = f"{dev} x{thr} {size} L={seq} m={m}"
        line = {"device": dev, "threads": thr, "size": size, "seq": seq, "thought_len": m, "positions": None}
        line.update(par_plain=None, pp_par=None, us_per_token=None, rel=None, loss_diff=None)
        line.update(trainer_s=None, trainer_phases=None, trainer_positions=None, trainer_plain=None, trainer_par=None)
        line["trainer_rss_mb"] = None
        if par:
            line["positions"] = par["positions"]
            line["us_per_token"] = par["seconds"] * 1e6 / (passes * seq)
            ref = first.setdefault((dev, thr, size), line["us_per_token"])
            line["rel"] = line["us_per_token"] / ref
            if plain:
                line["par_plain"] = par["seconds"] / plain["seconds"]
        if par and pp and pp["status"] == "measured":
            line["pp_par"] = pp["seconds"] / par["seconds"]
            line["loss_diff"] = abs(par["loss"] - pp["loss"])
            if not line["loss_diff"] <= LOSS_TOLERANCE * max(1.0, abs(par["loss"])):
                problems.append(f"{where}: parallel and per-position losses differ by {line['loss_diff']:.2e}")
        if trainer and trainer["status"] == "failed":
            problems.append(f"{where}: thinkrl train failed (its output is in the row's 'error')")
        elif trainer:
            line.update(trainer_s=trainer["seconds"], trainer_phases=trainer["phases"])
            line["trainer_rss_mb"] = trainer.get("peak_rss_mb")
            line["trainer_positions"] = trainer["positions"]
            if plain:
                line["trainer_plain"] = trainer["seconds"] / plain["seconds"]
            if par:
                line["trainer_par"] = trainer["seconds"] / par["seconds"]
                if trainer["positions"] != par["positions"] or trainer["thought_lens_seen"] != [m]:
                    problems.append(
                        f"{where}: the trainer ran {trainer['positions']} positions per step "
                        f"(thoughts of {trainer['thought_lens_seen']} tokens), the isolated step "
                        f"{par['positions']} (thoughts of {m})"
                    )
        line["rows"] = (par, pp, plain, trainer)
        lines.append(line)
    return lines, problems


def print_table(args, lines: list[dict]) -> None:
    n = args.n_ahead
    print()
    print(
        f"{'device':<9}{'size':<6}{'L':>5}{'m':>3}{'N':>6}{'N trn':>6}  {'parallel s':>10}  {'per_position s':>20}  "
        f"{'plain s':>8}  {'trainer s':>9}  {'par/plain':>9}  {'trn/plain':>9}  {'trn/par':>7}  {'pp/par':>7}  "
        f"{f'us/((m+2+{n})L)':>14}  {'rel':>5}  {'MB par':>7}  {'MB pp':>7}  {'MB plain':>8}  {'|dloss|':>8}"
    )
    ratio = lambda v, f: f"{v:{f}}" if v is not None else f"{'-':>{f.split('.')[0]}}"  # noqa: E731
    for line in lines:
        par, pp, plain, trainer = line["rows"]
        label = line["device"] if line["device"] != "cpu" else f"cpu x{line['threads']}"
        print(
            f"{label:<9}{line['size']:<6}{line['seq']:>5}{line['thought_len']:>3}{line['positions'] or 0:>6}"
            f"{line['trainer_positions'] or '-':>6}  {fmt_s(par):>10}  {fmt_s(pp):>20}  {fmt_s(plain):>8}  "
            f"{fmt_s(trainer):>9}  {ratio(line['par_plain'], '9.1f')}  {ratio(line['trainer_plain'], '9.1f')}  "
            f"{ratio(line['trainer_par'], '7.2f')}  {ratio(line['pp_par'], '7.1f')}  "
            f"{ratio(line['us_per_token'], '14.2f')}  {ratio(line['rel'], '5.2f')}  "
            f"{fmt_mb(par):>7}  {fmt_mb(pp):>7}  {fmt_mb(plain):>8}  {ratio(line['loss_diff'], '8.1e')}"
        )
    phased = [line for line in lines if line["trainer_phases"]]
    if phased:
        names = list(dict.fromkeys(name for line in phased for name in line["trainer_phases"]))
        print("\ntrainer step by phase (median s of timing/<phase>; other = step - their sum):")
        print(f"{'device':<9}{'size':<6}{'L':>5}{'m':>3}  {'step':>8}" + "".join(f"  {name:>14}" for name in names))
        for line in phased:
            label = line["device"] if line["device"] != "cpu" else f"cpu x{line['threads']}"
            cells = "".join(f"  {line['trainer_phases'].get(name, 0.0):14.3f}" for name in names)
            print(
                f"{label:<9}{line['size']:<6}{line['seq']:>5}{line['thought_len']:>3}  {line['trainer_s']:8.3f}{cells}"
            )


def origin_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line through the origin y = a·x; returns (a, largest |y / (a·x) - 1|)."""
    a = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return a, max(abs(y / (a * x) - 1) for x, y in zip(xs, ys))


def print_growth(args, lines: list[dict]) -> None:
    """How cost grows: in the thought length (a line through the origin in m + 2 + n_ahead, over 3+ lengths) and in
    the window (the ratio to a plain step and the peak memory at the longest window against the shortest)."""
    n = args.n_ahead
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        groups.setdefault((line["device"], line["threads"], line["size"], line["seq"]), []).append(line)
    for (dev, thr, size, seq), group in groups.items():
        for column, key in (("isolated parallel", "par"), ("trainer", "trainer_s")):
            pts = [(g["thought_len"] + 2 + n, g[key] if key == "trainer_s" else _seconds(g["rows"][0])) for g in group]
            pts = [(x, y) for x, y in pts if y]
            if len(pts) >= 3:
                a, worst = origin_fit(*zip(*pts))
                cells = ", ".join(f"m={x - 2 - n}: {y:.3f} s ({y / (a * x) - 1:+.1%})" for x, y in pts)
                print(
                    f"\nthought length, {dev} x{thr} {size} L={seq}, {column}: s = {a:.4f} x (m + 2 + {n}); "
                    f"{cells}; largest deviation {worst:.1%}"
                )
    by_m: dict[tuple, list[dict]] = {}
    for line in lines:
        by_m.setdefault((line["device"], line["threads"], line["size"], line["thought_len"]), []).append(line)
    for (dev, thr, size, m), group in by_m.items():
        group = sorted(group, key=lambda g: g["seq"])
        if len(group) < 2:
            continue
        short, long = group[0], group[-1]
        parts = []
        for name in ("par_plain", "trainer_plain"):
            if short[name] and long[name]:
                parts.append(f"{name} {short[name]:.1f} -> {long[name]:.1f} (x{long[name] / short[name]:.2f})")
        mb = [_peak(g["rows"][0]) for g in (short, long)]
        if all(mb):
            parts.append(f"peak MB parallel {mb[0]:.0f} -> {mb[1]:.0f} (x{mb[1] / mb[0]:.2f})")
        rss = [g["trainer_rss_mb"] for g in (short, long)]
        if all(rss):
            parts.append(f"trainer peak RSS MB {rss[0]:.0f} -> {rss[1]:.0f} (x{rss[1] / rss[0]:.2f})")
        if parts:
            print(f"\nwindow L={short['seq']} -> {long['seq']}, {dev} x{thr} {size} m={m}: " + "; ".join(parts))


def _seconds(row: dict | None) -> float | None:
    return row["seconds"] if row and row.get("status", "measured") == "measured" else None


def _peak(row: dict | None) -> float | None:
    return row.get("peak_mb") if row and row.get("status", "measured") == "measured" else None


def main(argv=None) -> None:
    args = parse_args(argv)
    TRAINER_EXTRA[:] = [f"rollout.attention_kernel={args.attention_kernel}", *args.trainer_override]
    device = args.device
    cuda = device == "cuda"
    thread_list = [0] if cuda else args.threads
    where = torch.cuda.get_device_name(0) if cuda else f"{os.cpu_count()} cores, threads {args.threads}"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"settings  device={device} ({where})  sizes={args.sizes}  L={args.seqs}  m={args.thought_lens}  "
        f"K={args.k}  n_ahead={args.n_ahead}  B={args.batch_windows} windows  slots t=2..L-{args.n_ahead}  "
        f"length_mode=fixed  repeats={args.repeats} (+1 warm-up, median)  "
        f"trainer={'thinkrl train --config ' + TRAINER_RECIPE if args.trainer else 'off'}"
    )
    print(
        f"settings  torch {torch.__version__}  transformers {version('transformers')}  "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  load average {load}  "
        f"per-position skipped above {args.max_per_position_s:.0f} s (L^2 estimate)"
    )
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *HEAVY_MODULES])  # imported once; each job forks a fresh child
    rows: list[dict] = []
    start = time.perf_counter()
    for threads in thread_list:
        for size in args.sizes:
            plain_done: set[int] = set()
            for m in args.thought_lens:
                last_pp: tuple[int, float] | None = None  # (L, seconds) of the last measured per-position step
                for seq in sorted(args.seqs):
                    job = Job(
                        path="parallel",
                        size=size,
                        seq=seq,
                        thought_len=m,
                        threads=threads,
                        device=device,
                        batch_windows=args.batch_windows,
                        k=args.k,
                        n_ahead=args.n_ahead,
                        repeats=args.repeats,
                        seed=args.seed,
                        attention_kernel=args.attention_kernel,
                    )
                    todo = [job] if args.isolated else []
                    if seq not in plain_done:
                        todo.append(replace(job, path="plain", thought_len=0))
                        plain_done.add(seq)
                    estimate = last_pp[1] * (seq / last_pp[0]) ** 2 if last_pp else None
                    if args.max_per_position_s > 0 and (estimate is None or estimate <= args.max_per_position_s):
                        todo.append(replace(job, path="per_position"))
                    else:
                        row = {**asdict(replace(job, path="per_position")), "status": "skipped"}
                        todo.append(row | {"estimate_s": estimate, "seconds": None})
                    if args.trainer:
                        todo.append(replace(job, path="trainer"))
                    for item in todo:
                        if isinstance(item, dict):
                            row = item
                        elif item.path == "trainer":
                            row = run_trainer(item)
                        else:
                            row = run_fresh(ctx, item)
                        if row["path"] == "per_position" and row["status"] == "measured":
                            last_pp = (seq, row["seconds"])
                        rows.append(row)
                        progress(row)
    lines, problems = summarize(args, rows)
    print_table(args, lines)
    print_growth(args, lines)
    print(
        f"\nN: positions of the isolated step; N trn: positions the trainer thought at per step (its rollout dumps). "
        "trainer s: median timing/step of `thinkrl train` (sampling + scoring + loss + backward + optimizer + "
        "sync + statistics). par/plain: parallel step / plain LM step over the same B*K rows of L tokens. "
        "trn/plain, trn/par: trainer step / plain, / isolated parallel. pp/par: per-position / "
        f"parallel. us/((m+2+{args.n_ahead})L): parallel seconds / ((thought len + 2 + n_ahead) * L) in us; constant "
        "(rel ~ 1) = cost grows in proportion to both. MB: peak memory of one step "
        f"({rows[0].get('memory_method', '?') if rows else '?'}). |dloss|: |loss(parallel) - loss(per_position)|."
    )
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        summary = [{k: v for k, v in line.items() if k != "rows"} for line in lines]
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump(
                {
                    "written_by": "bench_every_token",
                    "settings": settings,
                    "device": device,
                    "rows": rows,
                    "summary": summary,
                },
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    if problems:
        for problem in problems:
            print(f"WARNING: {problem}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
