"""The EMA reference of ``reward.baseline=ema`` (RLP): r(z) = log p_θ(y | x, z) − log p_EMA(y | x).

A frozen copy of the interpreter's weight group, moved towards the live weights after every optimizer step
(``core_algos.ema_update_``), reads each position's context and predicts its targets with no thought, through the
same forwards as the no-thought LM baseline (``lm_baseline``: markers masked, window or per-position reads). Its
weights are a checkpointed object of the run (accelerate custom state), saved and restored bit for bit, so a
resumed run measures rewards against the same reference as an uninterrupted one.

The copy is a ``deepcopy`` of the interpreter model, hooks included, so its forwards count towards that weight
group's compute (forward only: it never takes gradients).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from thinkrl.rl import core_algos


class EmaReference:
    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self._live = dict(model.named_parameters())
        self._ema = dict(self.model.named_parameters())
        # Frozen weights never move; which ones are frozen is settled when the roles are built, before this copy.
        self._moving = [n for n, p in self._live.items() if p.requires_grad]

    @torch.no_grad()
    def reset(self) -> None:
        """The EMA weights become the live ones (after a warm-up that trained them)."""
        for name, param in self._live.items():
            self._ema[name].copy_(param)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the live weights (call after each optimizer step)."""
        ema = [self._ema[n] for n in self._moving]
        core_algos.ema_update_(ema, [self._live[n].detach() for n in self._moving], self.decay)

    @torch.no_grad()
    def logps(self, target_logps) -> torch.Tensor:
        """``target_logps(model) → (log-probs, mask)`` on the EMA copy: the reference log-probs of a batch."""
        logp, _ = target_logps(self.model)
        return logp

    # accelerate custom checkpoint object
    def state_dict(self) -> dict:
        return {"decay": self.decay, "weights": {n: p.detach().cpu().clone() for n, p in self._ema.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self._ema) ^ set(state["weights"])
        if missing:
            raise ValueError(f"the checkpoint's EMA weights do not fit this model ({len(missing)} names differ)")
        with torch.no_grad():
            for name, value in state["weights"].items():
                self._ema[name].copy_(value)
