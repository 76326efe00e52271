"""A real 2-process `accelerate launch` (gloo DDP on CPU) against a 1-process run with the same global batch, and the
LR schedule counting global optimizer steps whatever the process count."""

import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from checkpoints import assert_same_state
from launching import COMMON, ONE, ROOT, ok, step_metrics, train, two_processes
from safetensors.torch import load_file

from thinkrl.config import load_config
from thinkrl.distributed.grad_buckets import plan_buckets
from thinkrl.models.roles import build_roles
from thinkrl.rl.learner import build_optimizer
from thinkrl.run.state import make_accelerator


def _weights(out: Path, step: int) -> dict:
    ckpt = out / f"checkpoint-{step}"
    return {f"{f.name}:{k}": v for f in sorted(ckpt.glob("model*.safetensors")) for k, v in load_file(f).items()}


def _scheduler_steps(out: Path, step: int) -> int:
    return torch.load(out / f"checkpoint-{step}" / "scheduler.bin", weights_only=True)["last_epoch"]


def test_one_optimizer_step_advances_the_lr_schedule_once_whatever_the_process_count(tiny_config, monkeypatch):
    """accelerate's scheduler wrapper would step the schedule once per process (it assumes per-process dataloader
    steps); trainer.max_steps counts global steps, so make_accelerator turns that off."""
    cfg = tiny_config("learner.scheduler=linear", "trainer.max_steps=4")
    accelerator = make_accelerator(cfg.trainer, Path(cfg.trainer.output_dir))
    optimizer, scheduler = accelerator.prepare(*build_optimizer(cfg, build_roles(cfg)))
    lr = optimizer.param_groups[0]["lr"]
    for state in (PartialState, AcceleratorState):  # pretend to be one of 2 processes; restored after the test
        monkeypatch.setitem(state._shared_state, "num_processes", 2)
    optimizer.step()
    scheduler.step()
    assert scheduler.scheduler.last_epoch == 1
    assert scheduler.get_last_lr()[0] == pytest.approx(lr * 3 / 4)


# Buckets of 50 kB: the default model's gradients (~1 MB) fill about 20, so the run reduces most of them from the
# gradient hooks while backward runs, in index order (test_grad_buckets.py checks the reducer itself).
BUCKETS = ["trainer.grad_bucket_mb=0.05"]


def _bucket_count(tmp_path: Path) -> int:
    """The buckets the trainer's reducer makes of the run's trainable parameters (the optimizer's, in its order)."""
    cfg = load_config(ROOT / COMMON[1], [*COMMON[2:], *BUCKETS, f"trainer.output_dir={tmp_path / 'unused'}"])
    optimizer, _ = build_optimizer(cfg, build_roles(cfg))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return len(plan_buckets(params, int(cfg.trainer.grad_bucket_mb * 2**20)))


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_across_counts(tmp_path, single_run):
    """Gradients averaged in buckets as backward runs (``grad_buckets``) give the 1-process run, and a 2-process
    checkpoint resumes in one process.

    Against the per-parameter loop the buckets replaced (``trainer.grad_bucket_mb=0``) the weights are equal bit for
    bit after 2 steps (with 2 processes both compute (a + b) / 2 per element); that comparison costs another 40-second
    launch, so it is measured by ``scripts/bench_grad_buckets.py`` (docs/benchmarks.md) and, on the reducer alone, by
    test_grad_buckets.py. Here the reference is the 1-process run, for which Adam bounds the step-2 agreement."""
    double = tmp_path / "two"
    ok(train(two_processes(), double, "trainer.max_steps=2", *BUCKETS))
    buckets = _bucket_count(tmp_path)
    assert 10 < buckets < 100
    for step in (1, 2):  # one all-reduce per bucket, not per parameter
        assert step_metrics(double, step)["train/grad_collectives"] == buckets
    a, b = step_metrics(single_run, 1), step_metrics(double, 1)
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
    # Compute accounting sums the processes' tokens (each did half): the global FLOPs of the step. Padding is counted,
    # and it depends on each process's batch; in this batch every half pads to the same widths as the whole.
    assert b["compute/tokens/A/score_and_loss"] == a["compute/tokens/A/score_and_loss"]
    assert b["compute/flops_total"] == a["compute/flops_total"] > 0
    # After each AdamW step (update ~ lr * g / |g|) weights agree to float noise except where a gradient is ~0,
    # where Adam's normalisation amplifies 1e-7 differences up to lr: compare the mean, bound the max by lr.
    for step in (1, 2):
        wa, wb = _weights(single_run, step), _weights(double, step)
        assert wa.keys() == wb.keys()
        diffs = [(wa[k] - wb[k]).abs() for k in wa]
        assert max(float(d.max()) for d in diffs) <= 1e-3, step
        assert sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs) < 1e-6, step
    assert _scheduler_steps(single_run, 1) == _scheduler_steps(double, 1) == 1  # one LR step per global step
    # the 2-process checkpoint-1 resumes in 1 process, and its step-2 update gives the 1-process run's weights, AdamW
    # moments and next lr
    resumed = tmp_path / "resumed"
    shutil.copytree(double, resumed, ignore=shutil.ignore_patterns("checkpoint-2"))
    ok(train(ONE, resumed, "trainer.max_steps=2", *BUCKETS))
    for key in ("train/loss", "train/lr"):
        assert step_metrics(resumed, 2)[key] == pytest.approx(step_metrics(single_run, 2)[key], rel=1e-4, abs=1e-5)
    assert_same_state(resumed / "checkpoint-2", single_run / "checkpoint-2")
