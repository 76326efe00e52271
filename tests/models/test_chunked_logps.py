"""Chunked LM-head log-probs equal the unchunked ones (values and gradients, fp32), and keep no (rows, V) tensor.

Every comparison runs the existing full-distribution code (``MixingHead`` without targets, ``policy.action_terms``)
as the reference, with ``CHUNK_ELEMENTS`` shrunk so that the rows go through the LM heads in several chunks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import thinkrl.models.chunked_logps as chunked
from thinkrl.models.chunked_logps import map_row_chunks, target_logps
from thinkrl.models.mixing_head import MixingHead
from thinkrl.rollout.policy import action_terms, hidden_action_terms

TOL = 1e-6
D, V = 16, 37


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 5 * V)  # 5 rows per chunk


def _heads():
    torch.manual_seed(0)
    return nn.Linear(D, V), nn.Linear(D, V, bias=False)


def _leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def _grads(out: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of ``out`` (zeros where a tensor gets none)."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def _assert_close(a, b):
    """Within TOL, relative to the tensor's scale where that exceeds 1 (large fp32 gradients round at ~1e-7 of it)."""
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a / scale, b / scale, atol=TOL, rtol=0)


def _saved_numel(fn) -> int:
    """Largest tensor autograd keeps for the backward pass while ``fn`` runs (checkpointed chunks keep none)."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_target_logps_equal_log_softmax_values_and_gradients():
    lm_head, _ = _heads()
    (hidden,) = _leaves((3, 7, D))
    targets = torch.randint(0, V, (3, 7))
    ref = torch.log_softmax(lm_head(hidden).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    out = target_logps(lm_head, hidden, targets)
    _assert_close(out, ref)
    params = [hidden, *lm_head.parameters()]
    for a, b in zip(_grads(out, params), _grads(ref, params)):
        _assert_close(a, b)


def test_target_logps_keep_no_vocabulary_sized_tensor_for_backward():
    lm_head, _ = _heads()
    (hidden,) = _leaves((40, D))
    targets = torch.randint(0, V, (40,))
    assert _saved_numel(lambda: torch.log_softmax(lm_head(hidden), -1)) >= 40 * V  # the unchunked reference does
    assert _saved_numel(lambda: target_logps(lm_head, hidden, targets)) <= 40 * D  # inputs only, no chunk's logits


def test_map_row_chunks_handles_no_rows_and_no_grad():
    lm_head, _ = _heads()
    empty = target_logps(lm_head, torch.zeros(0, D), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    with torch.no_grad():
        out = map_row_chunks(lambda h: (lm_head(h).sum(-1),), torch.randn(12, D), vocab=V)
    assert out[0].shape == (12,) and not out[0].requires_grad


def _random_head(form: str) -> MixingHead:
    head = MixingHead(form, D, init_weight=0.6)
    torch.manual_seed(3)
    for p in head.parameters():  # leave the zero init, so that both hidden states matter
        nn.init.normal_(p, std=0.3)
    return head


@pytest.mark.parametrize("form", ["none", "gate", "mlp", "concat"])
@pytest.mark.parametrize("broadcast_ids", [False, True])
def test_mixing_head_at_targets_equals_gathered_distributions(form, broadcast_ids):
    """(N, K+1, n) targets against the full (N, K+1, n, V) mixture; h_base broadcasts over the thought rows, and so
    may the targets (what the scorer passes: (N, 1, n))."""
    lm_base, lm_interp = _heads()
    head = _random_head(form)
    h_base, h_interp = _leaves((2, 1, 3, D), (2, 4, 3, D))
    target_ids = torch.randint(0, V, (2, 1, 3))
    ids = target_ids.expand(-1, 4, -1)

    full, w_ref = head(h_base.expand_as(h_interp), h_interp, lm_base, lm_interp)
    ref = full.gather(-1, ids[..., None]).squeeze(-1)
    interp_ref = torch.log_softmax(lm_interp(h_interp).float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    given = target_ids if broadcast_ids else ids
    out, w, interp = head(h_base, h_interp, lm_base, lm_interp, target_ids=given, need_interp=True)
    _assert_close(out, ref)
    _assert_close(w, w_ref)
    _assert_close(interp, interp_ref)
    params = [h_base, h_interp, *lm_base.parameters(), *lm_interp.parameters(), *head.parameters()]
    for a, b in zip(_grads(out, params), _grads(ref, params)):
        _assert_close(a, b)
    if form not in ("none", "gate"):  # gate and none need the interpreter's log-probs anyway
        assert head(h_base, h_interp, lm_base, lm_interp, target_ids=given)[2] is None


@pytest.mark.parametrize("fixed_length", [False, True])
def test_policy_terms_from_hidden_states_equal_action_terms(fixed_length):
    lm_head, _ = _heads()
    (hidden,) = _leaves((2, 3, 5, D))
    actions = torch.randint(2, V, (2, 3, 5))
    mask = torch.rand(2, 3, 5) > 0.3
    mask[0, 0] = False  # a thought with no tokens
    args = (0.7, 0, 1, fixed_length)  # temperature, sot, eot, fixed length
    ref_logps, ref_entropy = action_terms(lm_head(hidden), actions, mask, *args)
    logps, entropy = hidden_action_terms(lm_head, hidden, actions, mask, *args)
    _assert_close(logps, ref_logps)
    _assert_close(entropy, ref_entropy)
    params = [hidden, *lm_head.parameters()]
    for a, b in zip(_grads(logps + 0.3 * entropy, params), _grads(ref_logps + 0.3 * ref_entropy, params)):
        _assert_close(a, b)
    assert _saved_numel(lambda: hidden_action_terms(lm_head, hidden, actions, mask, *args)) <= hidden.numel()
