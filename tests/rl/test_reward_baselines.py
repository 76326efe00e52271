"""``reward.baseline``: rewards against the null thought, the base with no thought, or an EMA of the interpreter
(its weights updated per step and checkpointed exactly)."""

from __future__ import annotations

import pytest
import torch

from thinkrl.config import load_config
from thinkrl.errors import ConfigError
from thinkrl.rl.learner import compute_loss
from thinkrl.run.state import find_checkpoints
from thinkrl.run.trainer import Trainer


def _one_batch(trainer: Trainer):
    positions, scoring, sample = trainer._next_batch()
    return positions, scoring, sample(trainer.cfg.rollout.num_thoughts)


def _summed(logp_thoughts, reference, mask):
    return ((logp_thoughts - reference[:, None]) * mask[:, None]).sum(-1)


@pytest.mark.parametrize("baseline", ["null", "no_thought", "ema"])
def test_rewards_are_measured_against_the_chosen_reference(tiny_config, baseline):
    trainer = Trainer(tiny_config(f"reward.baseline={baseline}"))
    positions, scoring, thoughts = _one_batch(trainer)
    logp_ema = trainer._ema_logps(positions, scoring) if baseline == "ema" else None
    out = compute_loss(trainer.cfg, scoring, thoughts, logp_ema)
    s, mask = out.scores, out.scores.target_mask.float()
    reference = {"null": s.logp_null, "no_thought": s.logp_base, "ema": logp_ema}[baseline].detach()
    assert torch.allclose(out.rewards, _summed(s.logp_thoughts.detach(), reference, mask), atol=1e-6)
    assert torch.allclose(out.null_rewards, _summed(s.logp_thoughts.detach(), s.logp_null.detach(), mask), atol=1e-6)
    if baseline == "ema":
        # Before any step the EMA copy is the shared model itself: its no-thought forward (the LM baseline's)
        # equals the Scorer's base row, two different code paths.
        assert trainer.roles.shared("base", "interpreter")
        torch.testing.assert_close(logp_ema * mask, s.logp_base.detach() * mask, atol=1e-5, rtol=0)
    else:
        assert trainer.ema is None


def test_ema_reference_of_parallel_passes_is_per_position(tmp_path):
    """Thoughts grown in parallel passes over text windows: the EMA copy reads each window once, and its (B, P, n)
    log-probs become the scores' positions (N, n). Before any step it is the shared model, so they equal the base
    row of the window scores."""
    from pathlib import Path

    from thinkrl.config import DataConfig
    from thinkrl.rl.window_scoring import WindowScoring

    data_dir = DataConfig().resolved_data_dir()
    if data_dir is None or not (data_dir / "tinyshakespeare/input.txt").is_file():
        pytest.skip("needs ../shared/data/tinyshakespeare")
    recipe = Path(__file__).resolve().parents[2] / "configs/quiet_star/tiny_shakespeare.yaml"
    tiny = ["model.default.scratch.hidden_size=32", "model.default.scratch.num_layers=1", "data.context_len=16"]
    cfg = load_config(
        recipe,
        [*tiny, "trainer.batch_positions=30", "data.max_docs=20", "data.eval_positions=15", "reward.baseline=ema"]
        + ["trainer.report_to=none", "trainer.progress=false", f"trainer.output_dir={tmp_path}"],
    )
    trainer = Trainer(cfg)
    positions, scoring, thoughts = _one_batch(trainer)
    assert isinstance(scoring, WindowScoring) and not trainer.scorer.window
    logp_ema = trainer._ema_logps(positions, scoring)
    s = compute_loss(trainer.cfg, scoring, thoughts, logp_ema).scores
    assert logp_ema.shape == s.logp_base.shape == (len(positions), cfg.data.n_ahead)
    mask = s.target_mask
    torch.testing.assert_close(logp_ema * mask, s.logp_base.detach() * mask, atol=1e-5, rtol=0)


def test_ema_moves_by_its_decay_after_each_step(tiny_config):
    trainer = Trainer(tiny_config("reward.baseline=ema", "reward.ema_decay=0.75", "learner.lr=1e-2"))
    model = trainer.roles.model("interpreter")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.step()
    ema = dict(trainer.ema.model.named_parameters())
    moved = 0
    for name, param in model.named_parameters():
        want = 0.75 * start[name] + 0.25 * param.detach()
        torch.testing.assert_close(ema[name], want, atol=1e-7, rtol=1e-6)
        moved += int(not torch.equal(ema[name], start[name]))
    assert moved > 0 and not any(p.requires_grad for p in trainer.ema.model.parameters())


def test_ema_weights_resume_exactly(tiny_config, tmp_path):
    common = ["reward.baseline=ema", "reward.ema_decay=0.5", "learner.lr=3e-3", "trainer.save_every=2"]
    straight = Trainer(tiny_config(*common, "trainer.max_steps=3", f"trainer.output_dir={tmp_path / 'a'}"))
    straight.train()
    Trainer(tiny_config(*common, "trainer.max_steps=2", f"trainer.output_dir={tmp_path / 'b'}")).train()
    assert [p.name for p in find_checkpoints(tmp_path / "b")] == ["checkpoint-2"]
    resumed = Trainer(tiny_config(*common, "trainer.max_steps=3", f"trainer.output_dir={tmp_path / 'b'}"))
    resumed.train()
    assert resumed.state.step == 3
    got, want = resumed.ema.state_dict()["weights"], straight.ema.state_dict()["weights"]
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_an_unknown_reward_baseline_is_refused():
    with pytest.raises(ConfigError, match="reward.baseline"):
        load_config(None, ["reward.baseline=average"])
