"""A real 2-process `accelerate launch` (gloo DDP on CPU) against a 1-process run with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--config",
    "configs/default.yaml",
    "trainer.lm_warmup_steps=0",
    "trainer.batch_positions=8",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.eval_every=0",
    "trainer.save_every=1",
    "data.eval_positions=8",
    "trainer.num_threads=1",
]


def _run(launcher: list[str], out: Path, *extra: str) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "thinkrl", "train", *COMMON, f"trainer.output_dir={out}", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _step(out: Path, step: int) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["step"] == step and "train/loss" in r)


def _weights(out: Path, step: int) -> dict:
    ckpt = out / f"checkpoint-{step}"
    return {f"{f.name}:{k}": v for f in sorted(ckpt.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_across_counts(tmp_path):
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/accelerate/cpu-2proc.yaml"),
    ]
    single, double = tmp_path / "one", tmp_path / "two"
    _run([sys.executable], single, "trainer.max_steps=2")
    _run(accelerate, double, "trainer.max_steps=1")
    a, b = _step(single, 1), _step(double, 1)
    grad_keys = [k for k in a if k.startswith("train/grad_norm/")]
    assert len(grad_keys) == 3  # model A, model B, head: gradients compared per parameter group
    for key in (
        "train/loss",
        "train/reward",
        "train/grad_norm",
        "train/interpreter_nll",
        "train/policy_loss",
        *grad_keys,
    ):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # After one AdamW step (update ~ lr * g / |g|) weights agree to float noise except where a gradient is ~0,
    # where Adam's normalisation amplifies 1e-7 differences up to lr: compare the mean, bound the max by lr.
    wa, wb = _weights(single, 1), _weights(double, 1)
    assert wa.keys() == wb.keys()
    diffs = [(wa[k] - wb[k]).abs() for k in wa]
    assert max(float(d.max()) for d in diffs) <= 1e-3
    assert sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs) < 1e-6
    # the 2-process checkpoint resumes in 1 process and continues exactly like the 1-process run
    _run([sys.executable], double, "trainer.max_steps=2")
    assert _step(double, 2)["train/loss"] == pytest.approx(_step(single, 2)["train/loss"], rel=1e-4, abs=1e-5)
