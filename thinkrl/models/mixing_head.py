"""Mixing heads: per-token blend of the base's no-thought prediction and the interpreter's after-thought one.

Each form returns log-probabilities over the vocabulary and the interpreter's weight per token, so a thought
that does not help can be ignored (weight → 0) without damaging the base. Forms mlp and concat are
zero-initialised so that at initialisation the mixture is exactly the base model; gate starts at
``init_weight`` (the seed used 0.6) and mixes probabilities, not logits.

Shapes: hidden states ``(..., d)``; outputs ``(..., V)`` and ``(...)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _zero_init_mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class MixingHead(nn.Module):
    def __init__(self, form: str, hidden_size: int, init_weight: float = 0.6, mlp_hidden: int = 0):
        super().__init__()
        self.form = form
        width = mlp_hidden or hidden_size
        if form == "mlp":  # Quiet-STaR's talk head: scalar weight from both hidden states, mixes hidden states
            self.net = _zero_init_mlp(2 * hidden_size, width, 1)
        elif form == "concat":  # vector residual from both hidden states added to the base's
            self.net = _zero_init_mlp(2 * hidden_size, width, hidden_size)
        elif form == "gate":  # sigmoid gate, bias set so the initial weight is init_weight
            self.net = nn.Linear(2 * hidden_size, 1)
            nn.init.zeros_(self.net.weight)
            nn.init.constant_(self.net.bias, math.log(init_weight / (1 - init_weight)))
        elif form != "none":
            raise ValueError(f"unknown mixing head form {form}")

    def forward(
        self, h_base: torch.Tensor, h_interp: torch.Tensor, lm_head_base: nn.Module, lm_head_interp: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (log-probs of the mixed prediction (..., V), interpreter weight (...))."""
        if self.form == "none":
            logp = torch.log_softmax(lm_head_interp(h_interp).float(), dim=-1)
            return logp, torch.ones(logp.shape[:-1], device=logp.device)
        both = torch.cat([h_base, h_interp], dim=-1)
        if self.form == "mlp":
            w = self.net(both)  # (..., 1), unconstrained like Quiet-STaR's
            mixed = h_base + w * (h_interp - h_base)
            return torch.log_softmax(lm_head_base(mixed).float(), dim=-1), w.squeeze(-1)
        if self.form == "concat":
            delta = self.net(both)
            weight = delta.norm(dim=-1) / h_base.norm(dim=-1).clamp_min(1e-6)  # relative size of the change
            return torch.log_softmax(lm_head_base(h_base + delta).float(), dim=-1), weight
        w = torch.sigmoid(self.net(both).float())  # gate
        logp_base = torch.log_softmax(lm_head_base(h_base).float(), dim=-1)
        logp_interp = torch.log_softmax(lm_head_interp(h_interp).float(), dim=-1)
        mixed = torch.logaddexp(torch.log1p(-w) + logp_base, torch.log(w) + logp_interp)
        return mixed, w.squeeze(-1)
