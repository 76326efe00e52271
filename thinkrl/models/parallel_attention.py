"""Attention for thoughts at many positions of one window, plugged into stock transformers models.

A window of L tokens is read once (an ordinary causal forward whose keys/values are kept). Then *passes* run:
the queries are laid out ``(R rows, P slots, S tokens)``: row r (a thought sample, or the null thought), slot p
(a thought position whose context is the window's first ``slot_len[p]`` tokens), token s of that slot's thought
sequence. A query attends to
  (a) the window's keys ``< slot_len[p]`` — shared by every row and slot, never copied, and
  (b) its own slot's earlier thought tokens (the *diagonal*: same row, same slot), elementwise per (r, p).
Each part returns its output and log-normaliser; they merge exactly: with ``lse = logaddexp(lse_a, lse_b)``,
``out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b`` — the online-softmax rule, so the result equals one
softmax over (a) ∪ (b), i.e. the per-position forward of ``window[:t] ⊕ thought``.

Cost per pass: part (a) is the window attention of one plain forward per row; part (b) is R·P·S·(S+S_prev)
dot products. Nothing of size P × (P·S) exists (the dense mask of the official Quiet-STaR code). Under grad,
part (a) is recomputed in backward (activation checkpointing) and computed in slot chunks, so no
L × L × passes tensor is kept.

The function is registered in transformers' ``AttentionInterface`` and switched on per forward
(``parallel_attention``); models keep their own modeling code (Llama, Qwen2/3, Mistral, GPT-2, SmolLM2, ...).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from thinkrl.errors import ConfigError

ATTN_NAME = "thinkrl_parallel"
# Model types whose attention modules hand rotated keys/values (B, H, T, D) to the attention interface and accept
# position_ids: checked, and exercised by tests for llama and gpt2.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "olmo", "olmo2", "phi3", "granite")
# Slots per fused attention call, and a bound on one call's mask (queries × keys) whatever the window length.
SLOTS_PER_CALL = 64
CHUNK_ELEMENTS = 1 << 24


@dataclass
class PassContext:
    """What one parallel forward needs besides its own tokens.

    window_kv: per layer (keys, values) of the window pass, each (B, Hkv, L, D).
    slot_len: (B, P) window tokens visible to each slot (its context length t).
    rows, slots, tokens: R, P, S of this forward's queries, laid out (r, p, s).
    history: per layer (keys, values) (B, Hkv, R, P, S_prev, D) of earlier passes of the same thoughts (sampling
    runs one token per pass); ``keep_history`` appends this pass's keys/values to it."""

    window_kv: list[tuple[torch.Tensor, torch.Tensor]]
    slot_len: torch.Tensor
    rows: int
    slots: int
    tokens: int
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    keep_history: bool = False


def check_supported(model) -> None:
    model_type = model.config.get_text_config().model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"parallel thought passes do not support model type {model_type!r} (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); set rollout.thought_passes=per_position"
        )


@contextmanager
def parallel_attention(model):
    """Route the model's attention through ``parallel_attention_forward`` for the forwards inside the block.

    The mask builders skip unknown attention names, so no (N, N) causal mask is built either."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def _window_and_merge(q, keys, values, slot_len, scaling: float, out_b, lse_b, slots_per_call: int):
    """Part (a) and the merge in fused ``scaled_dot_product_attention`` calls.

    q (B, Hkv, g, R, P, S, D); keys/values (B, Hkv, L, D); slot_len (B, P); part (b)'s out_b (like q) and lse_b
    (B, Hkv, g, R, P, S). Part (b) enters as one extra *summary key* per query: score lse_b (carried in an extra
    channel of q against a key that is 1 there and 0 elsewhere) and value out_b (the extra channel of the values
    returns that key's softmax weight w_b, so out_b itself never has to be a shared value). Then
    ``out = sdpa[:D] + w_b · out_b`` is exactly ``e^(lse_a - lse) out_a + e^(lse_b - lse) out_b``. The fused
    kernel never materialises the score matrix and backpropagates into lse_b through q's extra channel.
    Slots go in chunks whose keys stop at the chunk's longest context (later keys are never visible)."""
    b, hkv, g, r, p, s, d = q.shape
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # lse_b needs the precision
    outs = []
    for p0 in range(0, p, slots_per_call):
        p1 = min(p, p0 + slots_per_call)
        lens = slot_len[:, p0:p1]  # (B, c)
        top = int(lens.max())
        c = p1 - p0
        qc = torch.cat([q[:, :, :, :, p0:p1], (lse_b[:, :, :, :, p0:p1, :, None] / scaling).to(q.dtype)], dim=-1)
        qc = qc.reshape(b, hkv * g, r * c * s, d + 1).to(dtype)
        summary = torch.zeros(b, hkv, 1, d + 1, dtype=keys.dtype, device=keys.device)
        summary[..., d] = 1.0
        kc = torch.cat([torch.nn.functional.pad(keys[:, :, :top], (0, 1)), summary], dim=2)  # (B, Hkv, top+1, D+1)
        vc = torch.cat([torch.nn.functional.pad(values[:, :, :top], (0, 1)), summary], dim=2)
        visible = torch.arange(top + 1, device=q.device) < lens[..., None]  # (B, c, top + 1)
        visible[..., top] = True  # the summary key of part (b)
        mask = visible[:, None, :, None, :].expand(b, r, c, s, top + 1).reshape(b, 1, r * c * s, top + 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            qc, kc.to(dtype), vc.to(dtype), attn_mask=mask, scale=scaling, enable_gqa=g > 1
        )
        out = out.view(b, hkv, g, r, c, s, d + 1)
        outs.append((out[..., :d] + out[..., d:] * out_b[:, :, :, :, p0:p1].to(dtype)).to(q.dtype))
    return torch.cat(outs, dim=4)


def _diagonal_part(q, keys, values, scaling: float):
    """Part (b). q (B, Hkv, g, R, P, S, D); keys/values (B, Hkv, 1, R, P, T, D) with T = S_prev + S, the last S
    being this forward's own tokens. Query s sees keys ``<= S_prev + s``. Returns (out, lse) like part (a)."""
    s, t = q.shape[5], keys.shape[5]
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # (B, Hkv, g, R, P, S, T)
    future = torch.arange(t, device=q.device)[None, :] > (t - s + torch.arange(s, device=q.device))[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(values.dtype), values)
    return out, lse


def merge_parts(out_a, lse_a, out_b, lse_b):
    """Exact softmax over the union of two key sets from each part's (output, log-normaliser)."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse)[..., None].to(out_a.dtype)
    w_b = torch.exp(lse_b - lse)[..., None].to(out_b.dtype)
    return w_a * out_a + w_b * out_b


def parallel_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface entry: query (B, H, N, D), key/value (B, Hkv, N, D) with N = R·P·S.

    Returns (output (B, N, H, D), None) as every attention function does."""
    ctx: PassContext | None = kwargs.get("thinkrl_passes")
    if ctx is None:
        raise RuntimeError("parallel attention called without a PassContext (thinkrl_passes=...)")
    layer = module.layer_idx
    b, h, n, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    r, p, s = ctx.rows, ctx.slots, ctx.tokens
    scaling = d**-0.5 if scaling is None else scaling
    q = query.view(b, hkv, g, r, p, s, d)  # heads of one kv group stay together (GQA without copies)
    k = key.view(b, hkv, 1, r, p, s, d)
    v = value.view(b, hkv, 1, r, p, s, d)
    if layer in ctx.history:
        hk, hv = ctx.history[layer]
        k, v = torch.cat([hk[:, :, None], k], dim=5), torch.cat([hv[:, :, None], v], dim=5)
    if ctx.keep_history:
        ctx.history[layer] = (k[:, :, 0], v[:, :, 0])
    wk, wv = ctx.window_kv[layer]
    out_b, lse_b = _diagonal_part(q, k, v, scaling)
    per_slot = b * h * r * s * (wk.shape[2] + 1)
    slots_per_call = max(1, min(SLOTS_PER_CALL, CHUNK_ELEMENTS // per_slot))
    out = _window_and_merge(q, wk, wv, ctx.slot_len, scaling, out_b, lse_b, slots_per_call)  # (B,Hkv,g,R,P,S,D)
    return out.reshape(b, h, n, d).transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, parallel_attention_forward)
