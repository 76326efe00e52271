"""Target-copy gauge: how often a thought contains the tokens it is rewarded for predicting (pure maths, no I/O).

A log-likelihood-gain reward (Quiet-STaR's, and thinkrl's) "tends to be hacked by repeating the target token in the
generated rationale" (RPT, arXiv:2506.08007, §5): a thought that writes y_1 makes y_1 likely to the interpreter,
whether or not it reasoned. This module measures that; ``reward.copy_penalty`` (``core_algos.shape_rewards``) can
penalise it.

Definitions, per thought z = z_1..z_m (the tokens between the markers: the end marker, a thought's padding and the
start marker are never counted) of a position whose targets are y_1..y_n (``target_mask`` a prefix of each row,
targets right-padded; a position with no target copies nothing):

  copies_first    y_1 is one of z_1..z_m
  copies_target   y_1..y_n occur in z as one contiguous run (implies copies_first)

Aggregates over a batch of thoughts (the trainer and the held-out evaluation):

  copy_rate            share of thoughts with copies_first
  copy_rate_target     share of thoughts with copies_target
  reward_copy_share    Σ max(r, 0) over thoughts with copies_first / Σ max(r, 0) over all thoughts (0 when no thought
                       has a positive reward): how much of the positive reward copying thoughts earn

The chance level of both rates is what untrained thoughts at the same positions give (step 0's held-out evaluation,
or ``thinkrl eval`` of the starting model): a reasoner that writes frequent tokens contains a frequent y_1 by chance.
"""

from __future__ import annotations

import torch


def thought_token_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(N, K) lengths → (N, K, width) bool: True on z_1..z_m, False on the end marker and padding after it."""
    return torch.arange(width, device=lengths.device) < lengths[..., None]


def copy_flags(
    thought_ids: torch.Tensor, lengths: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(copies_first, copies_target), both (N, K) bool.

    thought_ids (N, K, M) as in ``ThoughtBatch`` (actions z_1.., the end token if sampled, padding after),
    lengths (N, K) thought tokens z (end token excluded), target_ids / target_mask (N, n) with the mask a prefix."""
    device = target_ids.device
    thought_ids, lengths = thought_ids.to(device), lengths.to(device)
    n_pos, k, m = thought_ids.shape
    n = target_ids.shape[-1]
    none = torch.zeros((n_pos, k), dtype=torch.bool, device=device)
    if k == 0 or m == 0 or n == 0:
        return none, none.clone()
    target_mask = target_mask.to(device).bool()
    valid = thought_token_mask(lengths, m)  # (N, K, M)
    has_target = target_mask[:, :1]  # (N, 1)
    first = ((thought_ids == target_ids[:, None, :1]) & valid).any(-1) & has_target
    # Every start s: window s..s+n-1 of the thought (past its end: invalid), compared with y_1..y_n where targeted.
    ids = torch.nn.functional.pad(thought_ids, (0, n - 1), value=-1).unfold(-1, n, 1)  # (N, K, M, n)
    ok = torch.nn.functional.pad(valid, (0, n - 1), value=False).unfold(-1, n, 1)
    hit = (ids == target_ids[:, None, None, :]) & ok
    whole = (hit | ~target_mask[:, None, None, :]).all(-1).any(-1) & has_target  # (N, K)
    return first, whole


def positive_reward_sums(rewards: torch.Tensor, copies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ max(r, 0) of the copying thoughts, Σ max(r, 0) of all thoughts) as float tensors, (N, K) each: the two sums
    of ``reward_copy_share``, to be added over micro-batches, processes or evaluation batches before dividing."""
    positive = rewards.detach().float().clamp_min(0.0)
    return (positive * copies.to(positive.device)).sum(), positive.sum()


def reward_copy_share(copying: float, total: float) -> float:
    """The share of positive reward earned by copying thoughts from ``positive_reward_sums``; 0 without any."""
    return float(copying) / float(total) if float(total) > 0 else 0.0


def list_copy_flags(thoughts: list[list[int]], target: list[int]) -> list[tuple[bool, bool]]:
    """``copy_flags`` for plain token lists (one position): per thought (its tokens z_1..z_m, no markers),
    (copies_first, copies_target)."""
    if not thoughts:
        return []
    width = max(1, max(len(z) for z in thoughts))
    ids = torch.full((1, len(thoughts), width), -1, dtype=torch.long)
    for j, z in enumerate(thoughts):
        ids[0, j, : len(z)] = torch.tensor(z, dtype=torch.long)
    lengths = torch.tensor([[len(z) for z in thoughts]])
    targets = torch.tensor([target or [-1]], dtype=torch.long)
    mask = torch.tensor([[bool(target)] * max(1, len(target))])
    first, whole = copy_flags(ids, lengths, targets, mask)
    return [(bool(f), bool(w)) for f, w in zip(first[0], whole[0])]
