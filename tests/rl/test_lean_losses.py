"""Memory-lean losses: the learner's numbers do not change, only what autograd keeps.

* ``learner.lean_losses``: target log-probs and policy terms from hidden states in checkpointed LM-head chunks equal
  the full-logits path (scores, stats, loss and every gradient), per position and in parallel passes.
* ``model.*.gradient_checkpointing``: decoder layers recomputed in the backward give the same loss and gradients,
  including the shared-prefix KV-cache forwards and eval-mode (pretrained-style) models, and really recompute.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from stock_models import stock_model

from thinkrl.config import load_config
from thinkrl.data.positions import text_pool
from thinkrl.data.windows import WindowPool, positions_of, window_batch
from thinkrl.models.checkpointing import decoder_layers, enable_checkpointing, is_checkpointed
from thinkrl.models.roles import build_roles
from thinkrl.models.shared_prefix import forward_shared_prefix
from thinkrl.rl.learner import PositionScoring, compute_loss
from thinkrl.rl.scoring import Scorer
from thinkrl.rl.window_scoring import WindowScoring
from thinkrl.rollout.hf_actor import HFRolloutActor

TOL = 1e-6
BASE = [
    "model.default.scratch.hidden_size=32",
    "model.default.scratch.num_layers=2",
    "model.default.scratch.num_heads=2",
    "model.default.scratch.intermediate_size=64",
    "data.n_ahead=2",
    "rollout.num_thoughts=3",
    "rollout.max_thought_len=4",
    "learner.base_weight=0.5",
    "learner.entropy_coef=0.1",
    "trainer.report_to=none",
]


def _setup(overrides: list[str], parallel: bool, seed: int = 0):
    """(cfg, roles, thoughts, make_scoring) on three random-text windows with a thought position every 2 tokens."""
    cfg = load_config(None, [*BASE, *overrides])
    torch.manual_seed(seed)
    roles = build_roles(cfg)
    for p in roles.head.parameters():  # away from the zero init, so that the head mixes both models
        torch.nn.init.normal_(p, std=0.1)
    pad = roles.tokenizer.pad_token_id
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, len(roles.tokenizer) - 2, size) for size in (14, 14, 9)]
    windows = list(WindowPool(text_pool(docs, "every_k", n_ahead=2, context_len=12, every_k=2)))
    positions = positions_of(windows)
    contexts, targets = [p.context_ids for p in positions], [p.target_ids for p in positions]
    seeds = list(range(100, 100 + len(positions)))
    batch = window_batch(windows, pad)
    actor = HFRolloutActor(cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, pad)
    scorer = Scorer(roles, [], cfg.data.interpreter_window, cfg.reward.source)
    k = cfg.rollout.num_thoughts
    thoughts = actor.sample_windows(batch, k, seeds) if parallel else actor.sample(contexts, k, seeds)

    def make_scoring():
        if parallel:
            return WindowScoring(cfg, roles, scorer, batch)
        return PositionScoring(roles, scorer, contexts, targets)

    return cfg, roles, thoughts, make_scoring


def _loss_and_grads(cfg, roles, thoughts, scoring):
    params = [p for m in roles.modules().values() for p in m.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    out = compute_loss(cfg, scoring, thoughts)
    out.loss.backward()
    return out, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def _assert_same(ref, new):
    (o0, g0), (o1, g1) = ref, new
    for name in ("logp", "logp_reward", "logp_base", "weight"):
        torch.testing.assert_close(getattr(o1.scores, name), getattr(o0.scores, name), atol=TOL, rtol=0)
    assert o0.stats.keys() == o1.stats.keys()
    for key in o0.stats:
        assert o1.stats[key] == pytest.approx(o0.stats[key], abs=TOL), key
    torch.testing.assert_close(o1.advantages, o0.advantages, atol=TOL, rtol=0)
    assert len(g0) == len(g1) and any(float(g.abs().max()) > 0 for g in g0)
    for a, b in zip(g0, g1):
        scale = max(1.0, float(a.abs().max()))  # fp32 rounding is relative to the gradient's size
        torch.testing.assert_close(b / scale, a / scale, atol=TOL, rtol=0)


GATE_SEPARATE = ["head.form=gate", "reward.source=interpreter", "model.weight_groups=[A,B,C]"]
LEAN_CASES = [
    # (overrides, parallel passes)
    (["data.interpreter_window=3"], False),
    ([*GATE_SEPARATE, "data.interpreter_window=3"], False),
    (["head.form=concat", "rollout.length_mode=fixed"], False),
    ([], True),
    (["head.form=gate", "model.weight_groups=[A,B,A]"], True),
    (["head.form=none", "rollout.length_mode=fixed"], True),
    (["head.form=concat", "data.interpreter_window=6"], True),  # windowed scores go through the per-position scorer
]


def _ids(cases):
    return [f"{' '.join(o) or 'default'}-{'par' if p else 'pos'}" for o, p in cases]


@pytest.mark.parametrize("overrides,parallel", LEAN_CASES, ids=_ids(LEAN_CASES))
def test_lean_losses_equal_full_logits(overrides, parallel):
    cfg, roles, thoughts, make_scoring = _setup(overrides, parallel)
    results = []
    for lean in (False, True):
        cfg.learner.lean_losses = lean
        results.append(_loss_and_grads(cfg, roles, thoughts, make_scoring()))
    _assert_same(*results)


CHECKPOINT_CASES = [
    (["data.interpreter_window=0"], False),  # shared-prefix forwards on a KV cache (context once, K thoughts)
    (["model.weight_groups=[A,B,C]", "head.form=gate", "learner.lean_losses=false"], False),
    (["model.default.lora.r=4", "model.weight_groups=[A,B,A]"], False),
    ([], True),  # window read on a cache + parallel passes
]


@pytest.mark.parametrize("overrides,parallel", CHECKPOINT_CASES, ids=_ids(CHECKPOINT_CASES))
@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(overrides, parallel, train_mode):
    """Eval mode too: pretrained models load in it and the trainer leaves them there."""
    results, calls = [], []
    for checkpointing in (False, True):
        cfg, roles, thoughts, make_scoring = _setup(
            [*overrides, f"model.default.gradient_checkpointing={str(checkpointing).lower()}"], parallel
        )
        for model in roles.models.values():
            assert is_checkpointed(model) == checkpointing
            model.train(train_mode)
        layer = decoder_layers(roles.model("interpreter"))[0]
        seen = []
        layer.mlp.register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))  # pre: recomputes stop early
        results.append((thoughts, _loss_and_grads(cfg, roles, thoughts, make_scoring())))
        calls.append(len(seen))
    (t0, ref), (t1, new) = results
    assert torch.equal(t0.thought_ids, t1.thought_ids)  # sampling (no grad) is untouched
    _assert_same(ref, new)
    assert calls[1] > calls[0]  # the backward ran the layers again


def test_gradient_checkpointing_is_per_weight_group_and_survives_a_deep_copy():
    group_b = ["model.groups.B.path=scratch", "model.groups.B.gradient_checkpointing=true"]
    cfg = load_config(None, [*BASE, "model.weight_groups=[A,B,A]", *group_b])
    roles = build_roles(cfg)
    assert not is_checkpointed(roles.models["A"]) and is_checkpointed(roles.models["B"])
    clone = copy.deepcopy(roles.models["B"])
    layer = decoder_layers(clone)[0]
    assert is_checkpointed(clone) and layer.forward.__self__ is layer


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_checkpointed_stock_models_equal_on_a_shared_prefix(arch):
    """forward_shared_prefix (prefill, cache repeated, continuation) of stock transformers models: the same outputs
    and parameter gradients with every layer checkpointed (transformers' own switch would drop the prefix)."""
    model = stock_model(arch)
    prefixes = [[5, 6, 7, 8], [9, 10]]
    suffixes = [[11, 12, 13], [14], [15, 16], [17, 18, 19]]
    results = []
    for checkpointing in (False, True):
        copy_ = copy.deepcopy(model)
        if checkpointing:
            assert enable_checkpointing(copy_) == 2
        logits, hidden, _ = forward_shared_prefix(copy_, prefixes, suffixes, pad_id=0)
        (logits.log_softmax(-1)[..., 3].sum() + hidden.square().mean()).backward()
        results.append((logits.detach(), [p.grad.clone() for p in copy_.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=TOL, rtol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=TOL, rtol=0)
