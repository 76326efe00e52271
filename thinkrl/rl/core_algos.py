"""Pure tensor maths of thought RL: rewards, advantages, losses. No models, no I/O: tested in milliseconds.

Shapes: N positions, K sampled thoughts, n target tokens y, M thought-action slots.

Reward (DESIGN §2): r(z) = log q(y | x, z) - log q(y | x, ref), kept per token and summed (optionally
discounted). The reference (``reward.baseline``) is the null thought z0 (TRICE, the default), the base model with
no thought at all (Quiet-STaR), or an exponential moving average of the interpreter reading no thought (RLP).

Advantages are TRICE's leave-one-out control variate by default; the Quiet-STaR recipe is
``baseline=mean, positive_only=True``. The policy loss is REINFORCE on thought tokens with a PPO-style
clipped importance ratio, which reduces to ``-A * log pi`` when sampler and learner agree.
"""

from __future__ import annotations

import torch

ADVANTAGE_BASELINES = ("leave_one_out", "mean", "none")
REWARD_BASELINES = ("null", "no_thought", "ema")


def reference_logps(
    baseline: str, logp_null: torch.Tensor | None, logp_base: torch.Tensor, logp_ema: torch.Tensor | None = None
) -> torch.Tensor:
    """The target log-probs a thought's reward is measured against, (N, n) each:
    null → log q(y | x, z0); no_thought → log p_base(y | x); ema → log p_EMA(y | x)."""
    if baseline == "null":
        return logp_null
    if baseline == "no_thought":
        return logp_base
    if baseline == "ema":
        if logp_ema is None:
            raise ValueError("reward.baseline=ema needs the EMA model's log-probs")
        return logp_ema
    raise ValueError(f"unknown reward baseline {baseline!r}; expected one of {REWARD_BASELINES}")


def token_rewards(logp_thoughts: torch.Tensor, logp_ref: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-token improvement over the reference. (N, K, n), (N, n), (N, n) → (N, K, n), 0 off-target."""
    return (logp_thoughts - logp_ref[:, None, :]) * target_mask[:, None, :]


def ema_update_(ema: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """In place: ema ← decay · ema + (1 − decay) · current, tensor by tensor."""
    torch._foreach_lerp_(ema, current, 1.0 - decay)


def sequence_rewards(per_token: torch.Tensor, target_mask: torch.Tensor, discount: float = 1.0) -> torch.Tensor:
    """Sum over the target tokens with weight discount^j. (N, K, n) → (N, K)."""
    n = per_token.shape[-1]
    weights = discount ** torch.arange(n, dtype=per_token.dtype, device=per_token.device)
    return (per_token * weights * target_mask[:, None, :]).sum(-1)


def shape_rewards(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    finished: torch.Tensor,
    length_penalty: float = 0.0,
    unfinished_penalty: float = 0.0,
    clip: float = 0.0,
    copies: torch.Tensor | None = None,
    copy_penalty: float = 0.0,
) -> torch.Tensor:
    """Rewards the advantages see. All (N, K):

        clip(r, -clip, clip) - length_penalty · m - unfinished_penalty · 1[unfinished] - copy_penalty · 1[copies]

    The penalties come after the clip, so a clipped reward still pays them. ``copies``: the thoughts whose tokens
    contain the first target token y_1 (``copy_gauge.copy_flags``' copies_first); needed when copy_penalty > 0."""
    if clip > 0:
        rewards = rewards.clamp(-clip, clip)
    shaped = rewards - length_penalty * lengths.to(rewards.dtype) - unfinished_penalty * (~finished).to(rewards.dtype)
    if copy_penalty > 0:
        if copies is None:
            raise ValueError("copy_penalty > 0 needs the thoughts' copy flags")
        shaped = shaped - copy_penalty * copies.to(device=rewards.device, dtype=rewards.dtype)
    return shaped


def compute_advantages(
    rewards: torch.Tensor,
    baseline: str = "leave_one_out",
    include_null: bool = False,
    positive_only: bool = False,
    normalize: str = "none",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages of the K sampled thoughts of each position. (N, K) → (N, K).

    ``include_null`` adds the null thought (reward exactly 0) to each group: it lowers the baseline's
    variance and makes "better than no thought" the bar. Leave-one-out: A_i = r_i - mean_{j != i} r_j
    over the group; mean: A_i = r_i - mean_j r_j (self included)."""
    group = torch.cat([rewards, rewards.new_zeros(rewards.shape[0], 1)], dim=1) if include_null else rewards
    size = group.shape[1]
    total = group.sum(dim=1, keepdim=True)
    if baseline == "leave_one_out":
        if size < 2:
            raise ValueError("leave-one-out needs at least two members per group")
        adv = rewards - (total - rewards) / (size - 1)
    elif baseline == "mean":
        adv = rewards - total / size
    elif baseline == "none":
        adv = rewards.clone()
    else:
        raise ValueError(f"unknown baseline {baseline}; use one of {ADVANTAGE_BASELINES}")
    if normalize == "std":
        adv = adv / (group.std(dim=1, keepdim=True, unbiased=False) + eps)
    if positive_only:
        adv = adv.clamp_min(0.0)
    return adv


def policy_loss(
    logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    action_mask: torch.Tensor,
    advantages: torch.Tensor,
    ratio_clip: float = 0.2,
    tis_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio policy gradient, summed over a thought's actions, averaged over thoughts.

    logps/sampler_logps/action_mask: (N, K, M); advantages: (N, K). Returns (loss, stats).

    ``tis_cap > 0``: truncated importance sampling instead of a ratio against the sampler. The ratio is taken
    against the learner's own log-probs (1 in value: with one update per rollout they are the "old" policy), and
    each token's term is weighted by min(pi_learner / pi_sampler, tis_cap), detached: the correction verl and
    prime-rl offer for a sampler that lags or computes differently (bf16, CUDA graphs)."""
    mask = action_mask.to(logps.dtype)
    n_tok = mask.sum().clamp_min(1)
    gap = (logps.detach() - sampler_logps.detach()) * mask
    r = torch.exp(gap)  # learner / sampler, whatever the loss uses
    reference = logps.detach() if tis_cap > 0 else sampler_logps.detach()
    ratio = torch.exp((logps - reference) * mask)
    adv = advantages.detach()[..., None]
    unclipped = ratio * adv
    if ratio_clip > 0:
        clipped = ratio.clamp(1 - ratio_clip, 1 + ratio_clip) * adv
        per_token = -torch.minimum(unclipped, clipped)
    else:
        per_token = -unclipped
    tis_stats = {}
    if tis_cap > 0:
        weight = r.clamp(max=tis_cap)
        per_token = per_token * weight
        tis_stats = {
            "tis_weight": float((weight * mask).sum() / n_tok),
            "tis_truncated": float(((r > tis_cap) * mask).sum() / n_tok),
        }
    loss = (per_token * mask).sum(-1).mean() if mask.numel() else logps.sum() * 0
    ratio_mean = (r * mask).sum() / n_tok
    stats = {
        "ratio_mean": float(ratio_mean),
        # the sampler-learner gap: 0 (up to kernels) when the sampler holds the learner's weights; a sync that
        # changed nothing, bf16 or CUDA-graph kernels, or staleness show here first
        "sampler_gap": float(gap.abs().sum() / n_tok),
        "ratio_std": float((((r - ratio_mean) ** 2 * mask).sum() / n_tok).sqrt()),
        "clip_frac": float((((r - 1).abs() > ratio_clip) * mask).sum() / n_tok) if ratio_clip > 0 else 0.0,
        **tis_stats,
    }
    return loss, stats


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def nll_loss(
    logp_targets: torch.Tensor, target_mask: torch.Tensor, row_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean NLL per target token. logp_targets (N, R, n), target_mask (N, n), row_weights (N, R) or None."""
    mask = target_mask[:, None, :].expand_as(logp_targets).to(logp_targets.dtype)
    if row_weights is not None:
        mask = mask * row_weights[..., None].to(mask.dtype)
    return -(logp_targets * mask).sum() / mask.sum().clamp_min(1)
