"""Data sources → position pools: synthetic key recall, GSM8K, CSQA, plain text, and the errors for broken input.

Tests that read the real files in ../shared/data skip when that folder (or the file) is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import ByT5Tokenizer

import thinkrl.prompts as prompts
from thinkrl.config import DataConfig, SyntheticTaskConfig
from thinkrl.data.sources import CSQA_LABELS, _csqa_item, _gsm8k_item, build_pools, gsm8k_answer
from thinkrl.data.synthetic import synthetic_documents
from thinkrl.errors import ConfigError, DataError
from thinkrl.models.synthetic_vocab import SPECIALS, synthetic_tokenizer
from thinkrl.prompts import load_template, render


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byt5():
    """A byte-level tokenizer that needs no files: token = byte + 3, no BOS."""
    tok = ByT5Tokenizer()
    assert tok.encode("a ", add_special_tokens=False) == [ord("a") + 3, ord(" ") + 3]
    return tok


class BosByteTokenizer:
    """Minimal tokenizer with a BOS id, to check that task contexts start with it."""

    bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert add_special_tokens is False
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")

    def __call__(self, text: str) -> dict:  # Llama-style: the tokenizer itself starts texts with BOS
        return {"input_ids": [self.bos_token_id, *self.encode(text)]}


class NoBosByteTokenizer(BosByteTokenizer):
    """Has a BOS token but does not start texts with it (SmolLM2/GPT-2 style): contexts get none."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}


def shared_file(rel: str) -> Path:
    """A file in ../shared/data, or skip the test."""
    data_dir = DataConfig().resolved_data_dir()
    if data_dir is None or not (data_dir / rel).is_file():
        pytest.skip(f"needs ../shared/data/{rel}")
    return data_dir / rel


def raw_rows(path: Path, n: int) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GSM_ROWS = [
    {"question": "What is 2 + 3? ", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "How many grams in 1.234 kg?", "answer": "1.234 * 1000 = 1234\n#### 1,234"},
]


def gsm_dir(root: Path, train=GSM_ROWS, test=GSM_ROWS) -> Path:
    if train is not None:
        write_jsonl(root / "gsm8k" / "train.jsonl", train)
    if test is not None:
        write_jsonl(root / "gsm8k" / "test.jsonl", test)
    return root


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty folder so nothing is picked up relative to the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# ----------------------------------------------------------------------------------------------------------------
# synthetic key recall
# ----------------------------------------------------------------------------------------------------------------
SYN = SyntheticTaskConfig(key_len=3, num_symbols=5, noise_len=4, noise_symbols=6)


def test_synthetic_documents_format():
    contexts, targets = synthetic_documents(SYN, 200, seed=0)
    assert len(contexts) == len(targets) == 200
    pattern = re.compile(r"^key : ((?:[a-e] ){3});((?: [0-5]){4}) ; recall :$")
    for context, target in zip(contexts, targets):
        m = pattern.match(context)
        assert m, context
        assert target == m.group(1).strip()  # the target is the key
        assert len(target.split()) == SYN.key_len
    # the keys and noise vary (all 5 key symbols and all 6 noise symbols occur)
    assert {c for t in targets for c in t.split()} == set("abcde")
    assert {w for c in contexts for w in c.split(";")[1].split()} == set("012345")
    assert len(set(targets)) > 50


def test_synthetic_documents_seeded():
    a = synthetic_documents(SYN, 50, seed=3)
    assert a == synthetic_documents(SYN, 50, seed=3)
    b = synthetic_documents(SYN, 50, seed=4)
    assert a[0] != b[0]
    # the first n documents do not depend on how many are drawn
    assert synthetic_documents(SYN, 10, seed=3)[0] == a[0][:10]


def test_synthetic_alphabet_limits():
    with pytest.raises(ConfigError, match="26"):
        synthetic_documents(SyntheticTaskConfig(num_symbols=27), 1, 0)
    with pytest.raises(ConfigError, match="10 noise"):
        synthetic_tokenizer(SyntheticTaskConfig(noise_symbols=11))


def test_synthetic_tokenizer_one_token_per_word():
    tok = synthetic_tokenizer(SYN)
    contexts, targets = synthetic_documents(SYN, 20, seed=1)
    vocab = tok.get_vocab()
    assert len(vocab) == len(SPECIALS) + 4 + SYN.num_symbols + SYN.noise_symbols
    for text in contexts + targets:
        ids = tok.encode(text, add_special_tokens=False)
        words = text.split()
        assert len(ids) == len(words)
        assert tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids) == words
        assert tok.decode(ids) == text
    assert tok.bos_token_id is not None and tok.pad_token_id is not None and tok.eos_token_id is not None
    assert len({tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_synthetic_pools():
    tok = synthetic_tokenizer(SYN)
    cfg = DataConfig(source="synthetic", synthetic=SYN, max_docs=40, eval_positions=12, context_len=64, n_ahead=3)
    train, held = build_pools(cfg, tok, seed=5)
    assert len(train) == 40 and len(held) == 12
    for pool in (train, held):
        for p in pool:
            assert p.context_ids[0] == tok.bos_token_id
            words = tok.decode(p.context_ids[1:]).split()
            assert words[:2] == ["key", ":"] and words[-2:] == ["recall", ":"]
            assert tok.decode(p.target_ids).split() == words[2 : 2 + SYN.key_len]  # y = the key
            assert len(p.context_ids) == 1 + 2 + SYN.key_len + 1 + SYN.noise_len + 3
    train_docs = {tuple(p.context_ids + p.target_ids) for p in train}
    held_docs = {tuple(p.context_ids + p.target_ids) for p in held}
    assert not train_docs & held_docs  # held-out documents are other documents
    # same seed → same pools; another seed → other pools
    again, again_held = build_pools(cfg, tok, seed=5)
    assert [p.context_ids for p in again] == [p.context_ids for p in train]
    assert [p.context_ids for p in again_held] == [p.context_ids for p in held]
    other, _ = build_pools(cfg, tok, seed=6)
    assert [p.context_ids for p in other] != [p.context_ids for p in train]


def test_synthetic_context_len_truncates_key_away():
    tok = synthetic_tokenizer(SYN)
    cfg = DataConfig(source="synthetic", synthetic=SYN, max_docs=5, eval_positions=2, context_len=4, n_ahead=3)
    train, _ = build_pools(cfg, tok, seed=0)
    for p in train:
        words = tok.convert_ids_to_tokens(p.context_ids)
        assert len(words) == 4 and words[-3:] == [";", "recall", ":"]  # bos and key cut away on the left
        assert words[0] in "012345"
        assert len(p.target_ids) == SYN.key_len


# ----------------------------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------------------------
def test_gsm8k_answer():
    assert gsm8k_answer("Some steps <<2*3=6>>6\n#### 6") == "6"
    assert gsm8k_answer("x\n#### 1,234\n") == "1234"
    assert gsm8k_answer("x\n#### 1,000,000") == "1000000"
    assert gsm8k_answer("#### -3 ") == "-3"
    assert gsm8k_answer("#### 0.5") == "0.5"
    with pytest.raises(ValueError, match="####"):
        gsm8k_answer("the answer is 6")


def test_gsm8k_item_uses_template():
    template = load_template("tasks/gsm8k", {"question"})
    context, target, meta = _gsm8k_item({"question": "  Why?\n", "answer": "...\n#### 12,000"}, template)
    assert context == "Question: Why?\nAnswer (a number):"
    assert target == " 12000" and meta == {"answer": "12000"}


@pytest.mark.parametrize("n_ahead,context_len", [(2, 48), (8, 4096)])
def test_gsm8k_real_file(byt5, n_ahead, context_len):
    train_path, test_path = shared_file("gsm8k/train.jsonl"), shared_file("gsm8k/test.jsonl")
    cfg = DataConfig(
        source="gsm8k", data_dir=str(train_path.parents[1]), max_docs=20, n_ahead=n_ahead, context_len=context_len
    )
    train, held = build_pools(cfg, byt5, seed=0)
    assert len(train) == 20 and len(held) == 20
    for pool, path in ((train, train_path), (held, test_path)):
        for p, row in zip(pool, raw_rows(path, 20)):
            gold = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
            assert p.meta == {"answer": gold}
            assert byt5.decode(p.target_ids) == (" " + gold)[:n_ahead]  # one byte per token
            assert len(p.target_ids) == min(n_ahead, len(gold) + 1)
            full = f"Question: {row['question'].strip()}\nAnswer (a number):"
            assert p.context_ids == byt5.encode(full, add_special_tokens=False)[-context_len:]
            assert bytes(i - 3 for i in p.context_ids).endswith(b"\nAnswer (a number):")
    assert held[0].meta["answer"] == "18"  # test[0]: Janet's ducks
    assert train[0].meta["answer"] == "72"


def test_gsm8k_context_starts_with_bos(tmp_path, elsewhere):
    tok = BosByteTokenizer()
    cfg = DataConfig(source="gsm8k", data_dir=str(gsm_dir(tmp_path / "data")), n_ahead=3, context_len=1000)
    train, held = build_pools(cfg, tok, seed=0)
    assert [p.meta["answer"] for p in train] == ["5", "1234"]
    assert train[0].context_ids[0] == tok.bos_token_id
    assert tok.decode(train[0].context_ids[1:]) == "Question: What is 2 + 3?\nAnswer (a number):"
    assert tok.decode(train[1].target_ids) == " 12"  # " 1234" cut to n_ahead tokens
    plain, _ = build_pools(cfg, NoBosByteTokenizer(), seed=0)
    assert plain[0].context_ids == train[0].context_ids[1:]


# ----------------------------------------------------------------------------------------------------------------
# CSQA
# ----------------------------------------------------------------------------------------------------------------
LABELS = ["A", "B", "C", "D", "E"]
TEXTS = ["bed", "car", "sofa", "tree", "oven"]
CSQA_OFFICIAL = {
    "answerKey": "C",
    "id": "x1",
    "question": {
        "question_concept": "cat",
        "choices": [{"label": label, "text": text} for label, text in zip(LABELS, TEXTS)],
        "stem": " Where does a cat sleep? ",
    },
}
CSQA_HUB = {
    "id": "x1",
    "question": " Where does a cat sleep? ",
    "question_concept": "cat",
    "choices": {"label": LABELS, "text": TEXTS},
    "answerKey": "C",
}
CSQA_CONTEXT = "Question: Where does a cat sleep?\nChoices: (A) bed (B) car (C) sofa (D) tree (E) oven\nAnswer:"


def test_csqa_item_official_and_hub_formats():
    template = load_template("tasks/csqa", {"question", "choices", *CSQA_LABELS})
    expected = (CSQA_CONTEXT, " C", {"answer": "C"})
    assert _csqa_item(CSQA_OFFICIAL, template) == expected
    assert _csqa_item(CSQA_HUB, template) == expected
    with pytest.raises(ValueError, match="answerKey"):
        _csqa_item({**CSQA_HUB, "answerKey": "F"}, template)
    with pytest.raises(ValueError, match="answerKey"):
        _csqa_item({**CSQA_OFFICIAL, "answerKey": ""}, template)  # the unlabelled test split


def test_csqa_files_in_either_format(tmp_path, elsewhere, byt5):
    root = tmp_path / "data"
    write_jsonl(root / "csqa" / "train_rand_split.jsonl", [CSQA_HUB, {**CSQA_HUB, "answerKey": "E"}])
    write_jsonl(root / "csqa" / "dev_rand_split.jsonl", [CSQA_OFFICIAL])
    cfg = DataConfig(source="csqa", data_dir=str(root), n_ahead=4, context_len=1000)
    train, held = build_pools(cfg, byt5, seed=0)
    assert [byt5.decode(p.target_ids) for p in train] == [" C", " E"]
    assert byt5.decode(held[0].target_ids) == " C"
    assert byt5.decode(train[0].context_ids) == byt5.decode(held[0].context_ids) == CSQA_CONTEXT


def test_csqa_bad_answer_key_names_row(tmp_path, elsewhere, byt5):
    root = tmp_path / "data"
    write_jsonl(root / "csqa" / "train_rand_split.jsonl", [CSQA_HUB, {**CSQA_OFFICIAL, "answerKey": "Z"}])
    write_jsonl(root / "csqa" / "dev_rand_split.jsonl", [CSQA_OFFICIAL])
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(source="csqa", data_dir=str(root)), byt5, seed=0)
    assert "csqa train row 2" in str(err.value) and "'Z'" in str(err.value)


def test_csqa_real_file(byt5):
    train_path = shared_file("csqa/train_rand_split.jsonl")
    dev_path = shared_file("csqa/dev_rand_split.jsonl")
    cfg = DataConfig(source="csqa", data_dir=str(train_path.parents[1]), max_docs=20, n_ahead=4, context_len=4096)
    train, held = build_pools(cfg, byt5, seed=0)
    assert len(train) == 20 and len(held) == 20
    letters = set()
    for pool, path in ((train, train_path), (held, dev_path)):
        for p, row in zip(pool, raw_rows(path, 20)):
            key = row["answerKey"]
            letters.add(key)
            assert key in LABELS
            assert byt5.decode(p.target_ids) == " " + key
            assert p.meta == {"answer": key}
            q = row["question"]
            choices = " ".join(f"({c['label']}) {c['text']}" for c in q["choices"])
            expected = f"Question: {q['stem'].strip()}\nChoices: {choices}\nAnswer:"
            assert p.context_ids == byt5.encode(expected, add_special_tokens=False)
    assert len(letters) >= 3
    assert held[0].meta["answer"] == "A" and "revolving door" in byt5.decode(held[0].context_ids)


# ----------------------------------------------------------------------------------------------------------------
# broken input
# ----------------------------------------------------------------------------------------------------------------
def test_task_file_blank_lines_and_max_docs(tmp_path, elsewhere, byt5):
    rows = [GSM_ROWS[0], "", "   ", GSM_ROWS[1], GSM_ROWS[0]]
    root = gsm_dir(tmp_path / "data", train=rows)
    train, _ = build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)
    assert [p.meta["answer"] for p in train] == ["5", "1234", "5"]
    train, _ = build_pools(DataConfig(source="gsm8k", data_dir=str(root), max_docs=2), byt5, seed=0)
    assert [p.meta["answer"] for p in train] == ["5", "1234"]


def test_task_malformed_json_line(tmp_path, elsewhere, byt5):
    root = gsm_dir(tmp_path / "data", train=[GSM_ROWS[0], "{not json", GSM_ROWS[1]])
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)
    assert f"{root / 'gsm8k' / 'train.jsonl'}:2 " in str(err.value)


def test_gsm8k_row_without_answer_marker(tmp_path, elsewhere, byt5):
    bad = {"question": "q?", "answer": "the answer is 4"}
    root = gsm_dir(tmp_path / "data", train=[GSM_ROWS[0], bad])
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)
    msg = str(err.value)
    assert "gsm8k train row 2" in msg and "####" in msg


def test_gsm8k_held_out_row_without_question(tmp_path, elsewhere, byt5):
    root = gsm_dir(tmp_path / "data", test=[{"answer": "#### 3"}])
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)
    assert "gsm8k eval row 1" in str(err.value) and "question" in str(err.value)


def test_gsm8k_numeric_answer_field_is_data_error(tmp_path, elsewhere, byt5):
    root = gsm_dir(tmp_path / "data", train=[{"question": "q?", "answer": 5}])
    with pytest.raises(DataError, match="gsm8k train row 1"):
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)


def test_task_file_not_utf8_is_data_error(tmp_path, elsewhere, byt5):
    root = gsm_dir(tmp_path / "data")
    (root / "gsm8k" / "train.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="train.jsonl"):
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)


@pytest.mark.parametrize("split,content", [("train", ""), ("eval", "\n  \n")])
def test_empty_task_file(tmp_path, elsewhere, byt5, split, content):
    root = gsm_dir(tmp_path / "data")
    name = "train.jsonl" if split == "train" else "test.jsonl"
    (root / "gsm8k" / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)
    msg = str(err.value)
    assert name in msg and "no rows" in msg and f"data.{split}_file" in msg


def test_missing_task_file_points_at_data_dir(tmp_path, elsewhere, byt5):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = DataConfig(source="gsm8k", data_dir=str(empty), hub_id="")
    with pytest.raises(DataError) as err:
        build_pools(cfg, byt5, seed=0)
    msg = str(err.value)
    assert "data.data_dir" in msg and str(empty / "gsm8k" / "train.jsonl") in msg


def test_missing_held_out_file(tmp_path, elsewhere, byt5):
    root = gsm_dir(tmp_path / "data", test=None)
    with pytest.raises(DataError) as err:
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)
    assert "test.jsonl" in str(err.value) and "data.data_dir" in str(err.value)


def test_explicit_task_files(tmp_path, elsewhere, byt5):
    train = write_jsonl(tmp_path / "mine" / "a.jsonl", [GSM_ROWS[1]])
    held = write_jsonl(tmp_path / "mine" / "b.jsonl", [GSM_ROWS[0], GSM_ROWS[0]])
    cfg = DataConfig(source="gsm8k", data_dir=str(tmp_path / "nowhere"), train_file=str(train), eval_file=str(held))
    pools = build_pools(cfg, byt5, seed=0)
    assert [[p.meta["answer"] for p in pool] for pool in pools] == [["1234"], ["5", "5"]]


def test_explicit_data_dir_wins_over_working_directory(tmp_path, monkeypatch, byt5):
    wanted = gsm_dir(tmp_path / "wanted", train=[GSM_ROWS[0]])
    stray = gsm_dir(tmp_path / "stray", train=[GSM_ROWS[1]])
    monkeypatch.chdir(stray)
    train, _ = build_pools(DataConfig(source="gsm8k", data_dir=str(wanted)), byt5, seed=0)
    assert train[0].meta["answer"] == "5"


# ----------------------------------------------------------------------------------------------------------------
# prompt templates
# ----------------------------------------------------------------------------------------------------------------
def test_shipped_templates_load_exactly():
    gsm = load_template("tasks/gsm8k", {"question"})
    assert gsm.endswith("Answer (a number):")  # no trailing newline added
    assert prompts.placeholders("tasks/gsm8k", gsm) == {"question"}
    csqa = load_template("tasks/csqa", {"question", "choices", *CSQA_LABELS})
    assert prompts.placeholders("tasks/csqa", csqa) == {"question", *CSQA_LABELS}  # the layout is the template's
    with pytest.raises(ConfigError, match="'tasks/gsm8k'"):
        load_template("tasks/gsm8k", set())


@pytest.fixture
def prompts_dir(tmp_path, monkeypatch):
    folder = tmp_path / "prompts"
    (folder / "tasks").mkdir(parents=True)
    monkeypatch.setattr(prompts, "PROMPTS_DIR", folder)
    return folder


def test_custom_template_is_used(tmp_path, elsewhere, prompts_dir, byt5):
    (prompts_dir / "custom").mkdir()
    (prompts_dir / "custom" / "mine.txt").write_text("<<{question}>> {{literal}} =", encoding="utf-8")
    root = gsm_dir(tmp_path / "data")
    cfg = DataConfig(source="gsm8k", data_dir=str(root), prompt_template="custom/mine", context_len=1000)
    train, _ = build_pools(cfg, byt5, seed=0)
    assert byt5.decode(train[0].context_ids) == "<<What is 2 + 3?>> {literal} ="
    assert render("custom/mine", question="q") == "<<q>> {literal} ="


@pytest.mark.parametrize(
    "text,expect",
    [
        ("Question: {question}\nHint: {hint}\nAnswer:", "unknown placeholder.*'hint'"),
        ("Question: {}\nAnswer:", "unknown placeholder"),
        ("Question: {question\nAnswer:", "brace error"),
        ("Question: {question}}\nAnswer:", "brace error"),
    ],
)
def test_bad_template_names_it(tmp_path, elsewhere, prompts_dir, byt5, text, expect):
    (prompts_dir / "tasks" / "gsm8k.txt").write_text(text, encoding="utf-8")
    root = gsm_dir(tmp_path / "data")
    with pytest.raises(ConfigError, match=expect) as err:
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)
    assert "'tasks/gsm8k'" in str(err.value)


@pytest.mark.parametrize("text", ["Question: {question:{width}}\nAnswer:", "Question: {question!x}\nAnswer:"])
def test_template_errors_found_at_load(tmp_path, elsewhere, prompts_dir, byt5, text):
    (prompts_dir / "tasks" / "gsm8k.txt").write_text(text, encoding="utf-8")
    root = gsm_dir(tmp_path / "data")
    with pytest.raises(ConfigError, match="'tasks/gsm8k'"):
        build_pools(DataConfig(source="gsm8k", data_dir=str(root)), byt5, seed=0)


def test_missing_template_lists_known(prompts_dir):
    (prompts_dir / "tasks" / "gsm8k.txt").write_text("{question}", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_template("tasks/nope", {"question"})
    assert "'tasks/nope'" in str(err.value) and "tasks/gsm8k" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# plain text
# ----------------------------------------------------------------------------------------------------------------
def _doc_bytes(docs: list[np.ndarray], context_len: int) -> bytes:
    """The text the (overlapping) windows cover, for a ByT5 encoding: each window's first context_len tokens,
    then the tail of the last window."""
    ids = np.concatenate([d[:context_len] for d in docs] + [docs[-1][context_len:]])
    return (ids - 3).astype(np.uint8).tobytes()


def _check_text_pool(pool, context_len: int, n_ahead: int, every_k: int, sample: int = 0):
    """Every spot is an every_k multiple with n_ahead true tokens after it (a window with fewer than every_k
    valid positions gets one, at its end); positions cut the right tokens."""
    for d, t, n in pool.spots.tolist():
        last = len(pool.docs[d]) - n_ahead
        assert n == n_ahead and 2 <= t <= last
        assert t % every_k == 0 or (last - 1 < every_k and t == last)
    idx = range(len(pool)) if not sample else np.random.default_rng(0).choice(len(pool), sample, replace=False)
    for i in idx:
        p, (d, t, _) = pool[int(i)], pool.spots[int(i)].tolist()
        assert len(p.target_ids) == n_ahead and len(p.context_ids) == min(context_len, t)
        assert p.context_ids == pool.docs[d][max(0, t - context_len) : t].tolist()
        assert p.target_ids == pool.docs[d][t : t + n_ahead].tolist()


def test_text_source_small_file(tmp_path, elsewhere, byt5):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(400))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    cfg = DataConfig(
        source="text", train_file=str(tmp_path / "t.txt"), positions="every_k", every_k=4, context_len=16, n_ahead=3
    )
    train, held = build_pools(cfg, byt5, seed=0)
    assert _doc_bytes(train.docs, 16) == text[:360].encode()
    assert _doc_bytes(held.docs, 16) == text[360:].encode()
    _check_text_pool(train, 16, 3, 4)
    _check_text_pool(held, 16, 3, 4)
    assert len(train) > len(held) > 0


def test_text_source_eval_file_and_random_positions(tmp_path, elsewhere, byt5):
    (tmp_path / "a.txt").write_text("a" * 300, encoding="utf-8")
    (tmp_path / "b.txt").write_text("b" * 100, encoding="utf-8")
    cfg = DataConfig(
        source="text",
        train_file=str(tmp_path / "a.txt"),
        eval_file=str(tmp_path / "b.txt"),
        positions="random",
        positions_per_doc=2,
        context_len=32,
        n_ahead=2,
    )
    train, held = build_pools(cfg, byt5, seed=1)
    assert _doc_bytes(train.docs, 32) == b"a" * 300
    assert _doc_bytes(held.docs, 32) == b"b" * 100
    again, again_held = build_pools(cfg, byt5, seed=1)
    assert np.array_equal(train.spots, again.spots) and np.array_equal(held.spots, again_held.spots)
    other, _ = build_pools(cfg, byt5, seed=2)
    assert not np.array_equal(train.spots, other.spots)


def test_text_source_errors(tmp_path, elsewhere, byt5):
    kw = dict(source="text", positions="every_k", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.train_file"):
        build_pools(DataConfig(train_file="missing.txt", **kw), byt5, seed=0)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        build_pools(DataConfig(train_file="empty.txt", **kw), byt5, seed=0)
    (tmp_path / "ok.txt").write_text("x" * 100, encoding="utf-8")
    with pytest.raises(DataError, match="data.eval_file"):
        build_pools(DataConfig(train_file="ok.txt", eval_file="gone.txt", **kw), byt5, seed=0)


def test_text_source_tinyshakespeare(byt5):
    path = shared_file("tinyshakespeare/input.txt")
    cfg = DataConfig(
        source="text",
        data_dir=str(path.parents[1]),
        train_file="tinyshakespeare/input.txt",
        positions="every_k",
        every_k=16,
        context_len=64,
        n_ahead=4,
    )
    train, held = build_pools(cfg, byt5, seed=0)
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    # the windows cover the head of the file exactly (train) and the tail exactly (held out): no shared text
    assert _doc_bytes(train.docs, 64) == text[:cut].encode()
    assert _doc_bytes(held.docs, 64) == text[cut:].encode()
    assert len(held) > 0 and len(train) > 8 * len(held)
    for pool in (train, held):
        _check_text_pool(pool, 64, 4, 16, sample=300)
    # away from the file's end, positions are exactly every 16th token of the text
    assert train.spots[:100, 1].tolist() == [16, 32, 48, 64] * 25
    tail = text[cut:]
    some = held[len(held) // 2]
    assert byt5.decode(some.context_ids + some.target_ids) in tail
