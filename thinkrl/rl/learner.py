"""Learner: one TRICE-style loss over a batch of rollouts, and the optimiser it feeds.

loss = policy_weight · PG(reasoner) − entropy_coef · H(reasoner on thought tokens)
     + interpreter_weight · NLL(y | x, z) through the mixing head
     + base_weight · NLL(y | x) with no thought
The score-function term trains the reasoner; the pathwise NLL terms train interpreter, base and head
(seed note 004's gradient of E_z[-log p(y | z, x)]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import get_scheduler

from thinkrl.config import Config
from thinkrl.models.roles import RoleModels
from thinkrl.rl import copy_gauge, core_algos
from thinkrl.rl.null_row import needs_null_row
from thinkrl.rl.scoring import Scorer, Scores
from thinkrl.rollout.base import ThoughtBatch
from thinkrl.rollout.policy import thought_logps

LR_ROLE_ORDER = ("reasoner", "interpreter", "base")


def build_optimizer(cfg: Config, roles: RoleModels):
    """AdamW with one parameter group per weight group (+ head). A shared group takes the lr of its first
    role in reasoner → interpreter → base order that has a ``learner.role_lr`` entry."""
    lcfg, groups = cfg.learner, []
    for group, model in roles.models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            continue
        lr = next(
            (lcfg.role_lr[r] for r in LR_ROLE_ORDER if roles.role_group[r] == group and r in lcfg.role_lr), lcfg.lr
        )
        groups.append({"params": params, "lr": lr, "name": group})
    head_params = [p for p in roles.head.parameters() if p.requires_grad]
    if head_params:
        groups.append({"params": head_params, "lr": lcfg.role_lr.get("head", lcfg.lr), "name": "head"})
    if not groups:
        raise ValueError("every role is frozen: nothing to train")
    optimizer = torch.optim.AdamW(groups, lr=lcfg.lr, betas=tuple(lcfg.adam_betas), weight_decay=lcfg.weight_decay)
    scheduler = get_scheduler(
        lcfg.scheduler, optimizer, num_warmup_steps=lcfg.warmup_steps, num_training_steps=max(1, cfg.trainer.max_steps)
    )
    return optimizer, scheduler


@dataclass
class LossOutput:
    loss: torch.Tensor
    stats: dict[str, float]
    scores: Scores
    # rewards and per-token rewards are None when the reference is the null thought and it was not scored
    # (``needs_null_row``); null_rewards whenever it was not scored
    rewards: torch.Tensor | None  # (N, K) raw improvement over the reference (reward.baseline)
    per_token_rewards: torch.Tensor | None  # (N, K, n)
    advantages: torch.Tensor  # (N, K)
    null_rewards: torch.Tensor | None  # (N, K) improvement over the null thought (= rewards when that is the baseline)


def rewards_and_advantages(cfg: Config, scores: Scores, thoughts: ThoughtBatch, reference: torch.Tensor | None = None):
    """Detached (per-token rewards, rewards, advantages) from a scored batch, measured against ``reference``
    (N, n) target log-probs (``reward_reference``); None: the null thought. ``rewards`` are raw; the advantages are
    taken from the shaped rewards (``core_algos.shape_rewards``: clip, then the length, unfinished and copy
    penalties)."""
    with torch.no_grad():
        reference = scores.logp_null if reference is None else reference
        per_token = core_algos.token_rewards(scores.logp_thoughts, reference, scores.target_mask.float())
        rewards = core_algos.sequence_rewards(per_token, scores.target_mask.float(), cfg.reward.discount)
        if thoughts.num_thoughts == 0:
            return per_token, rewards, rewards.clone()
        copies = None
        if cfg.reward.copy_penalty > 0:  # thoughts containing y_1 (copy_gauge); the targets ride on the scores
            copies = copy_gauge.copy_flags(
                thoughts.thought_ids, thoughts.lengths, scores.target_ids, scores.target_mask
            )[0].to(rewards.device)
        shaped = core_algos.shape_rewards(
            rewards,
            thoughts.lengths.to(rewards.device),
            thoughts.finished.to(rewards.device),
            cfg.reward.length_penalty,
            cfg.reward.unfinished_penalty,
            cfg.reward.clip,
            copies,
            cfg.reward.copy_penalty,
        )
        lc = cfg.learner
        advantages = core_algos.compute_advantages(
            shaped, lc.baseline, lc.include_null, lc.positive_only, lc.normalize
        )
    return per_token, rewards, advantages


class PositionScoring:
    """Scores and policy terms with each position as its own sequence (task positions, the reference path).

    ``reasoner_contexts``: what the reasoner read before each thought (the contexts wrapped in
    ``rollout.reasoner_template``); the interpreter always reads ``contexts``. The parallel counterpart for many
    positions of one window is ``window_scoring.WindowScoring``; both return the same tensors."""

    def __init__(self, roles: RoleModels, scorer: Scorer, contexts, targets, reasoner_contexts=None):
        self.roles, self.scorer = roles, scorer
        self.contexts, self.targets = contexts, targets
        self.reasoner_contexts = reasoner_contexts or contexts

    def scores(self, thoughts: ThoughtBatch, lean: bool = True, null: bool = True) -> Scores:
        return self.scorer.score(self.contexts, self.targets, thoughts, lean, null)

    def policy(self, thoughts: ThoughtBatch, temperature: float, fixed_length: bool, lean: bool = True):
        roles = self.roles
        return thought_logps(
            roles.model("reasoner"),
            self.reasoner_contexts,
            thoughts,
            roles.sot_id,
            roles.eot_id,
            self.scorer.pad_id,
            temperature,
            fixed_length,
            lean=lean,
        )


def reward_reference(cfg: Config, scores: Scores, logp_ema: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, n) target log-probs rewards are measured against (``reward.baseline``), detached."""
    logp_null = scores.logp_null if cfg.reward.baseline == "null" else None  # the others need no null row
    return core_algos.reference_logps(cfg.reward.baseline, logp_null, scores.logp_base, logp_ema).detach()


def compute_loss(cfg: Config, scoring, thoughts: ThoughtBatch, logp_ema: torch.Tensor | None = None) -> LossOutput:
    """The TRICE loss of one batch; ``scoring`` is a ``PositionScoring`` or a ``WindowScoring``; ``logp_ema``: the
    EMA reference's target log-probs (``reward.baseline=ema``)."""
    lc = cfg.learner
    # learner.lean_losses: target log-probs and policy terms in checkpointed LM-head chunks, never (rows, V) tensors.
    scores = scoring.scores(thoughts, lean=lc.lean_losses, null=needs_null_row(cfg, thoughts.num_thoughts))
    if scores.has_null or cfg.reward.baseline != "null":
        per_token, rewards, advantages = rewards_and_advantages(
            cfg, scores, thoughts, reward_reference(cfg, scores, logp_ema)
        )
    else:
        # The null thought is the reference but cancels in the advantages (needs_null_row), so any per-position
        # constant gives the same advantages; the base's no-thought prediction keeps the values small. No reward
        # against the null thought exists, so none is reported.
        _, _, advantages = rewards_and_advantages(cfg, scores, thoughts, scores.logp_base.detach())
        per_token = rewards = None
    null_rewards = rewards
    if not scores.has_null:
        null_rewards = None
    elif cfg.reward.baseline != "null":  # the null rate and the dumps still compare with the null thought
        with torch.no_grad():
            mask_f = scores.target_mask.float()
            per_null = core_algos.token_rewards(scores.logp_thoughts, scores.logp_null, mask_f)
            null_rewards = core_algos.sequence_rewards(per_null, mask_f, cfg.reward.discount)
    mask = scores.target_mask
    stats: dict[str, float] = {}
    loss = scores.logp.sum() * 0.0  # keeps every term on the graph even when weights are 0

    if thoughts.num_thoughts and (lc.policy_weight > 0 or lc.entropy_coef > 0):
        logps, entropy = scoring.policy(
            thoughts, cfg.rollout.temperature, cfg.rollout.length_mode == "fixed", lean=lc.lean_losses
        )
        action_mask = thoughts.thought_mask.to(logps.device)
        pg, pg_stats = core_algos.policy_loss(
            logps, thoughts.sampler_logps.to(logps.device), action_mask, advantages, lc.ratio_clip, lc.tis_cap
        )
        ent = core_algos.masked_mean(entropy, action_mask)
        loss = loss + lc.policy_weight * pg - lc.entropy_coef * ent
        stats.update(policy_loss=float(pg.detach()), entropy=float(ent.detach()), **pg_stats)

    if lc.interpreter_weight > 0:
        # Row weights over the K thoughts + null: sampled thoughts (all, or only those beating the null), the null.
        row_weights = torch.ones(scores.logp.shape[:2], device=scores.logp.device)
        k = scores.num_thoughts
        if lc.interpreter_only_helpful:
            row_weights[:, :k] = (rewards > 0).float()
        if scores.has_null and not lc.interpreter_null and k:
            row_weights[:, -1] = 0.0
        nll = core_algos.nll_loss(scores.logp, mask, row_weights)
        loss = loss + lc.interpreter_weight * nll
        stats["interpreter_nll"] = float(nll.detach())
    if lc.base_weight > 0:
        base_nll = core_algos.nll_loss(scores.logp_base[:, None], mask)
        loss = loss + lc.base_weight * base_nll
        stats["base_nll"] = float(base_nll.detach())
    stats["loss"] = float(loss.detach())
    return LossOutput(loss, stats, scores, rewards, per_token, advantages, null_rewards)
