"""A real 2-process `accelerate launch` (gloo DDP on CPU) against a 1-process run with the same global batch, and the
LR schedule counting global optimizer steps whatever the process count."""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from checkpoints import assert_same_state
from launching import ONE, ok, step_metrics, train, two_processes
from safetensors.torch import load_file

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


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_across_counts(tmp_path, single_run):
    double = tmp_path / "two"
    ok(train(two_processes(), double, "trainer.max_steps=1"))
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
    # After one AdamW step (update ~ lr * g / |g|) weights agree to float noise except where a gradient is ~0,
    # where Adam's normalisation amplifies 1e-7 differences up to lr: compare the mean, bound the max by lr.
    wa, wb = _weights(single_run, 1), _weights(double, 1)
    assert wa.keys() == wb.keys()
    diffs = [(wa[k] - wb[k]).abs() for k in wa]
    assert max(float(d.max()) for d in diffs) <= 1e-3
    assert sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs) < 1e-6
    assert _scheduler_steps(single_run, 1) == _scheduler_steps(double, 1) == 1  # one LR step per global step
    # the 2-process checkpoint resumes in 1 process, with max_steps raised from 1 to 2 (the linear schedule now
    # decays over 2 steps), and its step-2 update gives the 1-process run's weights, AdamW moments and next lr
    ok(train(ONE, double, "trainer.max_steps=2"))
    for key in ("train/loss", "train/lr"):
        assert step_metrics(double, 2)[key] == pytest.approx(step_metrics(single_run, 2)[key], rel=1e-4, abs=1e-5)
    assert_same_state(double / "checkpoint-2", single_run / "checkpoint-2")
