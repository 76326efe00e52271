"""Per-row log-probabilities through an LM head without a (rows × vocabulary) float32 tensor.

The losses need one number per row of hidden states (the log-prob of a target, an action's log-prob and the
policy's entropy), yet ``log_softmax(lm_head(h))`` is (rows, V): with SmolLM2's V = 49k and a step's thousands of
rows that is gigabytes, and autograd keeps several such tensors alive until the backward pass. Here the rows go
through the LM head in chunks of at most ``CHUNK_ELEMENTS`` (rows × V), each chunk inside a non-reentrant
``torch.utils.checkpoint``: the forward keeps only the chunk's inputs and its per-row outputs, and the backward
recomputes the chunk's logits. Values and gradients equal the unchunked computation (tested): every row sees the
same operations, only fewer rows at a time.

The LM head is always *called* as a module (``lm_head(h)``), never read through its weight, so a sharded head
(FSDP2) gathers its weight in the forward and again in the recompute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24  # largest (rows × vocabulary) block of logits/log-probs held at once (64 MiB in float32)


def vocab_size(lm_head: nn.Module) -> int:
    """Output width of an LM head (``out_features`` of the Linear, or ``num_embeddings`` of a tied embedding)."""
    for name in ("out_features", "num_embeddings"):
        if isinstance(getattr(lm_head, name, None), int):
            return getattr(lm_head, name)
    raise TypeError(f"cannot tell the vocabulary size of LM head {type(lm_head).__name__}")


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def map_row_chunks(fn: Callable[..., tuple[torch.Tensor, ...]], *rows: torch.Tensor, vocab: int):
    """``fn`` over row chunks of ``rows`` (tensors sharing their first dimension R), outputs concatenated.

    ``fn(*chunk)`` returns a tuple of per-row tensors (r, ...). Under autograd each chunk is checkpointed, so at most
    one chunk's (r × ``vocab``) intermediates exist at a time, in the forward and in the backward alike."""
    total = rows[0].shape[0]
    step = rows_per_chunk(vocab)
    outputs = []
    for start in range(0, total, step):
        chunk = [r[start : start + step] for r in rows]
        if torch.is_grad_enabled():
            outputs.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            outputs.append(fn(*chunk))
    if not outputs:  # no rows: run fn on the empty chunk for the output shapes and dtypes
        return fn(*rows)
    return tuple(torch.cat(parts) for parts in zip(*outputs))


def _pick(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, ids[..., None]).squeeze(-1)


def target_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(lm_head(hidden).float())`` at ``targets``: hidden (..., d) and targets (...) broadcast against
    each other → (...), float32."""

    def chunk(h, t):
        return (_pick(torch.log_softmax(lm_head(h).float(), dim=-1), t),)

    shape = torch.broadcast_shapes(hidden.shape[:-1], targets.shape)
    hidden, targets = hidden.expand(*shape, hidden.shape[-1]), targets.expand(shape)
    (logp,) = map_row_chunks(
        chunk, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), vocab=vocab_size(lm_head)
    )
    return logp.reshape(targets.shape)
