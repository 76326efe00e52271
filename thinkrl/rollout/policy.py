"""The reasoner's policy distribution, shared by the sampler and the learner so both score the same thing.

pi(z_t | x, z_<t) = softmax(logits / temperature), without the start marker (and the end marker in fixed mode).
(Quiet-STaR sampled at one temperature and scored at another; here one function defines the policy.)
Top-p only truncates what is *sampled*; log-probs are of the untruncated tempered distribution, so the
learner's and the sampler's values agree and the importance ratio is 1 on-policy.
"""

from __future__ import annotations

import torch

from thinkrl.errors import NonFiniteLossError
from thinkrl.models.chunked_logps import CHUNK_ELEMENTS, map_row_chunks, vocab_size
from thinkrl.models.shared_prefix import forward_shared_prefix
from thinkrl.rollout.base import ThoughtBatch


def policy_logits(
    logits: torch.Tensor, temperature: float, sot_id: int, eot_id: int, fixed_length: bool
) -> torch.Tensor:
    """Tempered logits with the impossible actions removed: a thought never opens another thought, and in
    fixed-length mode it never stops early."""
    logits = logits.float() / temperature  # a new tensor: safe to edit in place
    # The most negative finite float, not -inf: probability exactly 0, yet entropy's p·log p stays 0, not NaN.
    banned = torch.finfo(logits.dtype).min
    logits[..., sot_id] = banned
    if fixed_length:
        logits[..., eot_id] = banned
    return logits


def sample_tokens(logits: torch.Tensor, top_p: float, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from policy logits (B, V) with the caller's uniform noise (B, V) (Gumbel-max).

    Taking the noise as an argument makes a thought a function of its position's seed alone, whatever else is in
    the batch or on other processes. Returns (tokens (B,), their log-probs (B,) under the untruncated policy)."""
    logps = torch.log_softmax(logits, dim=-1)
    if torch.isnan(logps).any() or not torch.isfinite(logps.max(dim=-1).values).all():
        raise NonFiniteLossError("the reasoner's next-token distribution is NaN/inf")
    scores = logps
    if top_p < 1.0:
        sorted_p, order = logps.exp().sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is full
        scores = logps.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    tokens = (scores + gumbel).argmax(dim=-1)
    return tokens, logps.gather(-1, tokens[:, None]).squeeze(-1)


def position_seeds(n: int, generator: torch.Generator | None = None) -> list[int]:
    """One sampling seed per position, drawn from ``generator`` (or torch's global RNG, saved in checkpoints)."""
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


def thought_logps(
    model,
    contexts: list[list[int]],
    thoughts: ThoughtBatch,
    sot_id: int,
    eot_id: int,
    pad_id: int,
    temperature: float,
    fixed_length: bool,
    lean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learner-side log-probs and entropies of the sampled actions, differentiable.

    Each context is computed once and shared by its K thoughts. Returns (logps, entropy), both (N, K, M)
    and zero where ``thought_mask`` is False. ``lean`` (default): from the last hidden states through the LM head in
    checkpointed chunks (``hidden_action_terms``); ``lean=False``: from the model's full logits (the reference)."""
    n, k, m = thoughts.thought_ids.shape
    actions = thoughts.thought_ids.to(model.device)
    action_mask = thoughts.thought_mask.to(model.device)
    # Suffix = [last context token, sot, actions...]: the state at index 1 + j predicts action j.
    suffixes = [
        [contexts[i][-1], sot_id, *actions[i, j, : int(action_mask[i, j].sum())].tolist()]
        for i in range(n)
        for j in range(k)
    ]
    logits, hidden, _ = forward_shared_prefix(
        model, [c[:-1] for c in contexts], suffixes, pad_id, need_logits=not lean
    )
    states = hidden if lean else logits
    states = states[:, 1 : 1 + m]
    if states.shape[1] < m:  # every thought shorter than the slot width
        states = torch.nn.functional.pad(states, (0, 0, 0, m - states.shape[1]))
    states = states.reshape(n, k, m, -1)
    if lean:
        lm_head = model.get_output_embeddings()
        return hidden_action_terms(lm_head, states, actions, action_mask, temperature, sot_id, eot_id, fixed_length)
    return action_terms(states, actions, action_mask, temperature, sot_id, eot_id, fixed_length)


def _log_softmax_terms(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy logits (r, V), actions (r,) → (log-probs of the actions, entropies), both (r,)."""
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, actions[:, None]).squeeze(-1)
    return logps, -(logp_all.exp() * logp_all).sum(-1)  # banned actions: exp(-huge) = 0, 0 · -huge = 0


def action_terms(
    logits: torch.Tensor,
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    temperature: float,
    sot_id: int,
    eot_id: int,
    fixed_length: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits (N, K, M, V) predicting ``actions`` (N, K, M) → (logps, entropy), (N, K, M), 0 off the mask."""
    n, k, m = actions.shape
    flat = policy_logits(logits.reshape(n * k * m, -1), temperature, sot_id, eot_id, fixed_length)
    flat_actions = actions.reshape(-1)
    logps, entropy = [], []
    # Row chunks bound the (rows, V) log-softmax held at once (SmolLM2's vocabulary is 49k).
    rows = max(1, CHUNK_ELEMENTS // flat.shape[-1])
    for start in range(0, flat.shape[0], rows):
        lp, ent = _log_softmax_terms(flat[start : start + rows], flat_actions[start : start + rows])
        logps.append(lp)
        entropy.append(ent)
    logps, entropy = torch.cat(logps).reshape(n, k, m), torch.cat(entropy).reshape(n, k, m)
    return logps.masked_fill(~action_mask, 0.0), entropy.masked_fill(~action_mask, 0.0)


def hidden_action_terms(
    lm_head,
    hidden: torch.Tensor,
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    temperature: float,
    sot_id: int,
    eot_id: int,
    fixed_length: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``action_terms`` from last hidden states (N, K, M, d) and the LM head (called as a module): only the rows on
    ``action_mask``, in checkpointed chunks of at most ``CHUNK_ELEMENTS`` logits (``chunked_logps``), so no
    (N, K, M, V) tensor exists in the forward or the backward. Same values and gradients as ``action_terms``."""

    def chunk(h, a):
        return _log_softmax_terms(policy_logits(lm_head(h), temperature, sot_id, eot_id, fixed_length), a)

    logps, entropy = map_row_chunks(chunk, hidden[action_mask], actions[action_mask], vocab=vocab_size(lm_head))
    out_logps = logps.new_zeros(actions.shape).masked_scatter(action_mask, logps)
    out_entropy = entropy.new_zeros(actions.shape).masked_scatter(action_mask, entropy)
    return out_logps, out_entropy
