"""Bookkeeping shared by the HF samplers: one sampled token per row per step → a ``ThoughtBatch``.

Rows are positions × K thoughts, position-major. A row is *active* until it samples the end token; its later steps
are ignored (not actions, not counted in its length).
"""

from __future__ import annotations

import torch

from thinkrl.rollout.base import ThoughtBatch
from thinkrl.rollout.policy import policy_logits, sample_tokens


class ThoughtRecorder:
    def __init__(self, positions: int, k: int, max_len: int, pad_id: int, device):
        rows = positions * k
        self.positions, self.k, self.pad_id = positions, k, pad_id
        self.ids = torch.full((rows, max_len), pad_id, dtype=torch.long, device=device)
        self.logps = torch.zeros((rows, max_len), device=device)
        self.acted = torch.zeros((rows, max_len), dtype=torch.bool, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    def step(self, t: int, logits: torch.Tensor, generators: list[torch.Generator], cfg, sot_id: int, eot_id: int):
        """Sample step ``t`` from raw logits (rows, V) with each position's own generator (K rows of noise each).

        Returns the tokens to feed next (rows,): the sample, or padding for rows already finished."""
        noise = torch.cat([torch.rand((self.k, logits.shape[-1]), generator=g) for g in generators])
        fixed = cfg.length_mode == "fixed"
        tokens, token_logps = sample_tokens(
            policy_logits(logits, cfg.temperature, sot_id, eot_id, fixed), cfg.top_p, noise.to(logits.device)
        )
        active = ~self.done
        self.ids[active, t], self.logps[active, t], self.acted[active, t] = tokens[active], token_logps[active], True
        stopped = active & (tokens == eot_id)
        self.lengths += (active & ~stopped).long()
        self.done |= stopped
        return torch.where(active, tokens, torch.full_like(tokens, self.pad_id))

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def result(self, fixed: bool) -> ThoughtBatch:
        finished = self.done if not fixed else torch.ones_like(self.done)
        width = int(self.acted.sum(-1).max())
        shape = (self.positions, self.k, -1)
        return ThoughtBatch(
            self.ids[:, :width].reshape(shape),
            self.acted[:, :width].reshape(shape),
            self.logps[:, :width].reshape(shape),
            finished.reshape(self.positions, self.k),
            self.lengths.reshape(self.positions, self.k),
        )
