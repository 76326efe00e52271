"""The trainer's held-out evaluation (``run.heldout.evaluate``) gives the same metrics whether thoughts grow in
parallel passes over whole windows or one position at a time: same seeds, same thoughts, same NLLs and rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thinkrl.config import load_config
from thinkrl.data.positions import text_pool
from thinkrl.models.roles import build_roles
from thinkrl.prompts import null_thought_ids
from thinkrl.rl.scoring import Scorer
from thinkrl.rollout.hf_actor import HFRolloutActor
from thinkrl.run.heldout import EVAL_KEYS, evaluate

BASE = [
    "model.default.scratch.hidden_size=32",
    "model.default.scratch.num_layers=2",
    "model.default.scratch.num_heads=2",
    "model.default.scratch.intermediate_size=64",
    "model.weight_groups=[A,B,A]",
    "head.form=gate",
    "data.source=text",
    "data.positions=every_k",
    "data.every_k=3",
    "data.context_len=16",
    "data.n_ahead=2",
    "data.eval_positions=64",
    "rollout.num_thoughts=3",
    "rollout.max_thought_len=4",
    "trainer.batch_positions=8",
    "trainer.report_to=none",
]


@pytest.mark.parametrize("null_thought", ["", "null/default"], ids=["empty-null", "null-phrase"])
def test_held_out_metrics_in_parallel_passes_equal_per_position(null_thought, tmp_path):
    text = tmp_path / "unused.txt"  # the recipe needs a file; the pool below is built from token ids directly
    text.write_text("a b c\n")
    results = {}
    for passes in ("parallel", "per_position"):
        null = [f"rollout.null_thought={null_thought}"] if null_thought else []
        overrides = [*BASE, f"data.train_file={text}", f"rollout.thought_passes={passes}", *null]
        cfg = load_config(None, overrides)
        torch.manual_seed(0)
        roles = build_roles(cfg)
        rng = np.random.default_rng(0)
        docs = [rng.integers(3, len(roles.tokenizer) - 2, size) for size in (18, 18, 11)]
        pool = text_pool(docs, "every_k", n_ahead=2, context_len=16, every_k=3)
        pad = roles.tokenizer.pad_token_id
        actor = HFRolloutActor(cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, pad)
        null_ids = null_thought_ids(cfg.rollout.null_thought, roles.tokenizer)
        assert bool(null_ids) == bool(null_thought)
        scorer = Scorer(roles, null_ids, cfg.data.interpreter_window, cfg.reward.source)
        results[passes] = evaluate(cfg, roles, actor, scorer, pool, seed=7)
    par, pos = results["parallel"], results["per_position"]
    assert par["positions"] == pos["positions"] == len(pool) > 8  # more than one batch
    for key in EVAL_KEYS:
        assert np.isfinite(pos[key]), key
        assert par[key] == pytest.approx(pos[key], abs=1e-5), key
    assert 0 < pos["null_rate"] < 1 and pos["thought_len_mean"] > 0  # the comparison is not between constants
