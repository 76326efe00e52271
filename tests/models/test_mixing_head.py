"""Mixing heads at initialisation: mlp/concat reproduce the base exactly; gate is the configured mixture."""

import math

import pytest
import torch
from torch import nn

from thinkrl.models.mixing_head import MixingHead


@pytest.fixture
def parts():
    torch.manual_seed(0)
    d, v = 16, 11
    lm_base, lm_interp = nn.Linear(d, v, bias=False), nn.Linear(d, v, bias=False)
    return torch.randn(3, 5, d), torch.randn(3, 5, d), lm_base, lm_interp


@pytest.mark.parametrize("form", ["mlp", "concat"])
def test_zero_init_heads_reproduce_the_base(parts, form):
    h_base, h_interp, lm_base, lm_interp = parts
    logp, _ = MixingHead(form, 16)(h_base, h_interp, lm_base, lm_interp)
    assert torch.equal(logp, torch.log_softmax(lm_base(h_base), -1))


def test_gate_mixes_probabilities_at_init_weight(parts):
    h_base, h_interp, lm_base, lm_interp = parts
    logp, w = MixingHead("gate", 16, init_weight=0.6)(h_base, h_interp, lm_base, lm_interp)
    expected = torch.log(0.4 * torch.softmax(lm_base(h_base), -1) + 0.6 * torch.softmax(lm_interp(h_interp), -1))
    assert torch.allclose(logp, expected, atol=1e-6)
    assert torch.allclose(w, torch.full_like(w, 0.6))
    assert math.isclose(float(logp.detach().exp().sum(-1).mean()), 1.0, rel_tol=1e-5)


def test_none_is_the_interpreter(parts):
    h_base, h_interp, lm_base, lm_interp = parts
    logp, w = MixingHead("none", 16)(h_base, h_interp, lm_base, lm_interp)
    assert torch.equal(logp, torch.log_softmax(lm_interp(h_interp), -1)) and bool((w == 1).all())


def test_mlp_head_learns_away_from_zero(parts):
    """Zero init must not be a dead end: one step moves the mixing weight."""
    h_base, h_interp, lm_base, lm_interp = parts
    head = MixingHead("mlp", 16)
    target = torch.randint(0, 11, (3, 5))
    logp, _ = head(h_base, h_interp, lm_base, lm_interp)
    nn.functional.nll_loss(logp.reshape(-1, 11), target.reshape(-1)).backward()
    assert head.net[-1].weight.grad.abs().sum() > 0
