"""Coconut's continuous-thought forward, KV-cached, and batched greedy generation with latents.

At a ``<|latent|>`` position t the model's input is not a token embedding but the last hidden state it produced at
t-1 (the "continuous thought"). So a sequence with n latents needs n+1 sequential passes: each pass computes the
positions up to the next latent, whose input embedding is then known. Each pass appends to one KV cache, so the
positions before a latent are computed once (the original code did the same; the pitfall it hit was a cache whose
length, positions and mask disagree, DESIGN.md §10).

Latent positions may differ between rows. The passes stop at every *column* that holds a latent in some row, so the
result is right for any layout; the number of passes is (distinct latent columns) + 1. The collator in
``thinkrl.coconut.data`` left-pads rows so that their latents share columns, which makes it exactly n+1 for n
latents (test: ``tests/coconut/test_latent_forward.py``; benchmark: ``scripts/bench_coconut.py``).

``naive_latent_forward`` recomputes the whole prefix for every pass with no cache: the reference the tests and the
benchmark compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class LatentOutput:
    logits: torch.Tensor  # (B, T, V), or (B, 1, V) with last_only
    cache: DynamicCache
    inputs_embeds: torch.Tensor  # (B, T, d) with the latent rows filled in
    num_passes: int


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def latent_columns(latent_mask: torch.Tensor) -> list[int]:
    """Sorted columns that hold a latent in at least one row; a latent at column 0 has no preceding state."""
    cols = torch.nonzero(latent_mask.any(0)).flatten().tolist()
    if cols and cols[0] == 0:
        raise ValueError("a <|latent|> token cannot be the first position: it needs the hidden state before it")
    return cols


def _fill(embeds: torch.Tensor, latent_mask: torch.Tensor, col: int, hidden: torch.Tensor) -> torch.Tensor:
    """Out-of-place: rows with a latent at ``col`` take ``hidden`` (B, d) as their input there (keeps autograd)."""
    rows = torch.nonzero(latent_mask[:, col]).flatten()
    cols = torch.full_like(rows, col)
    return embeds.index_put((rows, cols), hidden[rows].to(embeds.dtype))


def latent_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    latent_mask: torch.Tensor,
    last_only: bool = False,
) -> LatentOutput:
    """Forward with continuous thoughts: one KV cache, one pass per latent column plus one.

    Args: input_ids, attention_mask, latent_mask: (B, T); latent_mask marks ``<|latent|>`` positions (their ids are
    only placeholders). last_only: keep just the last position's logits (generation).
    Returns logits (B, T, V) (or (B, 1, V)), the cache over all T positions, the filled embeddings and the pass count.
    """
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, d)
    positions = position_ids(attention_mask)
    cache = DynamicCache(config=model.config)
    width = input_ids.shape[1]
    bounds = latent_columns(latent_mask) + [width]
    chunks, start = [], 0
    for end in bounds:
        # positions [start, end) are known now: everything before the latent at `end` has been filled in.
        out = model(
            inputs_embeds=embeds[:, start:end],
            attention_mask=attention_mask[:, :end],
            position_ids=positions[:, start:end],
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=end < width,
            logits_to_keep=1 if last_only else 0,
        )
        cache = out.past_key_values
        if not last_only:
            chunks.append(out.logits)
        if end < width:
            embeds = _fill(embeds, latent_mask, end, out.hidden_states[-1][:, -1])  # state at end-1 → input at end
        start = end
    logits = out.logits if last_only else torch.cat(chunks, dim=1)
    return LatentOutput(logits, cache, embeds, len(bounds))


def naive_latent_forward(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_mask: torch.Tensor
) -> LatentOutput:
    """Reference: for every latent column recompute the whole prefix from scratch (no cache). Logits (B, T, V)."""
    embeds = model.get_input_embeddings()(input_ids)
    positions = position_ids(attention_mask)
    cols = latent_columns(latent_mask)
    for col in cols:
        out = model(
            inputs_embeds=embeds[:, :col],
            attention_mask=attention_mask[:, :col],
            position_ids=positions[:, :col],
            use_cache=False,
            output_hidden_states=True,
        )
        embeds = _fill(embeds, latent_mask, col, out.hidden_states[-1][:, -1])
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return LatentOutput(out.logits, None, embeds, len(cols) + 1)


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (N, max_len), padded on the left so that every row ends in the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_with_latents(
    model: PreTrainedModel,
    prompts: list[list[int]],
    latent_id: int,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    feed_latents: bool = True,
) -> list[list[int]]:
    """Batched greedy decoding after prompts that may hold latents (any batch size, any latent layout).

    The prompts (left-padded) go through ``latent_forward`` once; then one cached step per new token. With
    ``feed_latents=False`` latent tokens are ordinary (pause) tokens. Returns each row's new tokens, up to and
    including its eos."""
    device = model.device
    ids, mask = left_pad(prompts, pad_id, device)
    latents = (ids == latent_id) & mask.bool() if feed_latents else torch.zeros_like(mask, dtype=torch.bool)
    out = latent_forward(model, ids, mask, latents, last_only=True)
    cache, logits = out.cache, out.logits[:, -1]
    next_pos = mask.sum(-1)  # (B,) position of the first new token
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1).masked_fill(done, pad_id)  # (B,)
        new_tokens.append(token)
        done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=(next_pos + step)[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = step_out.past_key_values, step_out.logits[:, -1]
    rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    result = []
    for row in rows:
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        result.append(row[:cut])
    return result
