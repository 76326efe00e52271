"""The target-copy gauge and ``reward.copy_penalty`` against hand-made thoughts, targets and rewards."""

import pytest
import torch

from thinkrl.config import load_config
from thinkrl.rl import core_algos
from thinkrl.rl.copy_gauge import copy_flags, list_copy_flags, positive_reward_sums, reward_copy_share
from thinkrl.rl.learner import rewards_and_advantages
from thinkrl.rl.scoring import Scores
from thinkrl.rollout.base import ThoughtBatch

EOT, PAD = 2, 0
# Position 0: targets y = 7 8 9. Position 1: one target token 4 (then padding). Position 2: no target at all.
TARGETS = torch.tensor([[7, 8, 9], [4, PAD, PAD], [PAD, PAD, PAD]])
TARGET_MASK = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
# (tokens z_1..z_m, what follows them in thought_ids, copies_first, copies_target)
THOUGHTS = [
    [
        ([3, 7, 4], [EOT], True, False),  # y_1 then something else
        ([1, 7, 8, 9], [EOT], True, True),  # the whole target, contiguous
        ([8, 9, 1], [EOT], False, False),  # y_2 y_3 only
        ([7, 1, 8, 9], [], True, False),  # every target token, not contiguous (unfinished: no end token)
    ],
    [
        ([5, 4], [EOT], True, True),  # a one-token target is copied whole by its first token
        ([5, 6], [EOT, 4], False, False),  # y_1 only after the end token (padding region): not counted
        ([], [EOT, 4, 4], False, False),  # the empty thought
        ([4, 4, 4, 4], [], True, True),
    ],
    [
        ([PAD, 7, 4], [EOT], False, False),  # no target: nothing to copy, even the padding id
        ([1], [EOT], False, False),
        ([2, 3], [EOT], False, False),
        ([3], [EOT], False, False),
    ],
]


def _batch() -> ThoughtBatch:
    """THOUGHTS as a ThoughtBatch: actions z (+ the end token when sampled), then whatever sits after them."""
    m = max(len(z) + len(after) for row in THOUGHTS for z, after, _, _ in row)
    ids = torch.full((3, 4, m), PAD)
    lengths = torch.zeros((3, 4), dtype=torch.long)
    finished = torch.zeros((3, 4), dtype=torch.bool)
    for i, row in enumerate(THOUGHTS):
        for j, (z, after, _, _) in enumerate(row):
            ids[i, j, : len(z) + len(after)] = torch.tensor(z + after, dtype=torch.long)
            lengths[i, j] = len(z)
            finished[i, j] = bool(after) and after[0] == EOT
    mask = torch.arange(m) < (lengths + finished.long())[..., None]
    return ThoughtBatch(ids, mask, torch.zeros(ids.shape), finished, lengths)


def _expected(index: int) -> torch.Tensor:
    return torch.tensor([[t[index] for t in row] for row in THOUGHTS])


def test_copy_flags_on_hand_made_thoughts():
    batch = _batch()
    first, whole = copy_flags(batch.thought_ids, batch.lengths, TARGETS, TARGET_MASK)
    assert torch.equal(first, _expected(2)) and torch.equal(whole, _expected(3))
    assert not (whole & ~first).any()  # the whole target holds y_1
    # The same flags from plain token lists (what thinkrl eval's records use), position by position.
    for i, row in enumerate(THOUGHTS):
        target = TARGETS[i][TARGET_MASK[i]].tolist()
        assert list_copy_flags([z for z, *_ in row], target) == [(f, w) for _, _, f, w in row]
    # no thoughts, or no target tokens at all: nothing copies
    empty = torch.zeros((3, 0, 0), dtype=torch.long)
    assert copy_flags(empty, torch.zeros((3, 0), dtype=torch.long), TARGETS, TARGET_MASK)[0].shape == (3, 0)
    first, whole = copy_flags(batch.thought_ids, batch.lengths, TARGETS[:, :0], TARGET_MASK[:, :0])
    assert not first.any() and not whole.any()


def test_copy_rates_and_reward_copy_share_by_hand():
    batch = _batch()
    rewards = torch.tensor([[2.0, 1.0, 3.0, -5.0], [0.5, 0.0, -1.0, 1.5], [4.0, -1.0, 0.0, 0.0]])
    first, whole = copy_flags(batch.thought_ids, batch.lengths, TARGETS, TARGET_MASK)
    # copies_first: 3 + 2 + 0 of 12 thoughts; copies_target: 1 + 2 + 0
    assert float(first.float().mean()) == pytest.approx(5 / 12) and float(whole.float().mean()) == pytest.approx(
        3 / 12
    )
    # positive rewards 2 + 1 + 3 + 0.5 + 1.5 + 4 = 12; of copying thoughts 2 + 1 + 0.5 + 1.5 = 5 (the -5 counts 0)
    copying, total = positive_reward_sums(rewards, first)
    assert (float(copying), float(total)) == pytest.approx((5.0, 12.0))
    assert reward_copy_share(copying, total) == pytest.approx(5 / 12)
    # sums add over batches: the share of two halves is the ratio of the summed sums, not a mean of shares
    halves = [positive_reward_sums(rewards[rows], first[rows]) for rows in (slice(0, 1), slice(1, 3))]
    assert reward_copy_share(*(sum(float(h[i]) for h in halves) for i in (0, 1))) == pytest.approx(5 / 12)
    assert reward_copy_share(*positive_reward_sums(-rewards.abs(), first)) == 0.0  # no positive reward: 0
    assert reward_copy_share(*positive_reward_sums(rewards.clamp_min(0) * first, first)) == 1.0


def _scores(logp_thoughts: torch.Tensor, logp_null: torch.Tensor) -> Scores:
    logp = torch.cat([logp_thoughts, logp_null[:, None]], dim=1)  # (N, K+1, n)
    return Scores(logp, logp, logp_null.clone(), torch.ones_like(logp), TARGETS, TARGET_MASK)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_copy_penalty_lowers_exactly_the_copying_thoughts_rewards(clip):
    """learner.baseline=none: the advantages are the shaped rewards themselves, so the penalty is read off them."""
    torch.manual_seed(0)
    batch = _batch()
    logp_thoughts, logp_null = torch.randn(3, 4, 3), torch.randn(3, 3)
    logp_thoughts[0, 1] = logp_null[0] + 1.0  # a copying thought with reward 3 (> clip + penalty)
    scores = _scores(logp_thoughts, logp_null)
    common = ["learner.baseline=none", "reward.length_penalty=0.01", "reward.unfinished_penalty=0.1"]
    off = load_config(None, [*common, f"reward.clip={clip}"])
    on = load_config(None, [*common, f"reward.clip={clip}", "reward.copy_penalty=0.5"])
    assert off.reward.copy_penalty == 0.0  # the default
    _, rewards_off, adv_off = rewards_and_advantages(off, scores, batch)
    _, rewards_on, adv_on = rewards_and_advantages(on, scores, batch)
    assert torch.equal(rewards_on, rewards_off)  # raw rewards (logged, dumped) are not shaped
    copies = _expected(2)
    # copying thoughts lose exactly the penalty (after the clip), the others are bit-identical
    torch.testing.assert_close(adv_on[copies], adv_off[copies] - 0.5, atol=1e-6, rtol=0)
    assert torch.equal(adv_on[~copies], adv_off[~copies])
    shaped = core_algos.shape_rewards(
        rewards_off, batch.lengths, batch.finished, 0.01, 0.1, clip, copies=copies, copy_penalty=0.5
    )
    assert torch.equal(adv_on, shaped)
    # penalised after the clip: the reward of 3 becomes clip(3) - 4 · 0.01 - 0.5, not clip(3 - 0.5)
    top = (min(3.0, clip) if clip else 3.0) - 0.04 - 0.5
    assert float(adv_on[0, 1]) == pytest.approx(top, abs=1e-5)


def test_default_copy_penalty_leaves_rewards_and_advantages_bit_identical():
    torch.manual_seed(1)
    batch = _batch()
    scores = _scores(torch.randn(3, 4, 3), torch.randn(3, 3))
    cfg = load_config(None, [])
    per_token, rewards, advantages = rewards_and_advantages(cfg, scores, batch)
    shaped = core_algos.shape_rewards(rewards, batch.lengths, batch.finished)  # the shaping before copy_penalty
    lc = cfg.learner
    want = core_algos.compute_advantages(shaped, lc.baseline, lc.include_null, lc.positive_only, lc.normalize)
    assert torch.equal(advantages, want)
    assert torch.equal(core_algos.shape_rewards(rewards, batch.lengths, batch.finished, copies=_expected(2)), shaped)
    with pytest.raises(ValueError, match="copy flags"):
        core_algos.shape_rewards(rewards, batch.lengths, batch.finished, copy_penalty=1.0)


def test_copy_penalty_must_not_be_negative():
    with pytest.raises(Exception, match="reward.copy_penalty must be >= 0"):
        load_config(None, ["reward.copy_penalty=-0.1"])
