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
