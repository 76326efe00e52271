"""Readers, the published training-text format token for token, stage examples and the aligning collator."""

import json

import pytest
from transformers import ByT5Tokenizer

from thinkrl.coconut.config import CoconutConfig, CoconutDataConfig, CurriculumConfig, SyntheticChainConfig
from thinkrl.coconut.curriculum import plan
from thinkrl.coconut.data import (
    IGNORE,
    SpecialIds,
    build_example,
    collate,
    load_split,
    read_problems,
    tokenize_problem,
)
from thinkrl.coconut.models import build_tokenizer, special_ids
from thinkrl.coconut.synthetic import chain_splits
from thinkrl.config import load_config
from thinkrl.errors import ConfigError, DataError

# Lines in the iCoT format (README §3 of the shared data); the second has no steps, as 6 valid lines do.
ICOT = [
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips "
        "did Natalia sell altogether in April and May?||<<48/2=24>> <<48+24=72>> #### 72"
    ),
    "A shirt costs 1,000 dollars. How much do two cost?|| #### 2,000",
]
PROBLEMS = [
    {"question": ICOT[0].split("||")[0], "steps": ["<<48/2=24>>", "<<48+24=72>>"], "answer": "72"},
    {"question": "A shirt costs 1,000 dollars. How much do two cost?", "steps": [""], "answer": "2,000"},
]


def test_icot_text_and_coconut_json_read_the_same(tmp_path):
    txt, js = tmp_path / "a.txt", tmp_path / "a.json"
    txt.write_text("\n".join(ICOT) + "\n")
    js.write_text(json.dumps(PROBLEMS))
    assert read_problems(txt) == PROBLEMS == read_problems(js)


def test_shared_data_files_agree():
    cfg = CoconutDataConfig(source="gsm8k")
    if cfg.resolved_data_dir() is None:
        pytest.skip("no ../shared/data here")
    from thinkrl.data.sources import resolve_data_file

    txt = read_problems(resolve_data_file(cfg, "icot_gsm8k/test.txt"), limit=20)
    js = read_problems(resolve_data_file(cfg, "icot_gsm8k/coconut_json/gsm_test.json"), limit=20)
    assert txt == js
    assert load_split(CoconutDataConfig(source="gsm8k", max_eval=3), "valid")[0]["answer"]
    pros = load_split(CoconutDataConfig(source="prosqa", max_eval=2), "test")
    assert len(pros) == 2 and 3 <= len(pros[0]["steps"]) <= 6


def test_bad_input_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(ICOT[0] + "\nno separators here\n")
    with pytest.raises(DataError, match=r"bad.txt:2 is malformed"):
        read_problems(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_problems(tmp_path / "missing.json")
    broken = tmp_path / "b.json"
    broken.write_text(json.dumps([{"question": "q", "answer": "1"}]))
    with pytest.raises(DataError, match="item 0 needs keys"):
        read_problems(broken)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["curriculum.c_thougt=2"], schema_class=CoconutConfig)
    with pytest.raises(ConfigError, match="curriculum.mode"):
        load_config(None, ["curriculum.mode=latent"], schema_class=CoconutConfig)


def test_training_text_is_the_published_format_token_for_token():
    """Bytes make the check independent of the code: question\\n + steps one per line + ### answer + eos."""
    tok = ByT5Tokenizer()
    for problem in PROBLEMS:
        t = tokenize_problem(problem, tok, tok.eos_token_id)
        ex = build_example(t, plan(0, len(problem["steps"]), CurriculumConfig(mode="cot")), None)
        text = problem["question"] + "\n" + "\n".join(problem["steps"]) + "\n### " + problem["answer"]
        assert ex["input_ids"] == [b + 3 for b in text.encode("utf-8")] + [tok.eos_token_id]  # ByT5: id = byte + 3
        n_question = len((problem["question"] + "\n").encode())
        assert ex["labels"] == [IGNORE] * n_question + ex["input_ids"][n_question:]
    no_cot = build_example(
        tokenize_problem(PROBLEMS[0], tok, tok.eos_token_id), plan(0, 2, CurriculumConfig(mode="no_cot")), None
    )
    assert tok.decode(no_cot["input_ids"]) == PROBLEMS[0]["question"] + "\n### 72</s>"


def test_chat_template_wraps_the_question():
    tok = ByT5Tokenizer()
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    t = tokenize_problem(PROBLEMS[0], tok, tok.eos_token_id, chat_template=True)
    assert tok.decode(t.question) == "<u>" + PROBLEMS[0]["question"] + "</u><a>"
    assert tok.decode(t.steps[0]) == "<<48/2=24>>\n"


@pytest.mark.parametrize("markers", [True, False])
def test_stage_example_replaces_steps_with_latents(markers):
    tok = build_tokenizer(CoconutConfig())
    ids = special_ids(tok)
    problem = {"question": "3 +4 *7 -2", "steps": ["3 +4 = 7", "7 *7 = 9", "9 -2 = 7"], "answer": "7"}
    t = tokenize_problem(problem, tok, ids.eos)
    cur = CurriculumConfig(mode="coconut", c_thought=2, max_latent_stage=3, latent_markers=markers)
    ex = build_example(t, plan(2, 3, cur), ids)
    thought = "<|latent|> " * 4
    if markers:
        thought = "<|start-latent|> " + thought + "<|end-latent|> "
    expected = "<bos> 3 +4 *7 -2 \n " + thought + "9 -2 = 7 \n ### 7 <eos>"
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == expected.split(" ")
    n_masked = 1 + 4 + 1 + len(thought.split())  # bos, question, newline, markers and latents
    assert ex["labels"][:n_masked] == [IGNORE] * n_masked and ex["labels"][n_masked:] == ex["input_ids"][n_masked:]


def test_collator_aligns_latents_across_rows():
    ids = SpecialIds(start=90, end=91, latent=92, eos=2, pad=0)
    examples = [
        {"input_ids": [1, 5, 90, 92, 92, 91, 7, 2], "labels": [IGNORE] * 6 + [7, 2], "anchor": 2},
        {"input_ids": [1, 5, 6, 6, 6, 90, 92, 92, 91, 2], "labels": [IGNORE] * 9 + [2], "anchor": 5},
    ]
    batch = collate(examples, ids)
    cols = [batch["latent_mask"][i].nonzero().flatten().tolist() for i in range(2)]
    assert cols[0] == cols[1] == [6, 7]
    assert batch["attention_mask"].sum(1).tolist() == [8, 10]
    assert batch["labels"][0, 3:].tolist() == [IGNORE] * 6 + [7, 2] and batch["input_ids"][0, :3].tolist() == [0, 0, 0]
    assert not collate(examples, ids, latent_feedback=False)["latent_mask"].any()  # pause mode


def test_synthetic_task_is_consistent_and_split_disjoint():
    cfg = SyntheticChainConfig(num_ops=4, train_size=300, eval_size=50, test_size=50)
    splits = chain_splits(cfg)
    questions = [{p["question"] for p in splits[s]} for s in ("train", "valid", "test")]
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2])
    for p in splits["train"][:50]:
        tokens = p["question"].split()
        value = int(tokens[0])
        for operation, step in zip(tokens[1:], p["steps"]):  # one token per operation: "+4"
            op, operand = operation[0], int(operation[1:])
            new = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % 10
            assert step == f"{value} {operation} = {new}"
            value = new
        assert p["answer"] == str(value) and len(p["steps"]) == 4
    answers = [p["answer"] for p in splits["train"]]
    assert len(set(answers)) == 10 and max(answers.count(a) for a in set(answers)) < 0.2 * len(answers)
