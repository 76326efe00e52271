"""Reward, advantage and loss maths against hand-computed values."""

import math

import pytest
import torch

from thinkrl.rl import core_algos as ca


def test_token_and_sequence_rewards_by_hand():
    logp_thoughts = torch.tensor([[[-1.0, -2.0], [-3.0, -0.5]]])  # (N=1, K=2, n=2)
    logp_null = torch.tensor([[-2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0]])
    per_token = ca.token_rewards(logp_thoughts, logp_null, mask)
    assert torch.equal(per_token, torch.tensor([[[1.0, -1.0], [-1.0, 0.5]]]))
    assert torch.allclose(ca.sequence_rewards(per_token, mask), torch.tensor([[0.0, -0.5]]))
    # discount 0.5: 1 + 0.5 * -1 = 0.5 ; -1 + 0.5 * 0.5 = -0.75
    assert torch.allclose(ca.sequence_rewards(per_token, mask, 0.5), torch.tensor([[0.5, -0.75]]))
    # a masked target token contributes nothing
    assert torch.allclose(ca.sequence_rewards(per_token, torch.tensor([[1.0, 0.0]])), torch.tensor([[1.0, -1.0]]))


def test_null_thought_reward_is_exactly_zero():
    logp_null = torch.randn(3, 4)
    same = logp_null[:, None, :].expand(3, 2, 4)
    assert torch.equal(ca.token_rewards(same, logp_null, torch.ones(3, 4)), torch.zeros(3, 2, 4))


def test_leave_one_out_by_hand_and_sums_to_zero():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    adv = ca.compute_advantages(r, "leave_one_out")
    assert torch.allclose(adv, torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5]]))
    # K/(K-1) (r_i - mean) is the same estimator
    assert torch.allclose(adv, 3 / 2 * (r - r.mean()))
    many = torch.randn(16, 8)
    assert torch.allclose(ca.compute_advantages(many).sum(1), torch.zeros(16), atol=1e-5)


def test_leave_one_out_with_null_in_group():
    r = torch.tensor([[1.0, 3.0]])
    adv = ca.compute_advantages(r, "leave_one_out", include_null=True)
    # group {1, 3, 0}: A_1 = 1 - (3 + 0)/2, A_2 = 3 - (1 + 0)/2; the null's own A would be 0 - 2 = -2
    assert torch.allclose(adv, torch.tensor([[-0.5, 2.5]]))
    assert math.isclose(float(adv.sum()) + (0 - 2.0), 0.0, abs_tol=1e-6)  # whole group incl. null sums to 0


def test_mean_baseline_positive_only_normalize_none():
    r = torch.tensor([[1.0, 3.0]])
    assert torch.allclose(ca.compute_advantages(r, "mean"), torch.tensor([[-1.0, 1.0]]))
    assert torch.allclose(ca.compute_advantages(r, "mean", positive_only=True), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(ca.compute_advantages(r, "none"), r)
    # std of {1, 3} is 1 (population): normalised advantages are unchanged here; of {2, 6} it is 2
    assert torch.allclose(
        ca.compute_advantages(r * 2, "mean", normalize="std"), torch.tensor([[-1.0, 1.0]]), atol=1e-5
    )
    with pytest.raises(ValueError):
        ca.compute_advantages(torch.ones(2, 1), "leave_one_out")


def test_shape_rewards_clip_and_penalties():
    r = torch.tensor([[5.0, -5.0, 0.5]])
    lengths = torch.tensor([[2, 4, 0]])
    finished = torch.tensor([[True, False, True]])
    shaped = ca.shape_rewards(r, lengths, finished, length_penalty=0.1, unfinished_penalty=1.0, clip=2.0)
    assert torch.allclose(shaped, torch.tensor([[2.0 - 0.2, -2.0 - 0.4 - 1.0, 0.5]]))


def test_policy_loss_on_policy_is_reinforce():
    logps = torch.tensor([[[-1.0, -2.0], [-0.5, 0.0]]], requires_grad=True)  # (1, 2, 2)
    mask = torch.tensor([[[True, True], [True, False]]])
    adv = torch.tensor([[2.0, -1.0]])
    loss, stats = ca.policy_loss(logps, logps.detach(), mask, adv)
    assert math.isclose(float(loss.detach()), -(2.0 * 2 + -1.0 * 1) / 2)  # ratio 1: -(sum A_i * n_tokens_i) / K
    loss.backward()
    # d/dlogp of -A * ratio = -A (ratio = 1), averaged over N*K = 2 thoughts; masked token gets 0
    assert torch.allclose(logps.grad, torch.tensor([[[-1.0, -1.0], [0.5, 0.0]]]))
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0


def test_policy_loss_clips_the_ratio():
    sampler = torch.log(torch.tensor([[[0.5]], [[0.5]]]))  # (2, 1, 1)
    learner = torch.log(torch.tensor([[[0.9]], [[0.9]]])).requires_grad_()
    mask = torch.ones(2, 1, 1, dtype=torch.bool)
    adv = torch.tensor([[1.0], [-1.0]])
    loss, stats = ca.policy_loss(learner, sampler, mask, adv, ratio_clip=0.2)
    # ratio 1.8: positive advantage is capped at 1.2; negative keeps the unclipped (pessimistic) 1.8
    assert math.isclose(float(loss), (-1.2 + 1.8) / 2, rel_tol=1e-5)
    assert stats["clip_frac"] == 1.0
    loss.backward()
    assert float(learner.grad[0]) == 0.0 and float(learner.grad[1]) != 0.0


def test_truncated_importance_sampling_weights_each_token_by_the_capped_ratio():
    """tis_cap: the gradient of token t is -A * min(p_learner/p_sampler, cap) * d log p, never clipped to 0."""
    sampler = torch.log(torch.tensor([[[0.5, 0.3]], [[0.5, 0.9]]]))  # (2, 1, 2)
    learner = torch.log(torch.tensor([[[0.9, 0.3]], [[0.9, 0.45]]])).requires_grad_()
    mask = torch.ones(2, 1, 2, dtype=torch.bool)
    adv = torch.tensor([[1.0], [-1.0]])
    loss, stats = ca.policy_loss(learner, sampler, mask, adv, ratio_clip=0.2, tis_cap=1.5)
    loss.backward()
    # weights: 1.8 -> capped 1.5; 1.0; 1.8 -> 1.5; 0.5. The PPO clip that zeroed thought 0's first token is gone.
    expected = torch.tensor([[[-1.5, -1.0]], [[1.5, 0.5]]]) / 2
    assert torch.allclose(learner.grad, expected)
    assert math.isclose(stats["tis_weight"], (1.5 + 1.0 + 1.5 + 0.5) / 4, rel_tol=1e-6)
    assert stats["tis_truncated"] == 0.5
    # learner == sampler: the same as no correction
    on = torch.log(torch.tensor([[[0.2, 0.7]]])).requires_grad_()
    plain = on.detach().clone().requires_grad_()
    ca.policy_loss(on, on.detach(), mask[:1], adv[:1], tis_cap=2.0)[0].backward()
    ca.policy_loss(plain, plain.detach(), mask[:1], adv[:1])[0].backward()
    assert torch.allclose(on.grad, plain.grad)


def test_nll_loss_with_row_weights():
    logp = torch.tensor([[[-1.0, -3.0], [-2.0, -4.0]]])  # (1, R=2, n=2)
    mask = torch.tensor([[True, False]])
    assert math.isclose(float(ca.nll_loss(logp, mask)), 1.5)
    assert math.isclose(float(ca.nll_loss(logp, mask, torch.tensor([[0.0, 1.0]]))), 2.0)
    assert math.isclose(float(ca.masked_mean(torch.tensor([1.0, 3.0]), torch.tensor([True, False]))), 1.0)


def test_reward_references_by_hand():
    logp_thoughts = torch.tensor([[[-1.0, -2.0], [-3.0, -0.5]]])  # (N=1, K=2, n=2)
    null, base, ema = torch.tensor([[-2.0, -1.0]]), torch.tensor([[-1.5, -0.5]]), torch.tensor([[-4.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0]])

    def rewards(kind):
        ref = ca.reference_logps(kind, null, base, ema)
        return ca.sequence_rewards(ca.token_rewards(logp_thoughts, ref, mask), mask)

    # null: (-1+2) + (-2+1) = 0, (-3+2) + (-0.5+1) = -0.5
    assert torch.allclose(rewards("null"), torch.tensor([[0.0, -0.5]]))
    # no thought (base): (-1+1.5) + (-2+0.5) = -1, (-3+1.5) + (-0.5+0.5) = -1.5
    assert torch.allclose(rewards("no_thought"), torch.tensor([[-1.0, -1.5]]))
    # EMA: (-1+4) + (-2+3) = 4, (-3+4) + (-0.5+3) = 3.5
    assert torch.allclose(rewards("ema"), torch.tensor([[4.0, 3.5]]))
    with pytest.raises(ValueError, match="EMA"):
        ca.reference_logps("ema", null, base, None)
    with pytest.raises(ValueError, match="unknown reward baseline"):
        ca.reference_logps("mean", null, base, ema)


def test_ema_update_by_hand():
    ema, live = [torch.tensor([1.0, -2.0]), torch.tensor([[0.0]])], [torch.tensor([3.0, 2.0]), torch.tensor([[10.0]])]
    ca.ema_update_(ema, live, decay=0.75)  # 0.75 * ema + 0.25 * live
    assert torch.allclose(ema[0], torch.tensor([1.5, -1.0])) and torch.allclose(ema[1], torch.tensor([[2.5]]))
    ca.ema_update_(ema, live, decay=0.75)
    assert torch.allclose(ema[0], torch.tensor([1.875, -0.25]))
    frozen = [torch.tensor([4.0])]
    ca.ema_update_(frozen, [torch.tensor([9.0])], decay=1.0)  # decay 1 keeps the start
    assert torch.equal(frozen[0], torch.tensor([4.0]))
