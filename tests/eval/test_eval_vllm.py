"""The vLLM backend of ``thinkrl eval`` gives the HF backend's greedy answers and scores (real engine, CPU build)."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import TINY_BYTE, write_eval_data

from thinkrl.cli import main

pytest.importorskip("vllm")


@pytest.mark.slow
def test_vllm_eval_matches_hf(tmp_path):
    data = write_eval_data(tmp_path)
    records = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        args = ["eval", "--config", "configs/default.yaml", "--task", "gsm8k", "--thoughts", "none,null,sampled:2"]
        args += ["--backend", backend, "--max-new-tokens", "6", "--output", str(out)]
        args += [*TINY_BYTE, f"data.data_dir={data}", "model.default.scratch.max_position_embeddings=512"]
        assert main(args) == 0
        records[backend] = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for hf, vl in zip(records["hf"], records["vllm"]):
        for mode in ("none", "null"):  # greedy answers: the engine serves the same weights
            assert vl[mode]["generation"] == hf[mode]["generation"]
            assert vl[mode]["answer_logp"] == pytest.approx(hf[mode]["answer_logp"], abs=1e-4)
        assert len(vl["thoughts"]) == 2 and all(t["length"] <= 4 for t in vl["thoughts"])
