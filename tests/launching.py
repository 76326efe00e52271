"""Real training runs in subprocesses: one process, or 2 processes under `accelerate launch` (gloo on CPU)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The default recipe, 8 positions per global step, a checkpoint after every step, no evaluation between; a linear
# LR schedule, so a resume that restored the wrong schedule step shows in the weights and in train/lr.
COMMON = [
    "--config",
    "configs/default.yaml",
    "learner.scheduler=linear",
    "trainer.lm_warmup_steps=0",
    "trainer.batch_positions=8",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.eval_every=0",
    "trainer.save_every=1",
    "data.eval_positions=8",
    "trainer.num_threads=1",
]
ONE = [sys.executable]


def free_port() -> str:
    """A port nobody listens on now: two launches at once (other tests, other users) must not share 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two_processes() -> list[str]:
    config = str(ROOT / "configs/accelerate/cpu-2proc.yaml")
    port = ["--main_process_port", free_port()]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *port]


def _env(gpu: bool = False) -> dict[str, str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    if not gpu:
        # Hide any GPU: accelerate's wait_for_everyone() calls barrier(device_ids=[local_rank]), and on a CUDA
        # machine torch then runs even the gloo barrier on cuda:<rank> ("invalid device ordinal" for rank 1).
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    return env


def train(
    launcher: list[str], out: Path, *extra: str, gpu: bool = False, recipe: list[str] = COMMON
) -> subprocess.CompletedProcess:
    """``thinkrl train`` on ``recipe`` (COMMON) + extra; on the CPU unless ``gpu`` (then on whatever GPU there is)."""
    cmd = [*launcher, "-m", "thinkrl", "train", *recipe, f"trainer.output_dir={out}", *extra]
    with one_launch_at_a_time(launcher is not ONE):
        return subprocess.run(cmd, cwd=ROOT, env=_env(gpu), capture_output=True, text=True, timeout=600)


def run_script(launcher: list[str], script: Path, *args: str) -> subprocess.CompletedProcess:
    """A Python file (not thinkrl train) under ``launcher``, on the CPU."""
    with one_launch_at_a_time(launcher is not ONE):
        return subprocess.run([*launcher, str(script), *args], cwd=ROOT, env=_env(), capture_output=True, text=True)


def train_on_machines(machines: int, per_machine: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``thinkrl train`` as ``machines`` machines of ``per_machine`` processes on localhost: one ``accelerate launch
    --num_machines M --machine_rank r --main_process_ip 127.0.0.1`` per machine, all at once, as on a cluster.
    Returns the machines' outcome as one process: the worst exit code, every launch's stderr."""
    port = free_port()
    config = str(ROOT / "configs/accelerate/cpu-2proc.yaml")
    cmd = [*COMMON, f"trainer.output_dir={out}", *extra]
    with one_launch_at_a_time(True):
        launches = [
            subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                 "--num_machines", str(machines), "--num_processes", str(machines * per_machine),
                 "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                 "-m", "thinkrl", "train", *cmd],
                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for rank in range(machines)
        ]  # fmt: skip
        outputs = [p.communicate(timeout=600) for p in launches]
    code = max(abs(p.returncode) for p in launches)
    return subprocess.CompletedProcess(launches[0].args, code, outputs[0][0], "\n".join(e for _, e in outputs))


@contextmanager
def one_launch_at_a_time(multi: bool):
    """Multi-process launches of parallel test workers (pytest -n) take turns: on 2 cores, two 2-process gloo jobs
    beside a third worker's test only make every process wait on the others."""
    if not multi:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "thinkrl-tests-launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ok(done: subprocess.CompletedProcess) -> None:
    """Exit 0, else the failure: each process's error lines (a rank's own traceback can sit far above the tail
    that torchrun adds) and the tail."""
    errors = [line for line in done.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + done.stderr[-3000:]


def step_metrics(out: Path, step: int) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["step"] == step and "train/loss" in r)
