"""``data.source=hf``: local parquet / JSON-lines data through ``datasets``, the GSM8K and CSQA presets against the
reader they replaced, streaming (deterministic, resumed exactly), weighted mixtures and the one-line errors.

Everything is written into tmp_path; ``datasets`` caches under a tmp folder too (``data.cache_dir``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import ByT5Tokenizer

from thinkrl.config import DataConfig, load_config
from thinkrl.data.hf_sources import text_datasets
from thinkrl.data.positions import PositionStream
from thinkrl.data.sources import _task_pool, build_pools, gsm8k_answer
from thinkrl.errors import ConfigError, DataError
from thinkrl.prompts import load_template


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


def write_parquet(path: Path, column: str, texts: list[str]) -> Path:
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus(n: int, tag: str = "w") -> list[str]:
    return [f"doc{i}: " + " ".join(f"{tag}{(i * 7 + j) % 50}" for j in range(20)) for i in range(n)]


QA = [{"q": f"What is {i} plus {i}?", "sol": f"{i} + {i} = {2 * i}. ANSWER={2 * i}"} for i in range(12)]
QA_KW = dict(
    source="hf", question_field="q", answer_field="sol", answer_extractor="regex", answer_regex=r"ANSWER=(\d+)"
)


# ----------------------------------------------------------------------------------------------------------------
# presets: the same items and prompts as the hand-written reader they replaced, byte for byte
# ----------------------------------------------------------------------------------------------------------------
def shared(rel: str) -> Path:
    data_dir = DataConfig().resolved_data_dir()
    if data_dir is None or not (data_dir / rel).is_file():
        pytest.skip(f"needs ../shared/data/{rel}")
    return data_dir / rel


def old_gsm8k_reader(path: Path, template: str) -> list[tuple[str, str]]:
    """The reader GSM8K had before the hf path: json.loads per non-blank line, then the template."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(template.format(question=r["question"].strip()), " " + gsm8k_answer(r["answer"])) for r in rows]


def digest(pool) -> str:
    h = hashlib.sha256()
    for p in pool:
        h.update(json.dumps([p.context_ids, p.target_ids, p.meta]).encode())
    return h.hexdigest()[:16]


def test_gsm8k_and_csqa_presets_match_the_old_reader(byt5, cache):
    test_path = shared("gsm8k/test.jsonl")
    shared("csqa/dev_rand_split.jsonl")
    data_dir = str(test_path.parents[1])
    held = _task_pool(DataConfig(source="gsm8k", data_dir=data_dir, n_ahead=8, context_len=4096), byt5, "eval")
    reference = old_gsm8k_reader(test_path, load_template("tasks/gsm8k", {"question"}))
    assert len(held) == len(reference) == 1319
    for p, (prompt, target) in zip(held, reference):
        assert bytes(i - 3 for i in p.context_ids) == prompt.encode()
        assert bytes(i - 3 for i in p.target_ids) == target.encode()[:8]
    # Digests of every held-out item (context ids, target ids, meta), computed with the old reader before it went.
    assert digest(held) == "191dd3d4b3c3cfb7"
    csqa = _task_pool(DataConfig(source="csqa", data_dir=data_dir, n_ahead=8, context_len=4096), byt5, "eval")
    assert len(csqa) == 1221 and digest(csqa) == "e54de18d0d239235"


# ----------------------------------------------------------------------------------------------------------------
# local files
# ----------------------------------------------------------------------------------------------------------------
def test_parquet_text_corpus(tmp_path, byt5, cache):
    texts = corpus(30)
    path = write_parquet(tmp_path / "c.parquet", "body", texts)
    cfg = DataConfig(
        source="hf",
        data_files=[str(path)],
        text_field="body",
        positions="every_k",
        every_k=8,
        context_len=32,
        n_ahead=3,
        eval_docs=5,
        cache_dir=cache,
    )
    train, held = build_pools(cfg, byt5, seed=0)
    decode = lambda docs: {bytes(int(i) - 3 for i in d).decode() for d in docs}  # noqa: E731
    train_text, held_text = "".join(decode(train.docs)), "".join(decode(held.docs))
    assert all(t.split()[0] in held_text for t in texts[-5:])  # the last eval_docs documents are held out
    assert not any(f"{t.split()[0]} " in train_text for t in texts[-5:])
    assert len(train) > 4 * len(held) > 0


def test_qa_jsonl_with_renamed_fields(tmp_path, byt5, cache):
    train = write_jsonl(tmp_path / "train.jsonl", QA[:9])
    held = write_jsonl(tmp_path / "held.jsonl", QA[9:])
    cfg = DataConfig(**QA_KW, data_files=[str(train)], eval_file=str(held), context_len=200, cache_dir=cache)
    pools = build_pools(cfg, byt5, seed=0)
    assert [[p.meta["answer"] for p in pool] for pool in pools] == [[str(2 * i) for i in range(9)], ["18", "20", "22"]]
    p = pools[0][3]
    assert bytes(i - 3 for i in p.context_ids) == b"Question: What is 3 plus 3?\nAnswer:"  # the thought goes here
    assert bytes(i - 3 for i in p.target_ids) == b" 6"


# ----------------------------------------------------------------------------------------------------------------
# one-line errors
# ----------------------------------------------------------------------------------------------------------------
def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_broken_row_missing_field_and_empty_split(tmp_path, byt5, cache):
    bad = write_jsonl(tmp_path / "bad.jsonl", [QA[0], QA[1], '{"q": "x", "sol":', QA[2]])
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(**QA_KW, data_files=[str(bad)], eval_docs=1, cache_dir=cache), byt5, 0)
    assert f"{bad}:3 " in one_line(err)

    ok = write_jsonl(tmp_path / "ok.jsonl", QA)
    with pytest.raises(DataError) as err:
        build_pools(
            DataConfig(**{**QA_KW, "answer_field": "solution"}, data_files=[str(ok)], eval_docs=2, cache_dir=cache),
            byt5,
            0,
        )
    msg = one_line(err)
    assert "'solution'" in msg and "fields: q, sol" in msg and "data.answer_field" in msg

    unmatched = write_jsonl(tmp_path / "unmatched.jsonl", [*QA[:4], {"q": "?", "sol": "no answer"}, *QA[4:]])
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(**QA_KW, data_files=[str(unmatched)], eval_docs=2, cache_dir=cache), byt5, 0)
    assert f"hf train row 5 ({unmatched})" in one_line(err) and "answer_regex" in str(err.value)

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(source="hf", data_files=[str(empty)], positions="every_k", cache_dir=cache), byt5, 0)
    assert "holds no rows" in one_line(err) and "data.data_files" in str(err.value)


def test_config_rules():
    with pytest.raises(ConfigError, match="data.hub_id"):
        DataConfig(source="hf")
    with pytest.raises(ConfigError, match="every_k"):
        DataConfig(source="hf", hub_id="x")
    with pytest.raises(ConfigError, match="positions=task"):
        DataConfig(source="hf", hub_id="x", question_field="q", positions="every_k")
    with pytest.raises(ConfigError, match="data.source=hf"):
        DataConfig(source="gsm8k", streaming=True)
    with pytest.raises(ConfigError, match="weight"):
        DataConfig(source="hf", positions="every_k", mixture=[{"hub_id": "a", "weight": 0}])
    with pytest.raises(ConfigError, match="cannot tell the format"):
        from thinkrl.data.hf_sources import builder_for

        builder_for([Path("a.xlsx")], "data.data_files")


# ----------------------------------------------------------------------------------------------------------------
# streaming and mixtures
# ----------------------------------------------------------------------------------------------------------------
def test_streaming_is_seeded_and_resumes_mid_stream_exactly(tmp_path, byt5, cache):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in corpus(40)])
    cfg = DataConfig(
        source="hf",
        data_files=[str(path)],
        streaming=True,
        shuffle_buffer=16,
        positions="every_k",
        every_k=16,
        context_len=32,
        n_ahead=2,
        eval_docs=4,
        cache_dir=cache,
    )
    key = lambda batch: [tuple(p.context_ids + p.target_ids) for p in batch]  # noqa: E731
    train, held = build_pools(cfg, byt5, seed=3)
    assert len(held) > 0
    stream = PositionStream(train, 3)
    full = key(stream.next_batch(150))  # more than one epoch of 36 documents
    assert key(PositionStream(build_pools(cfg, byt5, seed=3)[0], 3).next_batch(150)) == full
    assert key(PositionStream(build_pools(cfg, byt5, seed=4)[0], 4).next_batch(150)) != full
    first = PositionStream(train, 3)
    head = key(first.next_batch(37))
    state = first.state_dict()
    assert state["offset"] > 0 or state["index"] > 0
    resumed = PositionStream(train, 0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # saved and read back as a checkpoint does
    assert head + key(resumed.next_batch(113)) == full


def test_two_source_mixture_draws_each_at_its_weight(tmp_path, byt5, cache):
    a = write_parquet(tmp_path / "a.parquet", "text", [f"alpha {i}" for i in range(1500)])
    b = write_parquet(tmp_path / "b.parquet", "content", [f"beta {i}" for i in range(1500)])
    mixture = [{"data_files": [str(a)], "weight": 3}, {"data_files": [str(b)], "text_field": "content", "weight": 1}]
    cfg = DataConfig(source="hf", mixture=mixture, positions="every_k", cache_dir=cache, eval_docs=10)
    train, held = text_datasets(cfg, seed=0)
    first = train.select(range(1000))["text"]
    share = sum(t.startswith("alpha") for t in first) / 1000
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 1000)  # 4 sigma of a binomial over 1,000 documents
    assert text_datasets(cfg, seed=0)[0]["text"][:50] == train["text"][:50]
    assert text_datasets(cfg, seed=1)[0]["text"][:50] != train["text"][:50]
    assert sorted(t.split()[0] for t in held["text"]) == ["alpha"] * 10 + ["beta"] * 10


# ----------------------------------------------------------------------------------------------------------------
# end to end: train two steps, then evaluate, through data.source=hf
# ----------------------------------------------------------------------------------------------------------------
TINY_RUN = [
    "model.tokenizer=byte",
    "model.weight_groups=[A,A,A]",
    "model.freeze=[]",
    "head.form=none",
    "model.default.scratch.hidden_size=32",
    "model.default.scratch.num_heads=2",
    "model.default.scratch.intermediate_size=64",
    "data.interpreter_window=0",
    "rollout.num_thoughts=2",
    "rollout.max_thought_len=3",
    "trainer.batch_positions=4",
    "trainer.max_steps=2",
    "trainer.lm_warmup_steps=0",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.eval_every=0",
    "trainer.save_every=2",
    "trainer.num_threads=1",
]


@pytest.mark.parametrize("kind", ["parquet_text", "jsonl_qa"])
def test_train_and_evaluate_end_to_end(tmp_path, cache, kind):
    from thinkrl.eval.runner import EvalOptions, Evaluator
    from thinkrl.eval.setup import load_setup
    from thinkrl.run.trainer import Trainer

    if kind == "parquet_text":
        path = write_parquet(tmp_path / "c.parquet", "body", corpus(12))
        data = [f"data.data_files=[{path}]", "data.text_field=body", "data.positions=every_k", "data.eval_docs=2"]
        data += ["data.context_len=24", "data.n_ahead=2", "data.every_k=8", "data.eval_positions=4"]
        task = "text"
    else:
        path = write_jsonl(tmp_path / "qa.jsonl", QA)
        data = [f"data.data_files=[{path}]", "data.question_field=q", "data.answer_field=sol", "data.eval_docs=3"]
        data += ["data.answer_extractor=regex", "data.answer_regex='ANSWER=(\\d+)'", "data.n_ahead=3"]
        task = "gsm8k"  # an hf QA set is evaluated as gsm8k is: one gold answer after the prompt
    overrides = [
        *TINY_RUN,
        "data.source=hf",
        f"data.cache_dir={cache}",
        *data,
        f"trainer.output_dir={tmp_path / 'run'}",
    ]
    cfg = load_config("configs/default.yaml", overrides)
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.roles.models["A"].named_parameters()}
    trainer.train()
    after = dict(trainer.roles.models["A"].named_parameters())
    assert any(not torch_equal(before[n], after[n]) for n in before)
    setup = load_setup(str(tmp_path / "run"), None, [])
    assert setup.checkpoint.name == "checkpoint-2" and setup.cfg.data.source == "hf"
    opts = EvalOptions(
        task=task,
        model="run",
        thoughts="none,sampled:2",
        output_dir=str(tmp_path / "ev"),
        batch_size=2,
        max_new_tokens=3,
        limit=3,
    )
    evaluator = Evaluator(opts, setup)
    results = evaluator.run()
    assert results["n_items"] == 3
    if task == "gsm8k":
        assert {r["gold"] for r in evaluator.records} <= {"18", "20", "22"}  # the held-out (last) rows


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.detach().cpu(), b.detach().cpu())


def test_answer_extractors():
    """The gold answer of a QA row's answer text: GSM8K's '####' rule, a regex's group, math-verify's final answer."""
    from types import SimpleNamespace

    from thinkrl.data.hf_sources import answer_extractor

    def extract(kind: str, text: str, regex: str = "") -> str:
        return answer_extractor(SimpleNamespace(answer_extractor=kind, answer_regex=regex))(text)

    assert extract("gsm8k", "3 + 4 = 7\n#### 7") == "7"
    assert extract("regex", "Final: (B) because", r"\(([A-E])\)") == "B"
    assert extract("math-verify", r"so the total is $\boxed{\frac{3}{4}}$") == r"\frac{3}{4}"
    assert extract("math-verify", "The answer is 42") == "42"
    with pytest.raises(ValueError, match="does not match"):
        extract("regex", "no letter here", r"\(([A-E])\)")
    with pytest.raises(ValueError, match="no final answer"):
        extract("math-verify", "nothing to parse here")
