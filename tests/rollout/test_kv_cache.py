"""KV-cached sampling and scoring equal an uncached recompute of every sequence on its own."""

import torch

from thinkrl.models.roles import build_roles
from thinkrl.models.true_tokens import mask_markers
from thinkrl.rl.scoring import Scorer
from thinkrl.rollout.hf_actor import HFRolloutActor
from thinkrl.rollout.policy import policy_logits, position_seeds

# Contexts of different lengths so left padding and position ids are exercised.
CONTEXTS = [[1, 4, 5, 14, 13, 6, 20, 18, 7, 5], [1, 4, 9, 9, 6, 7, 5], [1, 4, 5, 12, 13, 6, 20, 18, 18, 16, 7, 5]]
TARGETS = [[14, 13], [9, 9], [12]]


def _full_logprobs(model, seq, markers=()):
    """log-softmax of a single unpadded sequence, no cache: (len, V); ``markers`` get no probability, as in every
    prediction of a true token (``models/true_tokens``)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
        return torch.log_softmax(mask_markers(logits, torch.tensor(list(markers), dtype=torch.long)), -1)


def _roles(tiny_config, *overrides):
    torch.manual_seed(0)
    cfg = tiny_config(*overrides)
    return cfg, build_roles(cfg)


def test_cached_sampling_logps_equal_uncached(tiny_config):
    for mode in ("variable", "fixed"):
        cfg, roles = _roles(
            tiny_config, f"rollout.length_mode={mode}", "rollout.temperature=0.7", "rollout.batch_positions=2"
        )
        model = roles.model("reasoner")
        actor = HFRolloutActor(cfg.rollout, model, roles.sot_id, roles.eot_id, roles.tokenizer.pad_token_id)
        thoughts = actor.sample(CONTEXTS, 3, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(1)))
        assert thoughts.thought_ids.shape[:2] == (3, 3)
        for i, ctx in enumerate(CONTEXTS):
            for k in range(3):
                n_act = int(thoughts.thought_mask[i, k].sum())
                actions = thoughts.thought_ids[i, k, :n_act].tolist()
                logp = policy_logits(
                    _full_logprobs(model, ctx + [roles.sot_id] + actions),
                    0.7,
                    roles.sot_id,
                    roles.eot_id,
                    mode == "fixed",
                ).log_softmax(-1)
                start = len(ctx)  # logits at the sot position predict the first action
                expected = logp[start : start + n_act].gather(-1, torch.tensor(actions)[:, None]).squeeze(-1)
                assert torch.allclose(thoughts.sampler_logps[i, k, :n_act], expected, atol=1e-5)
                if mode == "fixed":
                    assert n_act == cfg.rollout.max_thought_len and bool(thoughts.finished[i, k])
                else:
                    stopped = roles.eot_id in actions
                    assert bool(thoughts.finished[i, k]) == stopped
                    assert int(thoughts.lengths[i, k]) == n_act - int(stopped)


def test_cached_scoring_equals_uncached(tiny_config):
    for groups in ("[A,A,A]", "[A,B,C]"):
        cfg, roles = _roles(tiny_config, f"model.weight_groups={groups}", "head.form=none")
        actor = HFRolloutActor(
            cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, roles.tokenizer.pad_token_id
        )
        thoughts = actor.sample(CONTEXTS, 2, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(2)))
        scorer = Scorer(roles, [], cfg.data.interpreter_window, "interpreter")
        with torch.no_grad():
            scores = scorer.score(CONTEXTS, TARGETS, thoughts)
        seqs = thoughts.interpreter_sequences(roles.sot_id, roles.eot_id)
        window = cfg.data.interpreter_window
        markers = [roles.sot_id, roles.eot_id]
        for i, (ctx, y) in enumerate(zip(CONTEXTS, TARGETS)):
            w = ctx[-window:]
            for k, z in enumerate(seqs[i] + [[roles.sot_id, roles.eot_id]]):
                logp = _full_logprobs(roles.model("interpreter"), w + z + y, markers)
                start = len(w) + len(z) - 1
                expected = logp[start : start + len(y)].gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
                assert torch.allclose(scores.logp[i, k, : len(y)], expected, atol=1e-5)
            base = _full_logprobs(roles.model("base"), w + y, markers)
            expected = base[len(w) - 1 : len(w) - 1 + len(y)].gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
            assert torch.allclose(scores.logp_base[i, : len(y)], expected, atol=1e-5)
            assert not scores.target_mask[i, len(y) :].any()


def test_null_thought_among_sampled_has_reward_zero(tiny_config):
    """A sampled thought that is exactly the null thought scores exactly like it."""
    from thinkrl.rl.learner import rewards_and_advantages
    from thinkrl.rollout.base import ThoughtBatch

    cfg, roles = _roles(tiny_config)
    eot, pad = roles.eot_id, roles.tokenizer.pad_token_id
    ids = torch.tensor([[[eot, pad], [7, eot]]] * 2)  # thought 0 = <sot><eot> (the null), thought 1 = "x"
    mask = ids != pad
    thoughts = ThoughtBatch(
        ids, mask, torch.zeros(2, 2, 2), torch.ones(2, 2, dtype=torch.bool), torch.tensor([[0, 1]] * 2)
    )
    scorer = Scorer(roles, [], cfg.data.interpreter_window, "mixed")
    with torch.no_grad():
        scores = scorer.score(CONTEXTS[:2], TARGETS[:2], thoughts)
    _, rewards, _ = rewards_and_advantages(cfg, scores, thoughts)
    assert torch.allclose(rewards[:, 0], torch.zeros(2), atol=1e-6)
