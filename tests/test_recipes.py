"""The shipped CPU recipes run end to end at a few steps (GPU recipes only load: see test_config)."""

import json
from pathlib import Path

import pytest

from thinkrl.config import DataConfig, load_config
from thinkrl.run.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "trainer.max_steps=2",
    "trainer.lm_warmup_steps=2",
    "data.eval_positions=4",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "data.max_docs=50",
]


@pytest.mark.slow
def test_quiet_star_tiny_recipe_runs(tmp_path):
    data_dir = DataConfig().resolved_data_dir()
    if data_dir is None or not (data_dir / "tinyshakespeare/input.txt").is_file():
        pytest.skip("needs ../shared/data/tinyshakespeare")
    cfg = load_config(ROOT / "configs/quiet_star/tiny_shakespeare.yaml", [*SHORT, f"trainer.output_dir={tmp_path}"])
    assert cfg.rollout.length_mode == "fixed" and cfg.rollout.num_thoughts == 2 and cfg.learner.positive_only
    trainer = Trainer(cfg)
    result = trainer.train()
    assert trainer.state.step == 2
    assert result["final_eval"]["thought_len_mean"] == cfg.rollout.max_thought_len  # fixed-length thoughts
    assert result["final_eval"]["unfinished_rate"] == 0.0
    # Quiet-STaR's loss does not need the null thought (rl.null_row): training does not score it, so no
    # reward against it is logged there; the held-out evaluation still reports it
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/loss" in r and "train/thought_len" in r]
    assert len(trained) == 2 and all("train/copy_rate" in r for r in trained)
    assert not any(key in r for r in trained for key in ("train/reward", "train/null_rate", "train/reward_copy_share"))
    assert {"reward_mean", "null_rate", "nll_null"} <= result["final_eval"].keys()
    dumped = json.loads((tmp_path / "rollouts" / "step-000002.jsonl").read_text().splitlines()[0])
    assert "nll_null" not in dumped and {"advantage", "copies_first"} <= dumped["thoughts"][0].keys()
    assert "reward" not in dumped["thoughts"][0]


def test_fused_passes_train_as_the_two_phases(tmp_path):
    """rollout.fused_passes=true samples inside the learning passes: on the Quiet-STaR recipe (shrunk) every logged
    training figure equals the two-phase run's, and the step reads each window once under grad (no no-grad read)."""
    data_dir = DataConfig().resolved_data_dir()
    if data_dir is None or not (data_dir / "tinyshakespeare/input.txt").is_file():
        pytest.skip("needs ../shared/data/tinyshakespeare")
    small = ["model.default.scratch.hidden_size=32", "model.default.scratch.num_layers=1", "data.context_len=32"]
    small += ["trainer.batch_positions=60", "trainer.lm_warmup_steps=0", "head.form=gate"]
    rows = {}
    for fused in ("false", "true"):
        out = tmp_path / f"fused-{fused}"
        cfg = load_config(
            ROOT / "configs/quiet_star/tiny_shakespeare.yaml",
            [*SHORT, *small, f"rollout.fused_passes={fused}", f"trainer.output_dir={out}"],
        )
        Trainer(cfg).train()
        rows[fused] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows[fused] = [r for r in rows[fused] if "train/loss" in r]
    assert len(rows["true"]) == len(rows["false"]) == 2
    for a, b in zip(rows["false"], rows["true"]):
        for key in ("train/loss", "train/policy_loss", "train/grad_norm", "train/thought_len", "train/copy_rate"):
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), key
        # the two-phase step reads the window once without grad (sampling) and once with it; fused, once
        forward = {
            k: r.get("compute/tokens/A/rollout", 0) + r.get("compute/tokens/A/score_and_loss", 0)
            for k, r in (("a", a), ("b", b))
        }
        assert forward["b"] < forward["a"] and b["compute/tokens/A/backward"] == a["compute/tokens/A/backward"]
