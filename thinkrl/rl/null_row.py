"""When a training loss needs the null thought's row (no torch: ``thinkrl plan`` counts the same forwards).

The null thought z0 is scored by one more set of passes per model. A loss needs it when the interpreter learns from
it (``learner.interpreter_null``, or ``interpreter_only_helpful`` against it) or when it is the reward reference
(``reward.baseline=null``) and does not cancel in the advantages (``reference_cancels``). Otherwise training skips
it, and logs no reward against it (``learner.score_null``; the held-out evaluation always scores it).
"""

from __future__ import annotations


def reference_cancels(baseline: str, include_null: bool, clip: float) -> bool:
    """True when adding one constant to every reward of a position leaves its advantages unchanged
    (``core_algos.compute_advantages`` after ``shape_rewards``), so the reward reference need not be computed: a
    group baseline (leave-one-out or mean) subtracts it, the std normalisation and ``positive_only`` act on the
    differences and the penalties are per thought. A clip (applied to the raw rewards), the null thought's reward 0 in
    the group (``include_null``) or no baseline keep it."""
    return baseline in ("leave_one_out", "mean") and not include_null and clip == 0


def needs_null_row(cfg, num_thoughts: int) -> bool:
    """Whether training scores the null thought; ``learner.score_null=always`` scores it anyway, for train/reward,
    train/null_rate and train/reward_copy_share every step. A control run (no thoughts) scores only it."""
    lc = cfg.learner
    if lc.score_null == "always" or num_thoughts == 0:
        return True
    if lc.interpreter_weight > 0 and (
        lc.interpreter_null or (lc.interpreter_only_helpful and cfg.reward.baseline == "null")
    ):
        return True
    return cfg.reward.baseline == "null" and not reference_cancels(lc.baseline, lc.include_null, cfg.reward.clip)
