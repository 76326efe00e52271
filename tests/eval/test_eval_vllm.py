"""The vLLM backend of ``thinkrl eval`` against the HF backend (real engine, CPU build): the same items, the same
greedy answers and scores, and thoughts whose sampler log-probs equal the HF reasoner's for the same tokens."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import GSM8K_ROWS, TINY_BYTE, write_eval_data
from learner_logps import hf_logps

from thinkrl.cli import main
from thinkrl.eval.answers import numbers_equal

pytest.importorskip("vllm")

CONFIG = "configs/default.yaml"


def _hf_thought_logps(records, overrides):
    """log pi(z | context) of each record's sampled thoughts under the HF reasoner (the learner's computation),
    for the contexts the evaluator gave the sampler: the items' contexts inside the reasoner template."""
    from thinkrl.eval.setup import load_setup
    from thinkrl.eval.tasks import load_items
    from thinkrl.prompts import reasoner_prompt, wrap_contexts
    from thinkrl.rollout.base import ThoughtBatch

    setup = load_setup(None, CONFIG, overrides)
    cfg, roles = setup.cfg, setup.roles
    items = {it.id: it for it in load_items("gsm8k", cfg, roles.tokenizer, 0, 0)}
    prompt = reasoner_prompt(cfg.rollout.reasoner_template, roles.tokenizer)
    contexts = wrap_contexts(prompt, [items[r["id"]].context for r in records])
    k, m = len(records[0]["thoughts"]), cfg.rollout.max_thought_len + 1
    ids = torch.full((len(records), k, m), roles.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(records), k, m, dtype=torch.bool)
    for i, rec in enumerate(records):
        for j, t in enumerate(rec["thoughts"]):
            actions = t["ids"] + ([roles.eot_id] if t["finished"] else [])
            ids[i, j, : len(actions)] = torch.tensor(actions)
            mask[i, j, : len(actions)] = True
    lengths = torch.tensor([[t["length"] for t in r["thoughts"]] for r in records])
    finished = torch.tensor([[t["finished"] for t in r["thoughts"]] for r in records])
    batch = ThoughtBatch(ids, mask, torch.zeros(ids.shape), finished, lengths)
    logps = hf_logps(cfg, roles, batch, contexts)
    return logps.sum(-1)


@pytest.mark.slow
def test_vllm_eval_matches_hf(tmp_path):
    data = write_eval_data(tmp_path)
    overrides = [*TINY_BYTE, f"data.data_dir={data}", "model.default.scratch.max_position_embeddings=512"]
    records = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        args = ["eval", "--config", CONFIG, "--task", "gsm8k", "--thoughts", "none,null,sampled:2"]
        args += ["--backend", backend, "--max-new-tokens", "6", "--output", str(out), *overrides]
        assert main(args) == 0
        records[backend] = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    hf, vl = records["hf"], records["vllm"]
    assert len(hf) == len(vl) == len(GSM8K_ROWS)
    assert [r["id"] for r in vl] == [r["id"] for r in hf]
    for a, b in zip(hf, vl):
        for mode in ("none", "null"):  # greedy answers: the engine serves the same weights
            assert b[mode]["generation"], f"item {b['id']}: empty {mode} generation from vLLM"
            assert b[mode]["generation"] == a[mode]["generation"]
            assert b[mode]["answer_logp"] == pytest.approx(a[mode]["answer_logp"], abs=1e-4)
        assert len(b["thoughts"]) == 2 and all(1 <= t["length"] + t["finished"] <= 5 for t in b["thoughts"])
        for rec in (a, b):  # maj@K: the most common extracted answer, ties to the earlier thought, None skipped
            preds = [p for p in rec["sampled"]["pred"] if p is not None]
            vote = max(preds, key=lambda p: (preds.count(p), -preds.index(p))) if preds else None
            assert rec["sampled"]["maj_pred"] == vote
            assert rec["sampled"]["maj_correct"] == numbers_equal(vote, rec["gold"])
    # the engine's own log-probs of what it sampled, against the HF reasoner's for the same tokens
    sampler = torch.tensor([[t["sampler_logp"] for t in r["thoughts"]] for r in vl])
    reference = _hf_thought_logps(vl, overrides)
    assert bool((sampler < 0).all())
    assert float((sampler - reference).abs().max()) < 5e-4  # 1e-4 per action (the actor test's bound), 5 actions
