"""The base model alone: teacher-forced scores for ``--thoughts none`` without any thought row.

``Scorer`` always scores the null thought (row K of its thought axis), since rewards are measured against it. An
evaluation that asks only for ``none`` needs nothing but the base model, so these forwards skip the interpreter's
rows. They read the same tokens as the Scorer's base row (the context's ``data.interpreter_window`` window, then
the target teacher-forced) through the same shared-prefix forwards and the base's own LM head, so the numbers are
the Scorer's up to float error (tested). Text in parallel passes reads each window once, as ``WindowScoring`` does.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from thinkrl.data.windows import WindowBatch
from thinkrl.models.shared_prefix import forward_shared_prefix, forward_two_level

CHUNK_ROWS = 64  # (rows, n, V) log-distributions are built this many rows at a time


def target_states(model: PreTrainedModel, windows: list[list[int]], targets: list[list[int]], pad_id: int):
    """Last hidden states predicting each target token: (N, n, d), n the longest target (shorter ones padded)."""
    suffixes = [[w[-1], *y[:-1]] for w, y in zip(windows, targets)]
    _, hidden, _ = forward_shared_prefix(model, [w[:-1] for w in windows], suffixes, pad_id, need_logits=False)
    return hidden[:, : max(len(y) for y in targets)]


def candidate_states(model: PreTrainedModel, windows: list[list[int]], candidates: list[list[list[int]]], pad_id):
    """States predicting each of C candidate answers per window: (N, C, n, d); the window is computed once."""
    n_pos, c = len(windows), len(candidates[0])
    n = max(len(y) for cands in candidates for y in cands)
    tails = [y[:-1] for cands in candidates for y in cands]
    last, tail = forward_two_level(model, [w[:-1] for w in windows], [[w[-1]] for w in windows], tails, pad_id)
    h = torch.cat([last.repeat_interleave(c, 0)[:, None], tail[:, : n - 1]], dim=1)
    return h.reshape(n_pos, c, n, -1)


def window_states(model: PreTrainedModel, batch: WindowBatch, n: int) -> torch.Tensor:
    """States predicting each valid slot's next n true tokens from one causal read of each window: (N, n, d), the
    slots in the parallel path's order. The window's state at t - 1 + j has read x_<t and y_<j."""
    hidden = model(input_ids=batch.ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # (B, L, d)
    index = ((batch.slot_len - 1)[..., None] + torch.arange(n, device=hidden.device)).clamp_max(hidden.shape[1] - 1)
    states = hidden.gather(1, index.flatten(1)[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, P * n, d)
    return states.view(*index.shape, -1).flatten(0, 1)[batch.valid.flatten()]


def log_distributions(lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (..., n, d) → log-softmax over the vocabulary (..., n, V), in float32."""
    flat = hidden.flatten(0, -3)
    out = [torch.log_softmax(lm_head(flat[s : s + CHUNK_ROWS]).float(), -1) for s in range(0, len(flat), CHUNK_ROWS)]
    return torch.cat(out).reshape(*hidden.shape[:-1], -1)


def target_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """hidden (..., n, d), ids (..., n) → log p(ids) (..., n), never holding more than a chunk's distributions."""
    flat_h, flat_ids = hidden.flatten(0, -3), ids.flatten(0, -2)
    out = [
        torch.log_softmax(lm_head(flat_h[s : s + CHUNK_ROWS]).float(), -1)
        .gather(-1, flat_ids[s : s + CHUNK_ROWS, :, None])
        .squeeze(-1)
        for s in range(0, len(flat_h), CHUNK_ROWS)
    ]
    return torch.cat(out).reshape(ids.shape)
