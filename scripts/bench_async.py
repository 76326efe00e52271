"""Overlapped sampling (``rollout.async_steps``): does it still learn, and how much does it overlap?

    python scripts/bench_async.py learning    [--out runs/bench-async] [--seeds 0 1 2] [--steps 400]
    python scripts/bench_async.py throughput  [--out runs/bench-async] [--steps 40] [overrides ...]

``learning``: the embedded default recipe with a colocated vLLM engine, synchronous (async_steps=0) and one step
off (async_steps=1), for each seed, to the same step count. It prints the final held-out reward of both, their
ratio, and the largest ``train/staleness`` the async run logged. The target: async within 10% of sync on every
seed. Each run is its own ``thinkrl train`` folder, so a stopped benchmark resumes where it was when rerun.

``throughput``: server mode on this machine's cores split in two. One ``thinkrl serve`` is pinned to the last core
and the learner to the others (``taskset``). The same server then runs the recipe for ``--steps`` steps
synchronously and with async_steps=1. It prints the median wall time per step (``timing/step``, first steps
skipped as warm-up), the main thread's wait for rollouts (``timing/rollout``), and the throughput ratio. The
overlap is the share of the synchronous step's sampling time that the async step no longer waits for.
Extra ``key=value`` overrides go to the server and both runs, e.g. bigger scratch models, where sampling weighs
more.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/default.yaml"
QUIET = ["trainer.report_to=none", "trainer.progress=false", "rollout.backend=vllm"]


def _train(out: Path, overrides: list[str], pin: str | None = None) -> None:
    if (out / "summary.json").is_file():
        return  # done in an earlier invocation
    cmd = [sys.executable, "-m", "thinkrl", "train", "--config", str(RECIPE), f"trainer.output_dir={out}", *overrides]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{out.name}.log").open("a") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{out.name} failed (exit {done.returncode}); see {out.parent / (out.name + '.log')}")


def _steps(out: Path) -> list[dict]:
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "timing/step" in m]


def learning(args) -> None:
    rows = []
    for seed in args.seeds:
        finals = {}
        for n in (0, 1):
            out = args.out / f"learning-seed{seed}-async{n}"
            _train(
                out, [*QUIET, f"trainer.seed={seed}", f"trainer.max_steps={args.steps}", f"rollout.async_steps={n}"]
            )
            finals[n] = json.loads((out / "summary.json").read_text())["final_eval"]["reward_mean"]
            if n:
                finals["staleness"] = max(m.get("train/staleness", 0) for m in _steps(out))
        rows.append((seed, finals[0], finals[1], finals[1] / finals[0], finals["staleness"]))
        print(f"seed {seed}: sync {finals[0]:.3f}  async {finals[1]:.3f}", flush=True)
    print(f"\nheld-out reward (nats) after {args.steps} steps, default recipe, colocated vLLM")
    print("| seed | async_steps=0 | async_steps=1 | async / sync | max staleness |")
    print("|---|---|---|---|---|")
    for seed, sync, asy, ratio, stale in rows:
        print(f"| {seed} | {sync:.3f} | {asy:.3f} | {ratio:.3f} | {stale} |")
    within = all(abs(r[3] - 1) <= 0.10 for r in rows)
    print(f"async within 10% of sync on every seed: {'yes' if within else 'NO'}")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(args) -> None:
    from thinkrl.serve import is_ready

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("throughput needs at least 2 cores: one for the server, the rest for the learner")
    server_core, learner_cores = str(cores[-1]), ",".join(map(str, cores[:-1]))
    port, work = _port(), args.out / "throughput"
    work.mkdir(parents=True, exist_ok=True)
    serve = ["taskset", "-c", server_core, sys.executable, "-m", "thinkrl", "serve", "--config", str(RECIPE)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    serve += ["--port", str(port), "--weights-dir", str(work / f"{stamp}-served"), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": server_core}
    with (work / "server.log").open("w") as log:
        server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not is_ready(url):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start; see {work / 'server.log'}")
            time.sleep(1)
        common = [*QUIET, "rollout.vllm_mode=server", f"rollout.vllm_urls=[{url}]", "trainer.lm_warmup_steps=0"]
        common += [f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "trainer.save_every=0"]
        common += [f"trainer.num_threads={len(cores) - 1}", *args.overrides]
        figures = {}
        for n in (0, 1):
            out = work / f"{stamp}-async{n}"  # fresh folders: timings are of this invocation
            _train(out, [*common, f"rollout.async_steps={n}"], pin=learner_cores)
            steps = _steps(out)[args.skip :]
            figures[n] = {
                key: statistics.median(m[f"timing/{key}"] for m in steps) for key in ("step", "rollout", "sync")
            }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    print(
        f"\nserver mode, server on core {server_core}, learner on cores {learner_cores}; median of steps "
        f"{args.skip + 1}..{args.steps}; overrides: {' '.join(args.overrides) or 'none'}"
    )
    print("| async_steps | step (s) | waiting for rollouts (s) | sync (s) | steps/s |")
    print("|---|---|---|---|---|")
    for n, f in figures.items():
        print(f"| {n} | {f['step']:.3f} | {f['rollout']:.3f} | {f['sync']:.3f} | {1 / f['step']:.2f} |")
    sync, asy = figures[0], figures[1]
    hidden = (sync["rollout"] - asy["rollout"]) / sync["rollout"] if sync["rollout"] > 0 else float("nan")
    print(
        f"throughput async / sync: {sync['step'] / asy['step']:.2f}; share of the sampling wait hidden: {hidden:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("learning", "throughput"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench-async")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="learning: 400 (the recipe's); throughput: 40")
    parser.add_argument("--skip", type=int, default=5, help="throughput: warm-up steps left out of the medians")
    parser.add_argument("overrides", nargs="*", help="throughput: key=value overrides for both runs")
    args = parser.parse_intermixed_args()
    if args.steps is None:
        args.steps = 400 if args.what == "learning" else 40
    (learning if args.what == "learning" else throughput)(args)


if __name__ == "__main__":
    main()
