"""The policy distribution shared by sampler and learner."""

import torch

from thinkrl.rollout.policy import policy_logits, sample_tokens


def test_policy_logits_ban_markers_without_nan_entropy():
    logits = torch.randn(2, 6)
    out = policy_logits(logits, 0.5, sot_id=4, eot_id=5, fixed_length=True)
    probs = out.softmax(-1)
    assert torch.equal(probs[:, 4:], torch.zeros(2, 2))
    assert torch.allclose(out[:, :4], logits[:, :4] / 0.5)
    entropy = -(probs * out.log_softmax(-1)).sum(-1)
    assert torch.isfinite(entropy).all()
    assert torch.equal(logits, logits.clone())  # the caller's tensor is untouched
    variable = policy_logits(logits, 1.0, sot_id=4, eot_id=5, fixed_length=False).softmax(-1)
    assert float(variable[0, 5]) > 0 and float(variable[0, 4]) == 0.0


def test_top_p_samples_only_the_nucleus_and_reports_untruncated_logps():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, logps = sample_tokens(logits, top_p=0.5, uniform=torch.rand(logits.shape, generator=gen))
    assert bool((tokens == 0).all())  # 0.6 alone already covers p=0.5
    assert torch.allclose(logps, torch.log(torch.tensor(0.6)))
    tokens, _ = sample_tokens(logits, top_p=0.8, uniform=torch.rand(logits.shape, generator=gen))
    assert set(tokens.tolist()) == {0, 1}  # 0.6 + 0.3 covers 0.8; token 2 never drawn
    tokens, _ = sample_tokens(logits, top_p=1.0, uniform=torch.rand(logits.shape, generator=gen))
    share = torch.bincount(tokens, minlength=3).float() / len(tokens)
    assert torch.allclose(share, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_a_thought_depends_on_its_seed_only():
    """Same uniform noise → same token, whatever else is in the batch."""
    logits = torch.randn(1, 50)
    noise = torch.rand(1, 50, generator=torch.Generator().manual_seed(7))
    alone, _ = sample_tokens(logits, 1.0, noise)
    batch, _ = sample_tokens(torch.cat([torch.randn(3, 50), logits]), 1.0, torch.cat([torch.rand(3, 50), noise]))
    assert int(alone[0]) == int(batch[-1])
