"""Parallel-pass attention as one block-sparse ``flex_attention`` call (``rollout.attention_kernel=flex``).

The same attention as ``parallel_attention`` (see there for the layout): queries laid out (r, p, s), each attending
to the window keys ``< slot_len[b, p]`` and to its own (r, p) thought's tokens ``<= S_prev + s``. Here the keys are
laid out in one sequence per window — the L window keys, then the T = S_prev + S thought keys of every (r', p') in
turn — and a ``mask_mod`` says which a query sees:

    window key j          visible iff j < slot_len[b, p]
    thought key (r', p', t')  visible iff (r', p') == (r, p) and t' <= S_prev + s

One softmax over the visible keys is exactly the merge path's result (no log-sum-exp merge to get right).

On CUDA the call is ``torch.compile``'d ``flex_attention``: a fused kernel that keeps no score matrix and skips the
key blocks the ``BlockMask`` marks empty. The block mask is worked out from the layout (``block_layout``: per block
of 128 queries the smallest and largest slot context it holds, per block of 128 keys the thoughts it holds), so
nothing of size queries × keys is built (tests check it against torch's ``create_block_mask``, which evaluates the
``mask_mod`` everywhere); it is the same for every layer and is built once per forward. What the ``mask_mod``
reads are tensors sized by the query count, so a new forward's ``mask_mod`` does not recompile the kernel: it
compiles at the first call, and again at the first change of the key count and of the query count (dynamo then makes
those lengths dynamic) — three compilations per grad mode, after which thoughts growing a token per sampling pass
and windows of other lengths run the same kernel. (Checked with the CPU build of the compiled kernel through
``run_passes``, forward only — torch has no CPU backward for it — against the merge path; the CUDA kernel is
checked by the gpu-marked test.)

Elsewhere (CPU) this is a reference path for tests and a fallback: ``scaled_dot_product_attention`` with the dense
mask the ``mask_mod`` gives. That is what torch's eager ``flex_attention`` computes too (it materialises the scores
and applies the ``mask_mod`` densely), but eager flex has no backward on CPU, and re-traces the ``mask_mod`` for each
new shape. Both hold a (B, H, R·P·S, L + R·P·T) score matrix: the hand merge (``kernel=merge``) stays the faster and
leaner path on CPU (a tiny Llama's teacher-forced pass with backward, one thread: about 2× the merge's time at
L = 64, 5-7× at L = 256, and some 300 MB more peak memory there).
"""

from __future__ import annotations

import logging
import math

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from thinkrl.models.parallel_attention import with_history

logger = logging.getLogger(__name__)

BLOCK = 128  # flex_attention's sparse block size (queries and keys)
_CACHE_ATTR = "flex_masks"  # a dict of this forward's masks, set on its PassContext at the first layer
_compiled = None
_warned = False


def passes_mask_mod(slot_len: torch.Tensor, length: int, slots: int, tokens: int, span: int, rows: int):
    """The ``mask_mod`` (b, h, q_idx, kv_idx) → visible of one forward's layout: L = ``length`` window keys, then
    the thought keys of R·P thoughts of T = ``span`` tokens each; queries (r, p, s) of S = ``tokens`` tokens.

    What it reads are tensors, not Python ints (the sizes 0-d), and the window context per query (B, R·P·S) rather
    than per slot: the compiled kernel then sees a new forward's sizes as inputs of the query's length rather than
    as constants to recompile for."""
    device = slot_len.device
    length_t, tokens_t, span_t = (torch.tensor(x, device=device) for x in (length, tokens, span))
    prev_t = torch.tensor(span - tokens, device=device)
    query_slot = (torch.arange(rows * slots * tokens, device=device) // tokens) % slots
    context = slot_len[:, query_slot].clamp(0, length)  # (B, Q) window keys each query sees

    def mask_mod(b, h, q_idx, kv_idx):
        window = kv_idx < context[b, q_idx]
        u = kv_idx - length_t
        own = (u >= 0) & (u // span_t == q_idx // tokens_t) & (u % span_t <= prev_t + q_idx % tokens_t)
        return window | own

    return mask_mod


def dense_mask(mask_mod, batch: int, n_q: int, n_kv: int, device) -> torch.Tensor:
    """The (B, 1, Q, KV) boolean mask of ``mask_mod`` (its ops broadcast: evaluated on index grids, no vmap)."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(n_q, device=device)[None, None, :, None]
    kv = torch.arange(n_kv, device=device)[None, None, None, :]
    return mask_mod(b, torch.zeros_like(b), q, kv)


def block_layout(
    slot_len: torch.Tensor, length: int, slots: int, tokens: int, span: int, n_q: int, n_kv: int, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) block flags (B, Q blocks, KV blocks) of the layout ``passes_mask_mod`` describes, from the
    layout alone. A full block holds only visible keys (the kernel skips the ``mask_mod`` there); a partial one may
    hold some (the ``mask_mod`` decides); any other block is skipped. Conservative where exactness would cost: a
    thought-key block is partial whenever its thoughts meet the query block's (the causal order within a thought is
    left to the ``mask_mod``)."""
    device = slot_len.device
    nq, nk = math.ceil(n_q / block), math.ceil(n_kv / block)
    q = torch.arange(nq * block, device=device).clamp_max(n_q - 1).view(nq, block)
    visible = slot_len[:, (q // tokens) % slots].clamp(0, length)  # (B, nq, block) window keys each query sees
    lo, hi = visible.amin(-1)[..., None], visible.amax(-1)[..., None]
    k0 = torch.arange(nk, device=device) * block
    k1 = (k0 + block).clamp_max(n_kv)
    window_any = (k0 < length) & (k0 < hi)
    # full: every key below every query's context; like torch's own block masks, only blocks of Q and KV in range
    full = (k1 <= length) & (k1 <= lo) & ((torch.arange(1, nq + 1, device=device) * block <= n_q)[:, None])
    # thoughts (r * P + p) of the query block and of the key block's thought keys
    q_first, q_last = q[:, :1] // tokens, q[:, -1:] // tokens
    k_first, k_last = (k0.clamp_min(length) - length) // span, (k1 - 1 - length) // span
    thought_any = (k1 > length) & (k_first <= q_last) & (q_first <= k_last)
    return (window_any | thought_any) & ~full, full


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nq, nk) flags → BlockMask's (count (B, 1, nq), indices (B, 1, nq, nk)), flagged blocks first."""
    flags = flags[:, None].to(torch.int32)
    indices = torch.argsort(flags, dim=-1, descending=True, stable=True)
    return flags.sum(-1, dtype=torch.int32), indices.to(torch.int32)


def passes_block_mask(slot_len, length, slots, tokens, span, rows, block: int = BLOCK) -> BlockMask:
    """The ``BlockMask`` of one forward: Q = R·P·S queries, KV = L + R·P·T keys."""
    n_q, n_kv = rows * slots * tokens, length + rows * slots * span
    mask_mod = passes_mask_mod(slot_len, length, slots, tokens, span, rows)
    partial, full = block_layout(slot_len, length, slots, tokens, span, n_q, n_kv, block)
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n_q, n_kv)
    )


def attend_flex(query, keys, values, block_mask: BlockMask, scaling: float) -> torch.Tensor:
    """``flex_attention`` (B, H, Q, D) over ``keys``/``values`` (B, Hkv, KV, D): compiled on CUDA (lazily, one
    compiled function per process: see the module docstring), eager elsewhere (tests only: no backward on CPU, the
    scores materialised)."""
    global _compiled
    fn = flex_attention
    if query.device.type == "cuda":
        if _compiled is None:
            _compiled = torch.compile(flex_attention)  # see the module docstring
        fn = _compiled
    return fn(query, keys, values, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1])


def _masks(ctx, slot_len, length: int, span: int, device) -> BlockMask | torch.Tensor:
    """This forward's mask for thoughts of ``span`` keys — the ``BlockMask`` on CUDA, else the dense (B, 1, Q, KV)
    mask — built at the first layer and kept on the context for the others."""
    cache = getattr(ctx, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(ctx, _CACHE_ATTR, cache)
    key = (span, length, str(device))
    if key not in cache:
        r, p, s = ctx.rows, ctx.slots, ctx.tokens
        if device.type == "cuda":
            cache[key] = passes_block_mask(slot_len, length, p, s, span, r)
        else:
            mask_mod = passes_mask_mod(slot_len, length, p, s, span, r)
            cache[key] = dense_mask(mask_mod, slot_len.shape[0], r * p * s, length + r * p * span, device)
    return cache[key]


def flex_passes_forward(module, query, key, value, ctx, scaling=None):
    """``parallel_attention_forward`` with ``ctx.kernel == "flex"``: query (B, H, N, D), key/value (B, Hkv, N, D)
    with N = R·P·S. Reads and keeps ``ctx.history`` as the merge path does (``with_history``).

    Returns (output (B, N, H, D), None)."""
    global _warned
    layer = module.layer_idx
    b, h, n, d = query.shape
    hkv = key.shape[1]
    r, p, s = ctx.rows, ctx.slots, ctx.tokens
    scaling = d**-0.5 if scaling is None else scaling
    k, v = with_history(ctx, layer, key.view(b, hkv, r, p, s, d), value.view(b, hkv, r, p, s, d))
    span = k.shape[4]
    wk, wv = ctx.window_kv[layer]
    length = wk.shape[2]
    keys = torch.cat([wk.to(k.dtype), k.reshape(b, hkv, r * p * span, d)], dim=2)
    values = torch.cat([wv.to(v.dtype), v.reshape(b, hkv, r * p * span, d)], dim=2)
    slot_len = ctx.slot_len.to(query.device)
    mask = _masks(ctx, slot_len, length, span, query.device)
    if query.device.type == "cuda":
        out = attend_flex(query, keys, values, mask, scaling)
    else:
        if not _warned:
            _warned = True
            logger.warning(
                "rollout.attention_kernel=flex on %s: an unfused reference path holding the whole score matrix "
                "(slow, for tests); the fused kernel needs CUDA, and kernel merge is faster here",
                query.device.type,
            )
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=h != hkv
        )
    return out.transpose(1, 2), None
