"""Model-level parallel passes: read a batch of windows once, then run thought tokens at all slots together.

``read_window`` is an ordinary causal forward over the windows (B, L) that keeps every layer's keys/values and the
last hidden states. ``run_passes`` feeds tokens (B, R, P, S) — for each window b, row r and slot p, S tokens of
that slot's thought sequence — through the same model with ``parallel_attention`` (see that module for the
attention itself). Token s of slot p sits at position ``slot_len[p] + offset + s``, exactly where it would sit in
the per-position sequence ``window[:slot_len[p]] ⊕ thought``.

Windows are right-padded: padding comes after every slot's context, and causal attention never looks forward.

``set_attention_kernel`` picks, per model, the attention the passes run (``rollout.attention_kernel``): the hand merge
of ``parallel_attention`` or the block-sparse ``flex_attention`` of ``flex_passes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from thinkrl.config import ATTENTION_KERNELS as KERNELS
from thinkrl.models.host_memory import trim_around_pass
from thinkrl.models.parallel_attention import PassContext, check_supported, parallel_attention

KERNEL_ATTR = "thinkrl_attention_kernel"  # set on a model by ``set_attention_kernel``; "merge" when absent


def set_attention_kernel(model, kernel: str) -> None:
    """Which attention ``run_passes`` uses for ``model`` (``rollout.attention_kernel``): merge (the hand merge of
    ``parallel_attention``) or flex (``flex_passes``); auto is merge. Kept on the model object, so copies of it
    (the EMA reference's deepcopy) keep it too."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    setattr(model, KERNEL_ATTR, "flex" if kernel == "flex" else "merge")


@dataclass
class WindowRead:
    """One model's pass over the windows: per-layer keys/values and last-layer hidden states (B, L, d)."""

    window_kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: torch.Tensor


def read_window(model: PreTrainedModel, window_ids: torch.Tensor) -> WindowRead:
    """Causal forward over ``window_ids`` (B, L); differentiable under grad."""
    check_supported(model)
    b, length = window_ids.shape
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=window_ids,
        position_ids=torch.arange(length, device=window_ids.device).expand(b, -1),
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return WindowRead(kv, out.hidden_states[-1])


def run_passes(
    model: PreTrainedModel,
    window: WindowRead,
    tokens: torch.Tensor,
    slot_len: torch.Tensor,
    offset: int = 0,
    history: dict | None = None,
    need_logits: bool = False,
):
    """Thought tokens (B, R, P, S) after the window; ``history`` (a dict, filled in place) carries earlier passes'
    keys/values when tokens arrive one pass at a time (sampling).

    Returns (last hidden states (B, R, P, S, d), logits (B, R, P, S, V) or None)."""
    b, r, p, s = tokens.shape
    ctx = PassContext(
        window.window_kv,
        slot_len,
        r,
        p,
        s,
        history if history is not None else {},
        keep_history=history is not None,
        entries=len(next(iter(history.values()))[0]) if history else 0,  # the passes before this one
        kernel=getattr(model, KERNEL_ATTR, "merge"),
    )
    steps = torch.arange(s, device=tokens.device)
    positions = (slot_len[:, None, :, None] + offset + steps).expand(b, r, p, s)
    with parallel_attention(model):
        out = model(
            input_ids=tokens.reshape(b, r * p * s),
            position_ids=positions.reshape(b, r * p * s),
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=0 if need_logits else 1,
            thinkrl_passes=ctx,
        )
    hidden = out.hidden_states[-1].reshape(b, r, p, s, -1)
    logits = out.logits.reshape(b, r, p, s, -1) if need_logits else None
    trim_around_pass(out.hidden_states[-1])  # CPU: the pass's freed temporaries go back to the system
    return hidden, logits
