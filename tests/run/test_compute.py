"""Compute accounting (tokens per weight group and phase, FLOPs) against hand counts, the FLOP budget
(``trainer.max_flops``/``compute_match``) and the no-thought LM baseline (``learner.objective=lm``)."""

import json

import pytest
import torch

from thinkrl.config import load_config
from thinkrl.errors import ConfigError
from thinkrl.rl.learner import compute_loss
from thinkrl.rl.lm_baseline import position_target_logps
from thinkrl.run.compute import (
    ComputeCounter,
    backward_flops,
    crossed,
    flops_budget,
    forward_flops,
    matched_interval,
    non_embedding_params,
    run_steps,
    step_flops,
    tokens_of_call,
    training_flops,
)
from thinkrl.run.trainer import Trainer

# conftest.TINY: hidden 32, 2 layers, MLP 64 → non-embedding parameters per layer: q, k, v, o (4·d²), gate, up,
# down (3·d·f), two RMSNorms (2·d); plus the final norm (d). Embeddings (26 × 32) and the LM head are not counted.
D, F, LAYERS = 32, 64, 2
N_TINY = LAYERS * (4 * D * D + 3 * D * F + 2 * D) + D  # 20640
# The synthetic task's batch (conftest.TINY): 4 positions, contexts of 15 tokens, y of 2, interpreter window 3,
# K = 4 thoughts of exactly 4 tokens (length_mode=fixed).
POS, CTX, N_AHEAD, WIN, K, M = 4, 15, 2, 3, 4, 4


def test_flop_maths_by_hand():
    assert forward_flops(10, 100) == 2_000
    assert backward_flops(10, 100, 100) == 4_000  # 4·N per token when everything trains: 6·N with the forward
    assert backward_flops(10, 100, 1) == 2_020  # LoRA-like: activation gradients, few weight gradients
    flops = step_flops(
        {"A": {"rollout": 3, "eval": 5}, "B": {"score_and_loss": 2}},
        {"B": 2},
        {
            "A": {"params": 10, "trainable": 10},
            "B": {"params": 7, "trainable": 7},
        },
    )
    assert flops == {"rollout": 60, "eval": 100, "score_and_loss": 28, "backward": 56}
    assert training_flops(flops) == 60 + 28 + 56  # held-out evaluation is not training compute
    assert tokens_of_call((torch.zeros(2, 5, dtype=torch.long),), {}) == 10
    assert tokens_of_call((), {"input_ids": torch.zeros(3, 4, dtype=torch.long)}) == 12
    assert tokens_of_call((), {"inputs_embeds": torch.zeros(3, 4, 8)}) == 12


def test_counter_attributes_phases_and_sums_over_processes(tiny_config):
    from thinkrl.models.roles import build_roles

    roles = build_roles(tiny_config("model.weight_groups=[A,B,A]", "model.freeze=[reasoner]"))
    assert non_embedding_params(roles.models["A"]) == (N_TINY, N_TINY)
    assert non_embedding_params(roles.models["B"]) == (N_TINY, 0)
    counter = ComputeCounter(roles.models, roles.role_group)
    assert counter.group_roles == {"A": ["base", "interpreter"], "B": ["reasoner"]}
    ids = torch.ones(2, 3, dtype=torch.long)
    with counter.in_phase("score_and_loss"):
        roles.models["A"](input_ids=ids)  # under grad, trainable: 6 forward + 6 backward tokens
        roles.models["B"](input_ids=ids)  # frozen: forward only
        with torch.no_grad(), counter.in_phase("eval"):
            roles.models["A"](input_ids=ids)
    totals: dict = {}
    # A second process that did the same work: tokens and FLOPs are summed, not averaged.
    metrics = counter.flush(totals, reduce=lambda v: 2 * v)
    assert metrics["compute/tokens/A/score_and_loss"] == 12 and metrics["compute/tokens/A/eval"] == 12
    assert metrics["compute/tokens/B/score_and_loss"] == 12 and metrics["compute/tokens/A/backward"] == 12
    assert "compute/tokens/B/backward" not in metrics
    assert metrics["compute/flops"] == 2 * N_TINY * 24 + 4 * N_TINY * 12
    assert metrics["compute/flops/eval"] == 2 * N_TINY * 12
    assert totals["flops_total"] == metrics["compute/flops_total"] == metrics["compute/flops"]
    assert counter.flush(totals)["compute/flops"] == 0.0 and totals["tokens"]["A"]["eval"] == 12
    counter.remove()


@pytest.mark.parametrize("groups, freeze", [("[A,A,A]", "[]"), ("[A,B,A]", "[reasoner]")])
def test_one_thought_step_costs_the_hand_count(tiny_config, groups, freeze):
    cfg = tiny_config(
        f"model.weight_groups={groups}", f"model.freeze={freeze}", "rollout.length_mode=fixed", "trainer.num_threads=1"
    )
    trainer = Trainer(cfg)
    metrics, *_ = trainer.step()
    # rollout (HF actor): prefill context + <sot> once per position, then M - 1 decode steps of the N·K rows (the
    # last token's logits come from the step before; the end marker is appended, not sampled)
    rollout = POS * (CTX + 1) + (M - 1) * POS * K
    # scoring: the interpreter window's first WIN - 1 tokens once per position, then per position K thoughts + the
    # null thought + (base shares the interpreter's model) the base row, each [last window token, <sot> z <eot>,
    # y_0], right-padded to the longest: 1 + (M + 2) + (N_AHEAD - 1)
    scoring = POS * (WIN - 1) + POS * (K + 2) * (1 + M + 2 + N_AHEAD - 1)
    # policy log-probs: the reasoner's context minus its last token once, then [last token, <sot>, z_1..z_M] per row
    policy = POS * (CTX - 1) + POS * K * (M + 2)
    if groups == "[A,A,A]":
        assert metrics["compute/tokens/A/rollout"] == rollout == 112
        assert metrics["compute/tokens/A/score_and_loss"] == scoring + policy == 352
        assert metrics["compute/tokens/A/backward"] == scoring + policy
        expected = 2 * N_TINY * (rollout + scoring + policy) + 4 * N_TINY * (scoring + policy)
    else:  # the reasoner B samples and scores its policy, frozen: no backward
        assert metrics["compute/tokens/B/rollout"] == rollout
        assert metrics["compute/tokens/B/score_and_loss"] == policy
        assert metrics["compute/tokens/A/score_and_loss"] == scoring == metrics["compute/tokens/A/backward"]
        assert "compute/tokens/B/backward" not in metrics
        expected = 2 * N_TINY * (rollout + policy) + 6 * N_TINY * scoring
    assert metrics["compute/flops"] == expected
    assert metrics["compute/flops_total"] == expected == trainer.state.compute["flops_total"]
    trainer.compute.remove()


def test_lm_baseline_scores_the_base_without_thoughts(tiny_config):
    """learner.objective=lm: K = 0, no sampling; its target log-probs are the base's no-thought scores of the thought
    run's learner; one step costs 6·N per token: the window's first WIN - 1 tokens, then [last window token, y_0]."""
    cfg = tiny_config("learner.objective=lm", "rollout.num_thoughts=8", "trainer.num_threads=1")
    assert cfg.rollout.num_thoughts == 0 and cfg.learner.policy_weight > 0  # derived; the policy is never built
    trainer = Trainer(cfg)
    positions, scoring, sample = trainer._next_batch()
    windows = [trainer.scorer.window_of(p.context_ids) for p in positions]
    logp, mask = position_target_logps(
        trainer.roles.model("base"),
        windows,
        [p.target_ids for p in positions],
        trainer.scorer.pad_id,
        [trainer.roles.sot_id, trainer.roles.eot_id],
    )
    reference = compute_loss(cfg, scoring, sample(0)).scores.logp_base
    torch.testing.assert_close(logp, reference, atol=1e-5, rtol=1e-5)
    assert mask.all()
    trainer.compute.flush({})  # forget the forwards above
    metrics, _, thoughts, _ = trainer.step()
    assert thoughts is None and set(k for k in metrics if k.startswith("train/")) >= {"train/loss", "train/base_nll"}
    tokens = POS * (WIN - 1 + N_AHEAD)
    assert metrics["compute/tokens/A/score_and_loss"] == tokens == metrics["compute/tokens/A/backward"]
    assert "compute/tokens/A/rollout" not in metrics
    assert metrics["compute/flops"] == 6 * N_TINY * POS * (WIN - 1 + N_AHEAD)
    trainer.compute.remove()


def test_max_flops_stops_at_the_step_that_reaches_it_and_resume_continues_the_total(tiny_config, tmp_path):
    lm_step = 6 * N_TINY * POS * (WIN - 1 + N_AHEAD)
    warmup = 6 * N_TINY * POS * (CTX + N_AHEAD)  # one LM warm-up step on the 4 items' full text, also training
    common = ["learner.objective=lm", "trainer.lm_warmup_steps=1", "trainer.num_threads=1", "trainer.save_every=1"]
    budget = warmup + 2.5 * lm_step  # reached by the third step
    run = tmp_path / "run"
    # stopped by max_steps first, then resumed with room: it continues the saved total
    Trainer(tiny_config(*common, "trainer.max_steps=2", f"trainer.max_flops={budget}")).train()
    first = json.loads((run / "summary.json").read_text())
    assert first["stopped_by"] == "max_steps" and first["compute"]["flops_total"] == warmup + 2 * lm_step
    trainer = Trainer(tiny_config(*common, "trainer.max_steps=100", f"trainer.max_flops={budget}"))
    trainer.train()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stopped_by"] == "max_flops"
    compute = summary["compute"]
    assert compute["flops_total"] == warmup + 3 * lm_step  # evaluation FLOPs are kept apart
    assert compute["flops"]["eval"] > 0 and compute["max_flops"] == budget
    assert compute["groups"] == {
        "A": {"roles": ["base", "reasoner", "interpreter"], "params": N_TINY, "trainable": N_TINY}
    }
    assert compute["tokens"]["A"]["lm_warmup"] == POS * (CTX + N_AHEAD)
    assert compute["tokens"]["A"]["score_and_loss"] == 3 * POS * (WIN - 1 + N_AHEAD)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    totals = [r["compute/flops_total"] for r in rows if "train/loss" in r]
    assert totals == [warmup + s * lm_step for s in (1, 2, 3)]
    trainer.compute.remove()

    # compute_match reads a finished run's total; both ways at once, or an unfinished run, are refused
    assert flops_budget(0, str(run)) == warmup + 3 * lm_step
    with pytest.raises(ConfigError, match="has no summary.json"):
        flops_budget(0, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["trainer.max_flops=1e9", f"trainer.compute_match={run}"])


def test_a_compute_matched_run_saves_and_evaluates_as_often_per_flop_as_the_run_it_matches(tiny_config, tmp_path):
    assert crossed(99.0, 100.0, 50.0) and crossed(49.0, 51.0, 50.0) and not crossed(51.0, 99.0, 50.0)
    assert not crossed(0.0, 1e9, 0.0)  # no interval: never
    cadence = ["trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_checkpoints=100", "trainer.num_threads=1"]
    thought = tmp_path / "thought"
    Trainer(tiny_config(*cadence, "trainer.max_steps=4", f"trainer.output_dir={thought}")).train()
    budget = json.loads((thought / "summary.json").read_text())["compute"]["flops_total"]
    assert run_steps(thought) == 4 and run_steps(tmp_path / "nowhere") == 0
    assert matched_interval(2, budget, 4) == budget / 2  # 2 of its 4 steps' worth
    assert matched_interval(0, budget, 4) == 0.0 and matched_interval(2, budget, 0) == 0.0

    lm = tmp_path / "lm"
    trainer = Trainer(
        tiny_config(
            *cadence,
            "learner.objective=lm",
            "trainer.max_steps=1000",
            f"trainer.compute_match={thought}",
            f"trainer.output_dir={lm}",
        )
    )
    trainer.train()
    trainer.compute.remove()
    lm_step = 6 * N_TINY * POS * (WIN - 1 + N_AHEAD)
    steps = json.loads((lm / "summary.json").read_text())["steps"]
    assert steps == -(-budget // lm_step) > 4  # many cheap steps to the budget
    half = -(-budget / 2 // lm_step)  # the first step at or past half the budget
    # As many checkpoints as the thought run (2), where the budget's halves are passed, not one every 2 steps
    saved = sorted(int(p.name.split("-")[1]) for p in lm.glob("checkpoint-*"))
    assert saved == [half, steps] and len(list(thought.glob("checkpoint-*"))) == 2
    rows = [json.loads(line) for line in (lm / "metrics.jsonl").read_text().splitlines()]
    in_training = [r["step"] for r in rows if "eval/nll_base" in r and "train/loss" in r]
    assert in_training == [half]  # the last step's evaluation is the final one


def test_lm_baseline_reads_each_window_once_with_the_per_position_values(tiny_config):
    """Parallel passes on text: the baseline's one read per window gives each position's own-sequence log-probs."""
    import numpy as np

    from thinkrl.data.positions import text_pool
    from thinkrl.data.windows import WindowPool, positions_of, window_batch
    from thinkrl.models.roles import build_roles
    from thinkrl.rl.lm_baseline import window_target_logps

    roles = build_roles(tiny_config())
    model, pad = roles.model("base"), roles.tokenizer.pad_token_id
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, len(roles.tokenizer) - 2, size) for size in (18, 18, 11)]
    windows = list(WindowPool(text_pool(docs, "every_k", n_ahead=2, context_len=16, every_k=3)))
    batch = window_batch(windows, pad)
    counter = ComputeCounter(roles.models, roles.role_group)
    markers = [roles.sot_id, roles.eot_id]
    logp, mask = window_target_logps(model, batch, markers)
    assert counter.flush({})["compute/tokens/A/other"] == batch.ids.numel()  # (B, L): each window once
    positions = positions_of(windows)
    ref, ref_mask = position_target_logps(
        model, [p.context_ids for p in positions], [p.target_ids for p in positions], pad, markers
    )
    assert torch.equal(mask[batch.valid], ref_mask)
    torch.testing.assert_close(logp[batch.valid][ref_mask], ref[ref_mask], atol=1e-5, rtol=1e-5)
    counter.remove()
