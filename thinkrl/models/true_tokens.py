"""LM heads for predictions of true tokens: the thought markers get no probability.

The two markers (``<sot>``, ``<eot>``) are added to the vocabulary, so a plain ``log_softmax`` over the LM head
gives them some mass (up to 2.4e-3 on SmolLM2) that the pretrained model spread over real tokens. Every prediction
of a *true* next token (interpreter, base, the mixing head, the no-thought baseline, greedy answers) goes through
``TrueTokenHead``, which sets the markers' logits to ``MASKED_LOGIT``: their ``exp`` underflows to exactly 0 in
float32, so the other tokens' log-probs equal the unmodified model's over its own vocabulary. The reasoner's
policy ("which thought token comes next") keeps the raw head, since it must be able to write ``<eot>``.
"""

from __future__ import annotations

import torch
from torch import nn

# Finite rather than -inf so that p·log p and log-mixtures over whole distributions stay 0 rather than NaN.
MASKED_LOGIT = -1.0e9


class TrueTokenHead:
    """``lm_head(h)`` in float32 with the marker columns masked; called like the head itself (so a sharded head
    still gathers its weight in the call) and reports the head's width (``chunked_logps.vocab_size``)."""

    def __init__(self, lm_head: nn.Module, marker_ids: list[int]):
        self.lm_head = lm_head
        self.marker_ids = sorted(set(marker_ids))
        self.out_features = getattr(lm_head, "out_features", None) or lm_head.num_embeddings
        self._index: dict[torch.device, torch.Tensor] = {}

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        return mask_markers(logits, self._ids(logits.device))

    def _ids(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.marker_ids, dtype=torch.long, device=device)
        return self._index[device]


def mask_markers(logits: torch.Tensor, marker_ids: torch.Tensor) -> torch.Tensor:
    """``logits`` (..., V) with the marker columns set to ``MASKED_LOGIT`` (out of place, so autograd is unaffected
    elsewhere)."""
    return logits.index_fill(-1, marker_ids, MASKED_LOGIT)
