"""Held-out evaluation of thoughts on a fixed slice of positions, with a fixed sampling seed.

Metrics (per target token where it is an NLL):
  reward_mean        mean over positions and thoughts of log q(y|x,z) - log q(y|x,z0) (against the null thought,
                     whatever reward.baseline the training used)
  nll_thought        NLL of y after the sampled thoughts (mixed prediction)
  nll_best           NLL after the best of the K thoughts per position (an upper bound on what search gives)
  nll_null           NLL of y after the null thought
  nll_base           NLL of y from the base with no thought at all (its own LM head)
  null_rate          share of positions where no sampled thought beats the null thought
  thought_len_mean   thought tokens between the markers; unfinished_rate: share that hit the length limit
  mix_weight         mean interpreter weight of the mixing head on target tokens after a thought
  copy_rate          share of sampled thoughts whose tokens contain the first target token y_1; copy_rate_target:
                     the whole target y_1..y_n as a contiguous run; copy_rate_null: the null thought's (0 for the
                     empty one); reward_copy_share: share of the positive rewards (vs the null thought) earned by
                     thoughts containing y_1, 0 without positive reward (``rl.copy_gauge``). Step 0's evaluation
                     (untrained thoughts, the same positions and seeds) is their chance level.
"""

from __future__ import annotations

import torch

from thinkrl.config import Config
from thinkrl.data.windows import WindowPool, group_windows, take_positions, window_batch
from thinkrl.models.roles import RoleModels
from thinkrl.prompts import ReasonerPrompt, wrap_contexts
from thinkrl.rl.copy_gauge import copy_flags, positive_reward_sums
from thinkrl.rl.learner import PositionScoring, rewards_and_advantages
from thinkrl.rl.scoring import Scorer
from thinkrl.rl.window_scoring import WindowScoring
from thinkrl.rollout.base import RolloutActor
from thinkrl.rollout.policy import position_seeds

EVAL_KEYS = (
    "reward_mean",
    "nll_thought",
    "nll_best",
    "nll_null",
    "nll_base",
    "null_rate",
    "thought_len_mean",
    "unfinished_rate",
    "mix_weight",
    "copy_rate",
    "copy_rate_target",
    "copy_rate_null",
    "reward_copy_share",
)


class _Sums(dict):
    def add(self, key: str, value: float, count: float) -> None:
        total, n = self.get(key, (0.0, 0.0))
        self[key] = (total + float(value), n + float(count))

    def means(self) -> dict[str, float]:
        return {k: (t / n if n else float("nan")) for k, (t, n) in self.items()}


def _batches(cfg: Config, roles, actor, scorer, pool, n_eval: int, generator, reasoner_prompt):
    """(thoughts, scoring) over the first ``n_eval`` positions of ``pool``, batch by batch: whole windows in
    parallel passes, or positions one sequence each (``Config.parallel_passes``)."""
    k, step = cfg.rollout.num_thoughts, cfg.trainer.batch_positions
    if cfg.parallel_passes():
        device = roles.model("interpreter").device
        for group in group_windows(take_positions(WindowPool(pool), n_eval), step):
            batch = window_batch(group, scorer.pad_id, device)
            thoughts = actor.sample_windows(batch, k, position_seeds(batch.num_positions, generator))
            yield thoughts, WindowScoring(cfg, roles, scorer, batch)
        return
    for start in range(0, n_eval, step):
        positions = [pool[i] for i in range(start, min(n_eval, start + step))]
        contexts, targets = [p.context_ids for p in positions], [p.target_ids for p in positions]
        reasoner_contexts = wrap_contexts(reasoner_prompt, contexts)
        thoughts = actor.sample(reasoner_contexts, k, position_seeds(len(contexts), generator))
        yield thoughts, PositionScoring(roles, scorer, contexts, targets, reasoner_contexts)


@torch.no_grad()
def evaluate(
    cfg: Config,
    roles: RoleModels,
    actor: RolloutActor,
    scorer: Scorer,
    pool,
    seed: int,
    reasoner_prompt: ReasonerPrompt | None = None,
) -> dict[str, float]:
    """Metrics above over the first ``data.eval_positions`` positions of ``pool``."""
    modules = roles.modules().values()
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    generator = torch.Generator().manual_seed(seed)
    k = cfg.rollout.num_thoughts
    sums = _Sums()
    n_eval = min(len(pool), cfg.data.eval_positions)
    try:
        for thoughts, scoring in _batches(cfg, roles, actor, scorer, pool, n_eval, generator, reasoner_prompt):
            scores = scoring.scores(thoughts)
            positions = range(thoughts.num_positions)
            _, rewards, _ = rewards_and_advantages(cfg, scores, thoughts)
            mask = scores.target_mask.float()
            tokens = mask.sum()
            null_first, null_whole = _null_copies(scorer, scores)
            sums.add("copy_rate_null", null_first.sum(), null_first.numel())
            sums.add("nll_null", -(scores.logp[:, -1] * mask).sum(), tokens)
            sums.add("nll_base", -(scores.logp_base * mask).sum(), tokens)
            if k:
                nll_rows = -(scores.logp[:, :-1] * mask[:, None]).sum(-1)  # (N, K)
                sums.add("reward_mean", rewards.sum(), rewards.numel())
                sums.add("nll_thought", nll_rows.sum(), tokens * k)
                sums.add("nll_best", nll_rows.min(dim=1).values.sum(), tokens)
                sums.add("null_rate", (rewards.max(dim=1).values <= 0).float().sum(), len(positions))
                sums.add("thought_len_mean", thoughts.lengths.float().sum(), thoughts.lengths.numel())
                sums.add("unfinished_rate", (~thoughts.finished).float().sum(), thoughts.finished.numel())
                sums.add("mix_weight", (scores.weight[:, :-1] * mask[:, None]).sum(), tokens * k)
                first, whole = copy_flags(
                    thoughts.thought_ids, thoughts.lengths, scores.target_ids, scores.target_mask
                )
                sums.add("copy_rate", first.sum(), first.numel())
                sums.add("copy_rate_target", whole.sum(), whole.numel())
                sums.add("reward_copy_share", *positive_reward_sums(rewards, first))
            else:  # control run: the null thought is the only thought
                nll_null = -(scores.logp[:, -1] * mask).sum()
                for key, value, count in (
                    ("reward_mean", 0.0, len(positions)),
                    ("nll_thought", nll_null, tokens),
                    ("nll_best", nll_null, tokens),
                    ("null_rate", len(positions), len(positions)),
                    ("thought_len_mean", 0.0, 1),
                    ("unfinished_rate", 0.0, 1),
                    ("copy_rate", null_first.sum(), null_first.numel()),
                    ("copy_rate_target", null_whole.sum(), null_whole.numel()),
                    ("reward_copy_share", 0.0, 0.0),
                ):
                    sums.add(key, value, count)
                sums.add("mix_weight", (scores.weight[:, -1] * mask).sum(), tokens)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    result = sums.means()
    if sums.get("reward_copy_share", (0.0, 0.0))[1] == 0:  # no positive reward: nothing was earned by copying
        result["reward_copy_share"] = 0.0
    result["positions"] = n_eval
    return result


def _null_copies(scorer: Scorer, scores) -> tuple[torch.Tensor, torch.Tensor]:
    """The null thought's copy flags at each position, (N, 1) each: its tokens between the markers (none for the
    empty null thought, so 0 by construction) against the position's targets."""
    n_pos = scores.target_ids.shape[0]
    null = torch.tensor(scorer.null_seq[1:-1], dtype=torch.long, device=scores.target_ids.device)
    ids = null.expand(n_pos, 1, -1)
    lengths = torch.full((n_pos, 1), len(null), dtype=torch.long, device=null.device)
    return copy_flags(ids, lengths, scores.target_ids, scores.target_mask)
