"""Parallel thought passes equal the per-position path: thoughts, sampler log-probs, rewards, loss terms, gradients;
the null thought's row is left out where the loss does not need it, changing none of them.

Each case samples K thoughts at the positions of a few text windows twice — per position (each its own sequence)
and in parallel passes (window read once) — with the same seeds, then computes the loss both ways and compares
everything the learner sees, down to the gradient of every trainable parameter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stock_models import stock_model

import thinkrl.models.parallel_attention as pa
import thinkrl.rl.window_scoring as window_scoring
from thinkrl.config import load_config
from thinkrl.data.positions import text_pool
from thinkrl.data.windows import WindowPool, positions_of, window_batch
from thinkrl.errors import ConfigError
from thinkrl.models.parallel_passes import read_window, run_passes
from thinkrl.models.roles import build_roles
from thinkrl.rl.core_algos import compute_advantages, shape_rewards
from thinkrl.rl.learner import PositionScoring, compute_loss
from thinkrl.rl.null_row import needs_null_row, reference_cancels
from thinkrl.rl.scoring import Scorer
from thinkrl.rl.window_scoring import WindowScoring
from thinkrl.rollout.hf_actor import HFRolloutActor

TOL = 1e-5
BASE = [
    "model.default.scratch.hidden_size=32",
    "model.default.scratch.num_layers=2",
    "model.default.scratch.num_heads=2",
    "model.default.scratch.intermediate_size=64",
    "data.n_ahead=2",
    "rollout.max_thought_len=4",
    "learner.base_weight=0.5",
    "learner.entropy_coef=0.1",
    "trainer.report_to=none",
]


def _windows(every_k: int, vocab: int, seed: int = 0):
    """Three windows of random tokens (one short) with thought positions every k tokens."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, vocab - 2, size) for size in (18, 18, 11)]
    pool = text_pool(docs, "every_k", n_ahead=2, context_len=16, every_k=every_k)
    return [w for w in WindowPool(pool)]


def _both_paths(overrides: list[str], every_k: int = 1, k: int = 2, device: str = "cpu", null: int = 0):
    """(per-position, parallel) results: (thoughts, loss output, grads) each; ``null`` > 0: a null phrase of that
    many tokens instead of the empty null thought."""
    cfg = load_config(None, [*BASE, f"rollout.num_thoughts={k}", *overrides])
    torch.manual_seed(0)
    roles = build_roles(cfg)
    for module in roles.modules().values():
        module.to(device)
    pad = roles.tokenizer.pad_token_id
    windows = _windows(every_k, len(roles.tokenizer))
    positions = positions_of(windows)
    contexts, targets = [p.context_ids for p in positions], [p.target_ids for p in positions]
    seeds = list(range(1000, 1000 + len(positions)))
    batch = window_batch(windows, pad, device)
    actor = HFRolloutActor(cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, pad)
    null_ids = list(range(5, 5 + null))  # ordinary tokens between the markers, as a rollout.null_thought phrase
    scorer = Scorer(roles, null_ids, cfg.data.interpreter_window, cfg.reward.source)
    params = [p for m in roles.modules().values() for p in m.parameters() if p.requires_grad]
    results = []
    for parallel in (False, True):
        thoughts = actor.sample_windows(batch, k, seeds) if parallel else actor.sample(contexts, k, seeds)
        scoring = (
            WindowScoring(cfg, roles, scorer, batch) if parallel else PositionScoring(roles, scorer, contexts, targets)
        )
        for p in params:
            p.grad = None
        out = compute_loss(cfg, scoring, thoughts)
        out.loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        results.append((thoughts, out, grads))
    return results


def _assert_equal(ref, par):
    (t0, o0, g0), (t1, o1, g1) = ref, par
    assert torch.equal(t0.thought_ids, t1.thought_ids) and torch.equal(t0.thought_mask, t1.thought_mask)
    assert torch.equal(t0.lengths, t1.lengths) and torch.equal(t0.finished, t1.finished)
    torch.testing.assert_close(t1.sampler_logps, t0.sampler_logps, atol=TOL, rtol=0)
    for name in ("logp", "logp_reward", "logp_base", "weight"):
        torch.testing.assert_close(getattr(o1.scores, name), getattr(o0.scores, name), atol=TOL, rtol=0)
    assert o0.scores.has_null == o1.scores.has_null and (o0.rewards is None) == (o1.rewards is None)
    if o0.rewards is not None:
        torch.testing.assert_close(o1.rewards, o0.rewards, atol=TOL, rtol=0)
    torch.testing.assert_close(o1.advantages, o0.advantages, atol=TOL, rtol=0)
    assert o0.stats.keys() == o1.stats.keys()
    for key in o0.stats:
        assert o1.stats[key] == pytest.approx(o0.stats[key], abs=TOL), key
    torch.testing.assert_close(o1.loss, o0.loss, atol=TOL, rtol=0)
    for a, b in zip(g0, g1):
        scale = max(1.0, float(a.abs().max()))
        torch.testing.assert_close(b / scale, a / scale, atol=TOL, rtol=0)
    assert any(float(g.abs().max()) > 0 for g in g0)


CASES = [
    # (overrides, every_k, K)
    ([], 1, 2),
    (["rollout.length_mode=fixed"], 1, 2),
    ([], 4, 4),
    (["learner.include_null=true"], 1, 1),
    (["learner.include_null=true", "rollout.length_mode=fixed"], 4, 2),
    (["head.form=gate"], 1, 2),
    (["head.form=concat"], 1, 4),
    (["head.form=none"], 4, 2),
    (["model.weight_groups=[A,B,A]"], 1, 2),
    (["model.weight_groups=[A,B,A]", "head.form=gate", "rollout.length_mode=fixed"], 4, 4),
    (["data.interpreter_window=8"], 1, 2),
    (["data.interpreter_window=8", "model.weight_groups=[A,B,A]", "learner.include_null=true"], 4, 1),
    (["model.weight_groups=[A,B,C]", "head.form=gate", "reward.source=interpreter"], 1, 2),
]


@pytest.mark.parametrize(
    "overrides,every_k,k", CASES, ids=[f"{' '.join(c[0]) or 'default'}-k{c[1]}-K{c[2]}" for c in CASES]
)
def test_parallel_passes_equal_per_position(overrides, every_k, k):
    ref, par = _both_paths(overrides, every_k, k)
    _assert_equal(ref, par)


def test_parallel_passes_equal_per_position_with_a_null_phrase():
    """A null thought that is a phrase (``rollout.null_thought``), not the empty <sot><eot>: its tokens sit in the
    parallel passes' null slot, and rewards, the loss and gradients still equal the per-position path's."""
    overrides = ["model.weight_groups=[A,B,A]", "head.form=gate", "learner.include_null=true"]
    ref, par = _both_paths([*overrides, "reward.source=interpreter"], 4, 2, null=3)
    _assert_equal(ref, par)
    empty, _ = _both_paths([*overrides, "reward.source=interpreter"], 4, 2)
    # the interpreter's prediction after the null thought (reward.source=interpreter) depends on the phrase
    assert not torch.allclose(ref[1].scores.logp_null, empty[1].scores.logp_null), "the phrase was not read"


def test_copy_penalty_is_the_same_on_both_paths():
    """reward.copy_penalty reads the targets off the Scores both paths return: the same thoughts lose the penalty
    (learner.baseline=none: the advantages are the shaped rewards), and the paths still agree."""
    from thinkrl.rl.copy_gauge import copy_flags

    ref, par = _both_paths(["reward.copy_penalty=0.5", "learner.baseline=none"], 1, 2)
    _assert_equal(ref, par)
    for thoughts, out, _ in (ref, par):
        copies = copy_flags(thoughts.thought_ids, thoughts.lengths, out.scores.target_ids, out.scores.target_mask)[0]
        assert 0 < int(copies.sum()) < copies.numel()  # some thoughts hold y_1 by chance, not all
        torch.testing.assert_close(out.advantages, out.rewards - 0.5 * copies, atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_parallel_passes_equal_per_position_on_cuda():
    """The same equivalence on a CUDA device in fp32 (skipped without one)."""
    for overrides, every_k, k in (CASES[0], CASES[9]):
        ref, par = _both_paths(overrides, every_k, k, device="cuda")
        _assert_equal(ref, par)


def test_second_update_on_the_same_rollouts_reads_the_new_weights():
    """learner.updates_per_rollout > 1: a second loss on the same WindowScoring recomputes its forwards with the
    updated weights (nothing cached from the first loss, whose graph backward has freed)."""
    cfg = load_config(None, [*BASE, "rollout.num_thoughts=2"])
    torch.manual_seed(0)
    roles = build_roles(cfg)
    pad = roles.tokenizer.pad_token_id
    batch = window_batch(_windows(1, len(roles.tokenizer)), pad)
    actor = HFRolloutActor(cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, pad)
    scorer = Scorer(roles, [], 0, cfg.reward.source)
    thoughts = actor.sample_windows(batch, 2, list(range(batch.num_positions)))
    scoring = WindowScoring(cfg, roles, scorer, batch)
    optimizer = torch.optim.SGD([p for m in roles.modules().values() for p in m.parameters()], lr=0.1)
    compute_loss(cfg, scoring, thoughts).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    second = compute_loss(cfg, scoring, thoughts)
    second.loss.backward()
    fresh = compute_loss(cfg, WindowScoring(cfg, roles, scorer, batch), thoughts)
    assert float(second.loss) == pytest.approx(float(fresh.loss), abs=1e-6)


def test_lora_and_frozen_roles_match():
    ref, par = _both_paths(["model.default.lora.r=4", "model.weight_groups=[A,B,C]", "model.freeze=[base]"], 1, 2)
    _assert_equal(ref, par)


def test_a_thought_that_sees_another_positions_thought_is_caught(monkeypatch):
    """Let each slot's diagonal read the next slot's thought keys: the equality checks above must fail."""
    original = pa.diagonal

    def leaky(q, keys, values, scaling):  # entries (B, Hkv, R, P, S_i, D): roll the slot axis
        return original(q, [k.roll(1, dims=3) for k in keys], [v.roll(1, dims=3) for v in values], scaling)

    monkeypatch.setattr(pa, "diagonal", leaky)
    ref, par = _both_paths([], 1, 2)
    with pytest.raises(AssertionError):
        _assert_equal(ref, par)


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "qwen2", "mistral"])
def test_stock_models_one_pass_at_a_time_and_all_at_once(arch):
    """The attention hook in stock transformers models: passes (all tokens at once, or one per pass with history)
    equal an uncached forward of window[:t] ⊕ tokens for every row and slot."""
    model = stock_model(arch)
    ids = torch.randint(0, 40, (2, 12))
    slot_len = torch.tensor([[2, 5, 9, 12], [3, 4, 7, 11]])
    tokens = torch.randint(0, 40, (2, 3, 4, 3))
    with torch.no_grad():
        window = read_window(model, ids)
        together, _ = run_passes(model, window, tokens, slot_len)
        history: dict = {}
        stepwise = torch.cat(
            [run_passes(model, window, tokens[..., s : s + 1], slot_len, s, history)[0] for s in range(3)], dim=-2
        )
        for b in range(2):
            for r in range(3):
                for p in range(4):
                    t = int(slot_len[b, p])
                    seq = torch.cat([ids[b, :t], tokens[b, r, p]])[None]
                    ref = model(seq, output_hidden_states=True).hidden_states[-1][0, t:]
                    torch.testing.assert_close(together[b, r, p], ref, atol=TOL, rtol=0)
                    torch.testing.assert_close(stepwise[b, r, p], ref, atol=TOL, rtol=0)


def test_unsupported_architecture_names_the_switch():
    class Fake:
        class config:
            @staticmethod
            def get_text_config():
                return type("C", (), {"model_type": "bloom"})()

    with pytest.raises(ConfigError, match="rollout.thought_passes=per_position"):
        pa.check_supported(Fake())


def test_switch_defaults_and_errors():
    text = ["data.source=text", "data.train_file=x.txt", "model.tokenizer=byte", "data.positions=every_k"]
    assert load_config(None, text).parallel_passes()
    assert not load_config(None, [*text, "rollout.thought_passes=per_position"]).parallel_passes()
    assert not load_config(None, [*text, "rollout.reasoner_template=thinking/system"]).parallel_passes()
    assert not load_config(None, []).parallel_passes()  # task positions keep the per-position path
    with pytest.raises(ConfigError, match="task positions"):
        load_config(None, ["rollout.thought_passes=parallel"])
    with pytest.raises(ConfigError, match="reasoner_template"):
        load_config(None, [*text, "rollout.thought_passes=parallel", "rollout.reasoner_template=thinking/system"])


# ---- the null thought's row is scored only when the loss needs it (rl.null_row) -------------------------
# Where it is left out (Quiet-STaR's setting: group-mean advantages, no clip, the interpreter not learning from the
# null thought), the loss, advantages and every gradient equal those of the run that scores it, on both paths, and
# the parallel path runs one set of passes fewer.
QUIET_STAR = ["learner.baseline=mean", "learner.positive_only=true", "learner.interpreter_null=false"]


@pytest.mark.parametrize(
    "overrides,needed",
    [
        ([], True),  # the interpreter learns from the null thought (interpreter_null, the default)
        (QUIET_STAR, False),
        ([*QUIET_STAR, "learner.interpreter_weight=0"], False),
        ([*QUIET_STAR, "reward.clip=1"], True),  # the clip reads the rewards' level
        ([*QUIET_STAR, "learner.include_null=true"], True),  # the null thought's reward 0 joins the group
        ([*QUIET_STAR, "learner.baseline=none"], True),
        ([*QUIET_STAR, "learner.interpreter_only_helpful=true"], True),  # reads rewards > 0 against the null
        ([*QUIET_STAR, "learner.interpreter_only_helpful=true", "reward.baseline=no_thought"], False),
        ([*QUIET_STAR, "learner.interpreter_only_helpful=true", "learner.interpreter_weight=0"], False),
        ([*QUIET_STAR, "reward.baseline=no_thought", "reward.clip=1"], False),  # the reference is the base's
        ([*QUIET_STAR, "learner.normalize=std", "reward.length_penalty=0.1"], False),  # shift-invariant shaping
        ([*QUIET_STAR, "learner.score_null=always"], True),
    ],
)
def test_needs_null_row(overrides, needed):
    cfg = load_config(None, ["rollout.num_thoughts=2", *overrides])
    assert needs_null_row(cfg, 2) is needed
    assert needs_null_row(cfg, 0)  # a control run scores only the null thought


def test_reference_cancels_means_shift_invariant_advantages():
    """The predicate's claim, checked on the advantages themselves: a per-position shift of every reward changes
    none of them exactly when ``reference_cancels`` says so."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    shift = torch.randn(6, 1, generator=gen, dtype=torch.float64) * 3
    lengths, finished = torch.randint(1, 5, (6, 3), generator=gen), torch.rand(6, 3, generator=gen) > 0.3
    for baseline in ("leave_one_out", "mean", "none"):
        for include_null in (False, True):
            for clip in (0.0, 0.5):
                for normalize, positive_only in (("none", False), ("std", True)):

                    def adv(r, b=baseline, i=include_null, c=clip, n=normalize, p=positive_only):
                        return compute_advantages(shape_rewards(r, lengths, finished, 0.1, 0.2, c), b, i, p, n)

                    same = torch.allclose(adv(rewards), adv(rewards + shift), atol=1e-9)
                    assert same == reference_cancels(baseline, include_null, clip), (baseline, include_null, clip)


# the gate head: the mlp head starts at weight 0 (the base's prediction), where every reward would be 0
@pytest.mark.parametrize(
    "overrides", [[*QUIET_STAR, "head.form=gate"], [*QUIET_STAR, "data.interpreter_window=8", "head.form=none"]]
)
def test_without_the_null_row_the_loss_and_gradients_are_unchanged(overrides):
    """Per-position and parallel paths, with and without the null row: the same thoughts, advantages, loss terms
    and gradients; the rows scored without it are the K thoughts' own."""
    auto = _both_paths(overrides, 1, 2)
    always = _both_paths([*overrides, "learner.score_null=always"], 1, 2)
    _assert_equal(*auto)
    for (t0, o0, g0), (t1, o1, g1) in zip(always, auto):
        assert torch.equal(t0.thought_ids, t1.thought_ids)
        assert o0.scores.has_null and not o1.scores.has_null
        assert o1.rewards is None and o1.null_rewards is None and o0.rewards is not None
        assert o1.scores.logp.shape[1] == o0.scores.logp.shape[1] - 1 == 2
        torch.testing.assert_close(o1.scores.logp, o0.scores.logp[:, :2], atol=TOL, rtol=0)
        torch.testing.assert_close(o1.advantages, o0.advantages, atol=TOL, rtol=0)
        assert float(o1.advantages.abs().max()) > 0  # not a comparison of zeros
        torch.testing.assert_close(o1.loss, o0.loss, atol=TOL, rtol=0)
        assert o1.stats.keys() == o0.stats.keys()
        for a, b in zip(g0, g1):
            scale = max(1.0, float(a.abs().max()))
            torch.testing.assert_close(b / scale, a / scale, atol=TOL, rtol=0)


def test_the_parallel_path_skips_the_null_passes(monkeypatch):
    """One set of passes fewer: the thought rows only, counted on the real ``run_passes``."""
    calls = []
    real = window_scoring.run_passes

    def counted(model, read, slots, slot_len):
        calls.append(slots.shape[1])  # rows in this set of passes
        return real(model, read, slots, slot_len)

    monkeypatch.setattr(window_scoring, "run_passes", counted)
    counts = {}
    for name, extra in (("auto", []), ("always", ["learner.score_null=always"])):
        calls.clear()
        _both_paths([*QUIET_STAR, "learner.policy_weight=0", "learner.entropy_coef=0", *extra], 1, 2)
        counts[name] = list(calls)
    assert counts == {"auto": [2], "always": [2, 1]}  # K=2 thought rows; the null thought's single row


# ---- sampling inside the learning passes (WindowScoring.sample_in_passes) ----------------------------------------
def _two_phase_and_fused(overrides: list[str], every_k: int = 1, k: int = 2):
    """(two-phase, fused) results: the HF sampler's no-grad passes then teacher-forced scoring, against sampling in
    the passes that learn; (thoughts, loss output, grads) each."""
    cfg = load_config(None, [*BASE, f"rollout.num_thoughts={k}", *overrides])
    torch.manual_seed(0)
    roles = build_roles(cfg)
    pad = roles.tokenizer.pad_token_id
    windows = _windows(every_k, len(roles.tokenizer))
    seeds = list(range(1000, 1000 + len(positions_of(windows))))
    batch = window_batch(windows, pad, "cpu")
    actor = HFRolloutActor(cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, pad)
    scorer = Scorer(roles, [], cfg.data.interpreter_window, cfg.reward.source)
    params = [p for m in roles.modules().values() for p in m.parameters() if p.requires_grad]
    results = []
    for fused in (False, True):
        scoring = WindowScoring(cfg, roles, scorer, batch)
        for p in params:
            p.grad = None
        thoughts = scoring.sample_in_passes(cfg.rollout, k, seeds) if fused else actor.sample_windows(batch, k, seeds)
        out = compute_loss(cfg, scoring, thoughts)
        out.loss.backward()
        results.append((thoughts, out, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]))
    return results


FUSED_CASES = [
    ([], 1, 2),
    (["rollout.length_mode=fixed"], 1, 2),
    (["head.form=gate", "rollout.max_thought_len=6"], 4, 4),
    ([*QUIET_STAR, "head.form=gate"], 1, 2),  # no null row
    (["data.n_ahead=1", "learner.include_null=true"], 1, 1),
    # checkpointed layers rerun each pass in the backward, after later passes appended their keys
    (["model.default.gradient_checkpointing=true", "rollout.length_mode=fixed"], 1, 2),
]


@pytest.mark.parametrize(
    "overrides,every_k,k", FUSED_CASES, ids=[f"{' '.join(c[0]) or 'default'}-k{c[1]}-K{c[2]}" for c in FUSED_CASES]
)
def test_sampling_in_the_learning_passes_equals_two_phases(overrides, every_k, k):
    two_phase, fused = _two_phase_and_fused(overrides, every_k, k)
    _assert_equal(two_phase, fused)
    thoughts = fused[0]
    # variable-length cases finish some thoughts early, so rows feed <eot> and y at different passes
    if "rollout.length_mode=fixed" not in overrides and k > 1:
        assert thoughts.lengths.min() < thoughts.lengths.max()


@pytest.mark.parametrize("which", ["sampling", "after_sampling"])
def test_a_pass_cut_from_the_graph_is_caught(monkeypatch, which):
    """The fused passes carry the gradient of the thought tokens' own states: detaching one pass breaks it, be it a
    sampling pass (one token) or the pass of the tokens after the last sample (several)."""
    real = window_scoring.run_passes

    def cut(model, read, slots, slot_len, offset=0, history=None, need_logits=False):
        hidden, logits = real(model, read, slots, slot_len, offset, history, need_logits)
        hit = offset == 1 if which == "sampling" else slots.shape[-1] > 1
        return (hidden.detach() if history is not None and hit else hidden), logits

    monkeypatch.setattr(window_scoring, "run_passes", cut)
    # fixed length: every row samples to the end, then its last sample, <eot> and y_0..y_{n-2} go in one pass; the
    # gate head (the mlp head starts at weight 0, where no gradient reaches the thought states)
    two_phase, fused = _two_phase_and_fused(["rollout.length_mode=fixed", "head.form=gate"], 1, 2)
    with pytest.raises(AssertionError):
        _assert_equal(two_phase, fused)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_the_tokens_after_the_last_sample_go_in_one_pass_unless_checkpointed(monkeypatch, checkpointed):
    """Fixed length m = 4, n = 2: four sampling passes (<sot> z_1 z_2 z_3), then z_4 <eot> y_0 in one pass of 3
    tokens; with checkpointed layers one token a pass (the recompute of a wider pass raises the peak)."""
    widths = []
    real = window_scoring.run_passes

    def counted(model, read, slots, slot_len, offset=0, history=None, need_logits=False):
        if history is not None:
            widths.append((offset, slots.shape[-1]))
        return real(model, read, slots, slot_len, offset, history, need_logits)

    monkeypatch.setattr(window_scoring, "run_passes", counted)
    overrides = ["rollout.length_mode=fixed", f"model.default.gradient_checkpointing={str(checkpointed).lower()}"]
    _assert_equal(*_two_phase_and_fused(overrides, 1, 2))
    tail = [(4, 1), (5, 1), (6, 1)] if checkpointed else [(4, 3)]
    assert widths == [(t, 1) for t in range(4)] + tail
