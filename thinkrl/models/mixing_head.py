"""Mixing heads: per-token blend of the base's no-thought prediction and the interpreter's after-thought one.

Each form returns log-probabilities over the vocabulary and the interpreter's weight per token, so a thought
that does not help can be ignored (weight → 0) without damaging the base. Forms mlp and concat are
zero-initialised so that at initialisation the mixture is exactly the base model; gate starts at
``init_weight`` (the seed used 0.6) and mixes probabilities, not logits.

``forward`` returns whole log-distributions (evaluation reads them), or with ``target_ids`` the same mixture at the
target tokens only, through the LM heads in bounded row chunks (all the training losses need).

Shapes: hidden states ``(..., d)``; outputs ``(..., V)`` and ``(...)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from thinkrl.models import chunked_logps


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

    def blend(self, h_base: torch.Tensor, h_interp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mlp/concat: (the mixed hidden state the base's LM head reads (..., d), interpreter weight (...))."""
        both = torch.cat([h_base, h_interp], dim=-1)
        if self.form == "mlp":
            w = self.net(both)  # (..., 1), unconstrained like Quiet-STaR's
            return h_base + w * (h_interp - h_base), w.squeeze(-1)
        delta = self.net(both)
        weight = delta.norm(dim=-1) / h_base.norm(dim=-1).clamp_min(1e-6)  # relative size of the change
        return h_base + delta, weight

    def gate(self, h_base: torch.Tensor, h_interp: torch.Tensor) -> torch.Tensor:
        """gate: the interpreter's weight w (..., 1), float32."""
        return torch.sigmoid(self.net(torch.cat([h_base, h_interp], dim=-1)).float())

    @staticmethod
    def gate_mix(w: torch.Tensor, logp_base: torch.Tensor, logp_interp: torch.Tensor) -> torch.Tensor:
        """log(w·p_interp + (1 − w)·p_base) from log-probs; w broadcasts against them."""
        return torch.logaddexp(torch.log1p(-w) + logp_base, torch.log(w) + logp_interp)

    def forward(
        self,
        h_base: torch.Tensor,
        h_interp: torch.Tensor,
        lm_head_base: nn.Module,
        lm_head_interp: nn.Module,
        target_ids: torch.Tensor | None = None,
        need_interp: bool = False,
    ):
        """Without ``target_ids``: (log-probs of the mixed prediction (..., V), interpreter weight (...)).

        With ``target_ids`` (broadcastable to h_interp's (...)): the same mixture at the targets only, never
        (..., V) — the LM heads run in checkpointed row chunks (``chunked_logps``); values and gradients equal the
        distributions gathered at the targets. Returns (mixed log-probs (...), interpreter weight (...), the
        interpreter's own target log-probs (...) when the form computes them anyway or ``need_interp``, else None).
        h_base may broadcast against h_interp (e.g. (N, 1, n, d) against (N, K+1, n, d)): the gate then runs the
        base's LM head once per position rather than once per thought row.

        Both are module calls, so a sharded head (FSDP2) has its weights gathered; only hidden states and ids go in,
        so a mixed-precision policy's input cast touches nothing that is float32 by design."""
        if target_ids is None:
            return self._distributions(h_base, h_interp, lm_head_base, lm_head_interp)
        return self._at_targets(h_base, h_interp, lm_head_base, lm_head_interp, target_ids, need_interp)

    def _distributions(self, h_base, h_interp, lm_head_base, lm_head_interp):
        if self.form == "none":
            logp = torch.log_softmax(lm_head_interp(h_interp).float(), dim=-1)
            return logp, torch.ones(logp.shape[:-1], device=logp.device)
        if self.form in ("mlp", "concat"):
            mixed, weight = self.blend(h_base, h_interp)
            return torch.log_softmax(lm_head_base(mixed).float(), dim=-1), weight
        w = self.gate(h_base, h_interp)
        logp_base = torch.log_softmax(lm_head_base(h_base).float(), dim=-1)
        logp_interp = torch.log_softmax(lm_head_interp(h_interp).float(), dim=-1)
        return self.gate_mix(w, logp_base, logp_interp), w.squeeze(-1)

    def _at_targets(self, h_base, h_interp, lm_head_base, lm_head_interp, target_ids, need_interp):
        target_logps = chunked_logps.target_logps
        h_base = h_base[(None,) * (h_interp.dim() - h_base.dim())]  # same number of axes, for the base's ids below
        target_ids = target_ids.expand(h_interp.shape[:-1])
        if self.form == "none":
            logp = target_logps(lm_head_interp, h_interp, target_ids)
            return logp, torch.ones_like(logp), logp
        logp_interp = None
        if self.form == "gate" or need_interp:
            logp_interp = target_logps(lm_head_interp, h_interp, target_ids)
        if self.form in ("mlp", "concat"):
            mixed, weight = self.blend(h_base.expand_as(h_interp), h_interp)
            return target_logps(lm_head_base, mixed, target_ids), weight, logp_interp
        w = self.gate(h_base.expand_as(h_interp), h_interp).squeeze(-1)
        # The base's prediction at h_base's own shape (targets cut to it: they broadcast, so they agree across it).
        base_ids = target_ids[tuple(slice(0, 1) if size == 1 else slice(None) for size in h_base.shape[:-1])]
        logp_base = target_logps(lm_head_base, h_base, base_ids)
        return self.gate_mix(w, logp_base, logp_interp), w, logp_interp
