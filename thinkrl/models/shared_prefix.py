"""Batched forwards that compute each context once and share it across several continuations.

``prefixes`` (N lists, left-padded) are run once with a KV cache; the cache is repeated R times and the
N×R ``suffixes`` (right-padded) are run on top of it. Right padding after the real suffix tokens is safe
without a mask because causal attention never looks forward; left padding of the prefixes is masked.
Positions continue from each prefix's true length, so results equal a full recompute (tested).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (N, max_len), padding on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, lengths): ids (M, max_len) padded on the right, lengths (M,)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), torch.tensor([len(s) for s in seqs], device=device)


def prefill(model: PreTrainedModel, prefixes: list[list[int]], pad_id: int):
    """Run the prefixes once. Returns (cache, mask (N, P), lengths (N,), last logits (N, V))."""
    device = model.device
    ids, mask = left_pad(prefixes, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.past_key_values, mask, mask.sum(-1), out.logits[:, -1]


def decode_step(
    model: PreTrainedModel,
    cache,
    mask: torch.Tensor,
    positions: torch.Tensor,
    ids: torch.Tensor,
    logits_to_keep: int = 0,
):
    """Append ``ids`` (B, S) to each row's cache; ``mask`` covers everything so far incl. ``ids``.

    Returns the output (logits of the last ``logits_to_keep`` new positions, 0 = all; last-layer hidden states)."""
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=logits_to_keep,
    )


def forward_shared_prefix(
    model: PreTrainedModel, prefixes: list[list[int]], suffixes: list[list[int]], pad_id: int, need_logits: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Each prefix once, then R = len(suffixes) // N continuations of it.

    Args: prefixes: N token lists (each non-empty); suffixes: N*R token lists, row i*R + r continues prefix i.
    Returns: logits (N*R, S, V) or None, last hidden states (N*R, S, d), suffix lengths (N*R,)."""
    n = len(prefixes)
    reps = len(suffixes) // n
    assert reps * n == len(suffixes), "suffixes must be a multiple of prefixes"
    cache, prefix_mask, prefix_len, _ = prefill(model, prefixes, pad_id)
    cache.batch_repeat_interleave(reps)
    ids, lengths = right_pad(suffixes, pad_id, model.device)
    mask = torch.cat([prefix_mask.repeat_interleave(reps, 0), torch.ones_like(ids)], dim=1)
    positions = prefix_len.repeat_interleave(reps)[:, None] + torch.arange(ids.shape[1], device=ids.device)
    out = decode_step(model, cache, mask, positions, ids, logits_to_keep=0 if need_logits else 1)
    # Autograd keeps what the backward needs; with gradient checkpointing (models/checkpointing.py) the layers keep
    # the cache object for their recompute, which needs only the prefix: drop the continuation's keys/values now.
    cache.reset()
    return (out.logits if need_logits else None), out.hidden_states[-1], lengths


def forward_two_level(
    model: PreTrainedModel, prefixes: list[list[int]], middles: list[list[int]], tails: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix once, each of its R middles once, then C tails after every middle (context → thought → answers).

    Args: N prefixes; N*R non-empty middles (row i*R + r continues prefix i); N*R*C tails (row m*C + c continues
    middle m, may be empty). Returns (hidden state at each middle's last token (N*R, d), tail hidden states
    (N*R*C, T, d)); the middle's last state predicts a tail's first token."""
    n, m = len(prefixes), len(middles)
    reps, cands = m // n, len(tails) // m
    assert reps * n == m and cands * m == len(tails), "middles/tails must be multiples of prefixes/middles"
    cache, prefix_mask, prefix_len, _ = prefill(model, prefixes, pad_id)
    cache.batch_repeat_interleave(reps)
    mid_ids, mid_len = right_pad(middles, pad_id, model.device)
    mid_mask = (torch.arange(mid_ids.shape[1], device=mid_ids.device) < mid_len[:, None]).long()
    mask = torch.cat([prefix_mask.repeat_interleave(reps, 0), mid_mask], dim=1)
    start = prefix_len.repeat_interleave(reps)
    out = decode_step(
        model,
        cache,
        mask,
        start[:, None] + torch.arange(mid_ids.shape[1], device=mid_ids.device),
        mid_ids,
        logits_to_keep=1,
    )
    hidden = out.hidden_states[-1]
    last = hidden.gather(1, (mid_len - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
    width = max(len(t) for t in tails)
    if width == 0:
        return last, hidden.new_zeros((len(tails), 0, hidden.shape[-1]))
    cache.batch_repeat_interleave(cands)
    tail_ids, _ = right_pad(tails, pad_id, model.device)
    mask = torch.cat([mask.repeat_interleave(cands, 0), torch.ones_like(tail_ids)], dim=1)
    positions = (start + mid_len).repeat_interleave(cands)[:, None] + torch.arange(width, device=tail_ids.device)
    out = decode_step(model, cache, mask, positions, tail_ids, logits_to_keep=1)
    return last, out.hidden_states[-1]
