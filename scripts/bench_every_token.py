"""Cost of one training step with a thought at every token: parallel passes vs per-position vs plain LM training.

Run from the repository root (the main engineer's full grid; ``--quick`` is the test's single tiny setting):

    .venv/bin/python scripts/bench_every_token.py --json every_token.json
    .venv/bin/python scripts/bench_every_token.py --sizes tiny,large --seqs 64,128,256 --thought-lens 4,8 \\
        --threads 1,2 --batch-windows 2 --repeats 3 --json every_token.json
    .venv/bin/python scripts/bench_every_token.py --quick --json /tmp/quick.json

Setting: B = ``--batch-windows`` windows of L random byte-token ids (L = ``--seqs``); a thought position at every
token that has n_ahead true tokens after it (slots t = 2 .. L - n_ahead, so N = B * (L - n_ahead - 1) positions),
K thoughts per position, thoughts of exactly m tokens (``rollout.length_mode=fixed``, m = ``--thought-lens``), so
every run does the same work. Models: scratch Llamas of one shared weight group (Quiet-STaR's setting), byte
tokenizer, mlp mixing head; ``tiny`` = hidden 64, 2 layers, 4 heads, MLP 256 (the Quiet-STaR comparison's size),
``large`` = hidden 512, 8 layers, 8 heads, MLP 2048 (compute-bound on CPU).

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

Ratios printed:
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

Every time is the median of ``--repeats`` timed steps after one warm-up step (``thinkrl.timing.timed_runs``).

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

Device: ``--device``, by default CUDA when ``torch.cuda.is_available()`` (``--threads`` is then ignored), else CPU with
``torch.set_num_threads(t)`` for each t of ``--threads``. ``OMP_WAIT_POLICY=PASSIVE`` unless set (see
bench_rollout.py: spinning OpenMP threads slow every op badly on shared cores). ``--json PATH`` writes every row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version

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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", default="tiny,large", help=f"model sizes, comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--seqs", type=ints, default=[64, 128, 256], help="window lengths L, comma-separated")
    p.add_argument("--thought-lens", type=ints, default=[4, 8], help="thought lengths m, comma-separated")
    p.add_argument("--threads", type=ints, default=[1, 2], help="CPU thread counts, comma-separated (not on CUDA)")
    p.add_argument("--device", default=default_device(), help="cuda | cpu (default: cuda when there is a GPU)")
    p.add_argument("--batch-windows", type=int, default=2, help="B windows per step")
    p.add_argument("--k", type=int, default=2, help="K thoughts per position")
    p.add_argument("--n-ahead", type=int, default=2, help="true tokens scored after each thought")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median), after 1 warm-up")
    p.add_argument("--max-per-position-s", type=float, default=60.0, help="skip per-position steps estimated longer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write every row here")
    p.add_argument("--quick", action="store_true", help="seq 64, thought 4, tiny, 1 thread, 1 repeat (the test)")
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
        p.error(f"--seqs must be at least n_ahead + 3 = {args.n_ahead + 3} (one slot with context >= 2)")
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
            f"model.default.scratch.max_position_embeddings={max(512, job.seq + m + job.n_ahead + 8)}",
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
# Grid and report
# ----------------------------------------------------------------------------------------------------------------
def device_label(row: dict) -> str:
    return row["device"] if row["device"] != "cpu" else f"cpu x{row['threads']}"


def progress(row: dict) -> None:
    head = f"  {device_label(row):<8} {row['size']:<5} L={row['seq']:<4} m={row['thought_len'] or '-':<2} "
    if row["status"] == "skipped":
        print(f"{head}{row['path']:<12} skipped (est. {row['estimate_s']:.0f} s)", flush=True)
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
        return f"skipped (est. {row['estimate_s']:.0f} s)"
    return f"{row['seconds']:.3f}"


def fmt_mb(row: dict | None) -> str:
    return f"{row['peak_mb']:.1f}" if row and row["status"] == "measured" else "-"


def summarize(args, rows: list[dict]) -> tuple[list[dict], bool]:
    """One line per (device, size, L, m): times, ratios, proportionality, memory, loss agreement."""
    find = {(r["device"], r["threads"], r["size"], r["seq"], r["thought_len"], r["path"]): r for r in rows}
    lines, ok, first = [], True, {}
    keys = sorted(
        {(r["device"], r["threads"], r["size"], r["seq"], r["thought_len"]) for r in rows if r["thought_len"]}
    )
    order = {s: i for i, s in enumerate(args.sizes)}
    keys.sort(key=lambda x: (x[0], x[1], order[x[2]], x[4], x[3]))
    for dev, thr, size, seq, m in keys:
        par = find.get((dev, thr, size, seq, m, "parallel"))
        pp = find.get((dev, thr, size, seq, m, "per_position"))
        plain = find.get((dev, thr, size, seq, 0, "plain"))
        passes = m + 2 + args.n_ahead
        line = {"device": dev, "threads": thr, "size": size, "seq": seq, "thought_len": m, "positions": None}
        line.update(par_plain=None, pp_par=None, us_per_token=None, rel=None, loss_diff=None)
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
                ok = False
        line["rows"] = (par, pp, plain)
        lines.append(line)
    return lines, ok


def print_table(args, lines: list[dict]) -> None:
    n = args.n_ahead
    print()
    print(
        f"{'device':<9}{'size':<6}{'L':>4}{'m':>3}{'N':>5}  {'parallel s':>10}  {'per_position s':>20}  "
        f"{'plain s':>8}  {'par/plain':>9}  {'pp/par':>7}  {f'us/((m+2+{n})L)':>14}  {'rel':>5}  "
        f"{'MB par':>7}  {'MB pp':>7}  {'MB plain':>8}  {'|dloss|':>8}"
    )
    for line in lines:
        par, pp, plain = line["rows"]
        ratio = lambda v, f: f"{v:{f}}" if v is not None else "-"  # noqa: E731
        label = line["device"] if line["device"] != "cpu" else f"cpu x{line['threads']}"
        print(
            f"{label:<9}{line['size']:<6}{line['seq']:>4}{line['thought_len']:>3}{line['positions'] or 0:>5}  "
            f"{fmt_s(par):>10}  {fmt_s(pp):>20}  {fmt_s(plain):>8}  {ratio(line['par_plain'], '9.1f')}  "
            f"{ratio(line['pp_par'], '7.1f')}  {ratio(line['us_per_token'], '14.2f')}  {ratio(line['rel'], '5.2f')}  "
            f"{fmt_mb(par):>7}  {fmt_mb(pp):>7}  {fmt_mb(plain):>8}  {ratio(line['loss_diff'], '8.1e')}"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    cuda = device == "cuda"
    thread_list = [0] if cuda else args.threads
    where = torch.cuda.get_device_name(0) if cuda else f"{os.cpu_count()} cores, threads {args.threads}"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"settings  device={device} ({where})  sizes={args.sizes}  L={args.seqs}  m={args.thought_lens}  "
        f"K={args.k}  n_ahead={args.n_ahead}  B={args.batch_windows} windows  slots t=2..L-{args.n_ahead}  "
        f"length_mode=fixed  repeats={args.repeats} (+1 warm-up, median)"
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
                    )
                    todo = [job]
                    if seq not in plain_done:
                        todo.append(replace(job, path="plain", thought_len=0))
                        plain_done.add(seq)
                    estimate = last_pp[1] * (seq / last_pp[0]) ** 2 if last_pp else None
                    if estimate is None or estimate <= args.max_per_position_s:
                        todo.append(replace(job, path="per_position"))
                    else:
                        row = {**asdict(replace(job, path="per_position")), "status": "skipped"}
                        todo.append(row | {"estimate_s": estimate, "seconds": None})
                    for item in todo:
                        row = item if isinstance(item, dict) else run_fresh(ctx, item)
                        if row["path"] == "per_position" and row["status"] == "measured":
                            last_pp = (seq, row["seconds"])
                        rows.append(row)
                        progress(row)
    lines, ok = summarize(args, rows)
    print_table(args, lines)
    print(
        f"\npar/plain: parallel step / plain LM step over the same B*K rows of L tokens. pp/par: per-position / "
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
    if not ok:
        print(
            "WARNING: parallel and per-position losses differ; the two paths did not do the same work", file=sys.stderr
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
