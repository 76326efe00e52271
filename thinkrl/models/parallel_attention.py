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

How: slots go in chunks of neighbours (``chunk_plan``). The window keys every slot of a chunk sees (``< lo``) are
shared by all its queries and need no mask: one fused ``scaled_dot_product_attention`` call. The few window keys
the chunk's slots disagree on (``[lo, hi)``, at most ``SPAN``) and the diagonal are computed by hand; they enter the
fused call as one *summary key* per query carrying their log-normaliser, which makes the merge exact. The diagonal
is computed once for all slots (``_Diagonal``, which keeps the earlier passes' thought keys as the history holds
them rather than a concatenation per pass), and the chunks' slices share one gradient buffer (``slices``).

Cost per pass: the window attention of one plain forward per row, plus R·P·S·(SPAN + S_prev + S) dot products.
Nothing of size P × (P·S) exists (the dense mask of the official Quiet-STaR code), nor any window × window × passes
tensor: the fused kernel keeps no score matrix and the hand-made part is linear in the window.

The function is registered in transformers' ``AttentionInterface`` and switched on per forward
(``parallel_attention``); models keep their own modeling code (Llama, Qwen2/3, Mistral, GPT-2, SmolLM2, ...).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from thinkrl.errors import ConfigError

ATTN_NAME = "thinkrl_parallel"
# Model types whose attention modules hand rotated keys/values (B, H, T, D) to the attention interface and accept
# position_ids: checked, and exercised by tests for llama, qwen2, mistral and gpt2.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "olmo", "olmo2", "phi3", "granite")
# Slots per fused attention call, and the most window keys a chunk's slots may differ by (handled by hand).
SLOTS_PER_CALL = 64
SPAN = 64


@dataclass
class PassContext:
    """What one parallel forward needs besides its own tokens.

    window_kv: per layer (keys, values) of the window pass, each (B, Hkv, L, D).
    slot_len: (B, P) window tokens visible to each slot (its context length t).
    rows, slots, tokens: R, P, S of this forward's queries, laid out (r, p, s).
    history: per layer (keys, values), lists with one (B, Hkv, R, P, S_i, D) entry per earlier pass of the same
    thoughts (sampling runs one token per pass); ``keep_history`` appends this pass's keys/values to it.
    entries: how many of them this forward reads (``with_history``)."""

    window_kv: list[tuple[torch.Tensor, torch.Tensor]]
    slot_len: torch.Tensor
    rows: int
    slots: int
    tokens: int
    history: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)
    keep_history: bool = False
    entries: int = 0
    plan: list[tuple[int, int, int, int]] | None = None  # slot chunks, see ``chunk_plan``
    kernel: str = "merge"  # "merge": the hand merge below; "flex": torch flex_attention (``flex_passes``)


def with_history(ctx: PassContext, layer: int, k: torch.Tensor, v: torch.Tensor, concat: bool = True):
    """This forward's keys/values (B, Hkv, R, P, S, D) after the first ``ctx.entries`` history entries of the layer
    (dim 4; ``concat=False``: as lists of entries, this forward's last), and with ``keep_history`` this forward's own
    appended as the next entry.

    Reading a fixed number of entries, and appending only where the list holds exactly that many, makes a layer's
    forward repeatable: a checkpointed layer's recompute in the backward (``models/checkpointing``) runs after the
    later passes have appended theirs, and sees the keys its forward saw."""
    entries = ctx.history.setdefault(layer, ([], [])) if ctx.keep_history else ctx.history.get(layer, ([], []))
    if ctx.keep_history and len(entries[0]) == ctx.entries:
        entries[0].append(k)
        entries[1].append(v)
    ks, vs = [*entries[0][: ctx.entries], k], [*entries[1][: ctx.entries], v]
    if not concat:
        return ks, vs
    return (torch.cat(ks, dim=4), torch.cat(vs, dim=4)) if len(ks) > 1 else (k, v)


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


def chunk_plan(slot_len: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Slots in consecutive chunks ``(p0, p1, lo, hi)``: every slot of the chunk sees the window keys ``< lo``
    (shared, no mask) and a few more of ``[lo, hi)`` (masked, at most ``SPAN`` keys unless one slot alone spans
    more). Slot contexts ascend within a window, so chunks of neighbouring slots keep ``hi - lo`` small."""
    lens = slot_len.tolist()
    lo_at = [min(col) for col in zip(*lens)]
    hi_at = [max(col) for col in zip(*lens)]
    plan, p0 = [], 0
    while p0 < len(lo_at):
        p1, lo, hi = p0 + 1, lo_at[p0], hi_at[p0]
        while p1 < len(lo_at) and p1 - p0 < SLOTS_PER_CALL:
            lo_next, hi_next = min(lo, lo_at[p1]), max(hi, hi_at[p1])
            if hi_next - lo_next > SPAN:
                break
            lo, hi, p1 = lo_next, hi_next, p1 + 1
        plan.append((p0, p1, lo, hi))
        p0 = p1
    return plan


class _Diagonal(torch.autograd.Function):
    """Attention of each (row, slot)'s queries over its own thought tokens, elementwise per (row, slot): q (B, Hkv,
    g, R, P, S, D) against the keys/values of the pass entries (each (B, Hkv, R, P, S_i, D), this forward's last, T =
    sum S_i); query s sees ``<= T - S + s``. Returns (out like q, lse (B, Hkv, g, R, P, S)).

    Why by hand: the entries are concatenated for the product and the concatenation is not kept. Autograd would
    keep each pass's concatenation of all earlier entries for its backward, O(m²) copies of the thought keys per
    layer over a thought of m tokens when sampling runs inside the learning passes; here the backward concatenates
    them again from the entries the history holds anyway."""

    @staticmethod
    def forward(ctx, q, scaling, n, *kv):
        keys, values = torch.cat(kv[:n], dim=4)[:, :, None], torch.cat(kv[n:], dim=4)[:, :, None]
        s, t = q.shape[-2], keys.shape[-2]
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # (B, Hkv, g, R, P, S, T)
        future = torch.arange(t, device=q.device)[None, :] > (t - s + torch.arange(s, device=q.device))[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None])
        out = torch.matmul(probs.to(q.dtype), values)
        ctx.scaling, ctx.n = scaling, n
        ctx.sizes = [x.shape[4] for x in kv[:n]]
        ctx.save_for_backward(q, probs, *kv)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, probs, *kv = ctx.saved_tensors
        n = ctx.n
        keys, values = torch.cat(kv[:n], dim=4)[:, :, None], torch.cat(kv[n:], dim=4)[:, :, None]
        p = probs.to(q.dtype)
        grad_scores = torch.zeros_like(probs)
        grad_v = None
        if grad_out is not None:
            grad_v = torch.matmul(p.transpose(-1, -2), grad_out).sum(2)  # (B, Hkv, R, P, T, D), summed over g
            grad_p = torch.matmul(grad_out, values.transpose(-1, -2)).float()
            grad_scores = probs * (grad_p - (probs * grad_p).sum(-1, keepdim=True))
        if grad_lse is not None:  # d lse / d scores = probs
            grad_scores = grad_scores + probs * grad_lse[..., None].float()
        grad_scores = (grad_scores * ctx.scaling).to(q.dtype)
        grad_q = torch.matmul(grad_scores, keys)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q).sum(2)
        if grad_v is None:
            grad_v = torch.zeros_like(grad_k)
        return grad_q, None, None, *grad_k.split(ctx.sizes, dim=4), *grad_v.split(ctx.sizes, dim=4)


def diagonal(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scaling: float):
    """``_Diagonal``: (out, lse) of q over its own thought tokens, the keys/values given per pass entry."""
    return _Diagonal.apply(q, scaling, len(keys), *keys, *values)


def _local_part(out_d, lse_d, q, near_k, near_v, near_hidden, scaling: float):
    """Exact attention over the keys that differ between the slots of a chunk: the window keys ``[lo, hi)``
    (``near_*`` (B, Hkv, span, D), ``near_hidden`` (B, c, span) True where a slot's context ends before the key)
    and each slot's own thought tokens, whose part ``diagonal`` gave (``out_d`` like q, ``lse_d``). q (B, Hkv, g, R,
    c, S, D).

    Returns (out like q, lse (B, Hkv, g, R, c, S)). The diagonal enters the softmax as one more score, its
    log-normaliser (the summary-key rule of ``_chunk_attention``); it always holds the query's own token, so no row
    is empty even where every near key is hidden."""
    b, hkv, g, r, c, s, d = q.shape
    span = near_k.shape[2]
    if not span:
        return out_d, lse_d
    near = torch.matmul(q.reshape(b, hkv, -1, d), near_k.transpose(-1, -2)).float() * scaling
    near = near.view(b, hkv, g, r, c, s, span).masked_fill(near_hidden[:, None, None, None, :, None, :], -math.inf)
    scores = torch.cat([near, lse_d[..., None].float()], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(q.dtype)
    out = probs[..., span:] * out_d
    out = out + torch.matmul(probs[..., :span].reshape(b, hkv, -1, span), near_v).view_as(out)
    return out, lse


def _extended(keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The window's keys and values (B, Hkv, L, D) with one more channel and the *summary key* in front:
    (B, Hkv, 1 + L, D + 1) each, built once per layer. The summary key is 1 in the extra channel and 0 elsewhere;
    window key j sits at 1 + j, so a chunk's shared keys ``< lo`` plus the summary key are the prefix ``[:1 + lo]`` —
    a view, not a copy per chunk (which would make the window's keys a window²-sized tensor per pass)."""
    b, hkv, _, d = keys.shape
    summary = torch.zeros(b, hkv, 1, d + 1, dtype=dtype, device=keys.device)
    summary[..., d] = 1.0
    k_ext = torch.cat([summary, torch.nn.functional.pad(keys.to(dtype), (0, 1))], dim=2)
    v_ext = torch.cat([summary, torch.nn.functional.pad(values.to(dtype), (0, 1))], dim=2)
    return k_ext, v_ext


class _Slices(torch.autograd.Function):
    """Several slices ``[a, b)`` of one tensor along ``dim``, as views. Autograd's own slicing gives every slice's
    gradient a zero-filled copy of the whole tensor, summed afterwards: one window-sized fill, copy and add per slot
    chunk, pass and layer (a tenth of a step when thoughts are sampled inside the passes, profiled). Here the
    slices' gradients land in one buffer."""

    @staticmethod
    def forward(ctx, x, dim, ranges):
        ctx.dim, ctx.ranges, ctx.shape = dim, ranges, x.shape
        return tuple(x.narrow(dim, a, b - a) for a, b in ranges)

    @staticmethod
    def backward(ctx, *grads):
        grad = None
        for g, (a, b) in zip(grads, ctx.ranges):
            if g is None:
                continue
            if grad is None:
                grad = g.new_zeros(ctx.shape)
            grad.narrow(ctx.dim, a, b - a).add_(g)
        return grad, None, None


def slices(x: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """``x.narrow(dim, a, b - a)`` for each range, with one gradient buffer for all of them (``_Slices``)."""
    if not x.requires_grad or not torch.is_grad_enabled():
        return tuple(x.narrow(dim, a, b - a) for a, b in ranges)
    return _Slices.apply(x, dim, ranges)


def _chunk_attention(q, out_d, lse_d, near_k, near_v, k_pre, v_pre, slot_len, scaling: float, p0, p1, lo, hi):
    """One chunk of slots ``[p0, p1)`` (q and the diagonal's out_d/lse_d already cut to it, ``near_*`` the window
    keys [lo, hi), ``k_pre``/``v_pre`` the extended window prefix ``[:1 + lo]``): the local part (window keys
    [lo, hi) merged with the diagonal) by hand, then the window keys ``< lo`` — shared by every query of the chunk,
    no mask — in one fused
    ``scaled_dot_product_attention`` call.

    The local part enters that call as one extra *summary key* per query (``_extended``): its score is the local
    log-normaliser (carried in an extra channel of q against a key that is 1 there and 0 elsewhere) and the extra
    value channel returns that key's softmax weight w, so ``out = sdpa[:D] + w · out_local`` is exactly the softmax
    over both key sets (the log-sum-exp merge; the keys' order does not matter without a mask). The fused kernel
    never materialises the score matrix, and backpropagates into the local log-normaliser through q's extra
    channel."""
    b, hkv, g, r, c, s, d = q.shape
    near_hidden = torch.arange(lo, hi, device=q.device) >= slot_len[:, p0:p1, None]  # (B, c, span)
    out_l, lse_l = _local_part(out_d, lse_d, q, near_k, near_v, near_hidden, scaling)
    dtype = k_pre.dtype
    q_ext = torch.cat([q, (lse_l[..., None] / scaling).to(q.dtype)], dim=-1).reshape(b, hkv * g, r * c * s, d + 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_ext.to(dtype), k_pre, v_pre, scale=scaling, enable_gqa=g > 1
    ).view(b, hkv, g, r, c, s, d + 1)
    return (out[..., :d] + out[..., d:] * out_l.to(dtype)).to(q.dtype)


def parallel_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface entry: query (B, H, N, D), key/value (B, Hkv, N, D) with N = R·P·S.

    Returns (output (B, N, H, D), None) as every attention function does."""
    ctx: PassContext | None = kwargs.get("thinkrl_passes")
    if ctx is None:
        raise RuntimeError("parallel attention called without a PassContext (thinkrl_passes=...)")
    if ctx.kernel == "flex":
        from thinkrl.models.flex_passes import flex_passes_forward

        return flex_passes_forward(module, query, key, value, ctx, scaling)
    layer = module.layer_idx
    b, h, n, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    r, p, s = ctx.rows, ctx.slots, ctx.tokens
    scaling = d**-0.5 if scaling is None else scaling
    q = query.view(b, hkv, g, r, p, s, d)  # heads of one kv group stay together (GQA without copies)
    keys, values = with_history(ctx, layer, key.view(b, hkv, r, p, s, d), value.view(b, hkv, r, p, s, d), False)
    out_d, lse_d = diagonal(q, keys, values, scaling)  # every slot's own thought tokens, elementwise per (r, p)
    wk, wv = ctx.window_kv[layer]
    if ctx.plan is None:  # the same for every layer of this forward
        ctx.plan = chunk_plan(ctx.slot_len)
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # lse_l needs the precision
    k_ext, v_ext = _extended(wk, wv, dtype)
    plan = ctx.plan
    by_slot = [(p0, p1) for p0, p1, _, _ in plan]
    near = [(lo, hi) for _, _, lo, hi in plan]
    prefix = [(0, 1 + lo) for _, _, lo, _ in plan]
    parts = zip(
        slices(q, 4, by_slot),
        slices(out_d, 4, by_slot),
        slices(lse_d, 4, by_slot),
        slices(wk, 2, near),
        slices(wv, 2, near),
        slices(k_ext, 2, prefix),
        slices(v_ext, 2, prefix),
        plan,
    )
    out = torch.cat(
        [_chunk_attention(*part, ctx.slot_len, scaling, *chunk) for *part, chunk in parts], dim=4
    )  # (B, Hkv, g, R, P, S, D)
    return out.reshape(b, h, n, d).transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, parallel_attention_forward)
