"""Text slices are drawn window by window, and ``item_windows`` regroups the items as windows; task prompts follow
their templates, the harness layouts byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from thinkrl.data.sources import CSQA_LABELS, _csqa_item
from thinkrl.data.windows import positions_of
from thinkrl.errors import DataError
from thinkrl.eval.tasks import EvalItem, _csqa_fields, _gsm8k_fields, choose_windows, item_windows
from thinkrl.prompts import load_template


def _spots(windows: int, per_window: int) -> np.ndarray:
    return np.asarray([(d, 4 * (s + 1), 3) for d in range(windows) for s in range(per_window)])


def test_choose_windows_takes_whole_windows_and_cuts_the_last():
    spots = _spots(10, 8)
    ids = choose_windows(spots, 20, seed=3)
    assert len(ids) == 20 and ids == sorted(ids)
    docs, counts = np.unique(spots[ids, 0], return_counts=True)
    assert len(docs) == 3 and sorted(counts.tolist()) == [4, 8, 8]
    cut = docs[counts == 4][0]
    assert spots[ids][spots[ids, 0] == cut, 1].tolist() == [4, 8, 12, 16]  # the cut window keeps its first slots
    assert choose_windows(spots, 20, seed=3) == ids and choose_windows(spots, 20, seed=4) != ids
    assert choose_windows(spots, 0, seed=3) == list(range(80)) == choose_windows(spots, 500, seed=3)


def test_item_windows_are_the_items_positions():
    tokens = np.arange(100, 140)
    items = [
        EvalItem(i, tokens[:t].tolist(), [tokens[t : t + 3].tolist()], "", {"doc": d, "slot": t}, tokens)
        for i, (d, t) in enumerate([(0, 4), (0, 8), (0, 12), (2, 4), (2, 16)])
    ]
    windows = item_windows(items)
    assert [(w.doc_id, w.slots, w.n_ahead) for w in windows] == [(0, [4, 8, 12], [3, 3, 3]), (2, [4, 16], [3, 3])]
    assert [(p.context_ids, p.target_ids) for p in positions_of(windows)] == [
        (it.context, it.targets[0]) for it in items
    ]
    items[1].context = items[1].context[1:]  # a context cut to data.context_len: not a whole window
    with pytest.raises(DataError, match="per_position"):
        item_windows(items)


# Harness layouts (lm-evaluation-harness 0.4.x, zero-shot): commonsense_qa's doc_to_text with the letters " A" ...
# " E" scored after it, gsm8k's "Question: ...\nAnswer:" with " <answer>" after it. Items made up for the test.
HARNESS_CSQA = [
    (
        {
            "question": {
                "stem": "  Where would you put a plate after washing it? ",
                "choices": [
                    {"label": lab, "text": t}
                    for lab, t in zip("ABCDE", ["cupboard", "table", "restaurant", "dishwasher", "flea market"])
                ],
            },
            "answerKey": "A",
        },
        "Question: Where would you put a plate after washing it?\nA. cupboard\nB. table\nC. restaurant\n"
        "D. dishwasher\nE. flea market\nAnswer:",
    ),
    (
        {  # the hub layout; braces and a colon in the texts are kept as they are
            "question": "What does {x} mean in a template?",
            "choices": {"label": list("ABCDE"), "text": ["a field", "a {brace}", "nothing", "x: y", "an error"]},
            "answerKey": "A",
        },
        "Question: What does {x} mean in a template?\nA. a field\nB. a {brace}\nC. nothing\nD. x: y\n"
        "E. an error\nAnswer:",
    ),
    (
        {
            "question": {
                "stem": "The man was cold, so what did he do?",
                "choices": [
                    {"label": lab, "text": t}
                    for lab, t in zip("ABCDE", ["put on a coat", "swim", "eat ice", "open window", "sweat"])
                ],
            },
            "answerKey": "A",
        },
        "Question: The man was cold, so what did he do?\nA. put on a coat\nB. swim\nC. eat ice\nD. open window\n"
        "E. sweat\nAnswer:",
    ),
]
HARNESS_GSM8K = [
    (
        {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=7\n#### 7"},
        "Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:",
        "7",
    ),
    (
        {"question": "Sam had $1,000 and spent $250.\nHow much is left?", "answer": "1000-250=750\n#### 750"},
        "Question: Sam had $1,000 and spent $250.\nHow much is left?\nAnswer:",
        "750",
    ),
    (
        {"question": "A tank loses 13 liters a day. By how much has it changed after a day?", "answer": "#### -13"},
        "Question: A tank loses 13 liters a day. By how much has it changed after a day?\nAnswer:",
        "-13",
    ),
]


def _encode(text: str) -> list[int]:  # one token per character: the prompt string is what is compared
    return [ord(ch) for ch in text]


def test_harness_templates_reproduce_the_harness_prompts_exactly():
    csqa = load_template("tasks/csqa_harness", {"question", "choices", *CSQA_LABELS})
    for row, expected in HARNESS_CSQA:
        prompt, targets, gold, info = _csqa_fields(row, csqa, _encode)
        assert prompt == expected
        assert targets[:5] == [_encode(f" {label}") for label in "ABCDE"]  # the harness's choices " A" ... " E"
        assert gold == "A" and info["gold_is_text"] is False  # the lettered list: the gold letter is scored
        assert _csqa_item(row, csqa) == (expected, " A", {"answer": "A"})  # training reads the same prompt
    gsm = load_template("tasks/gsm8k_harness", {"question"})
    for row, expected, answer in HARNESS_GSM8K:
        prompt, targets, gold, _ = _gsm8k_fields(row, gsm, _encode)
        assert (prompt, targets, gold) == (expected, [_encode(" " + answer)], answer)


def test_default_csqa_template_keeps_the_one_line_layout():
    """tasks/csqa names each choice ({A} ... {E}) and gives exactly the layout the code used to build; a template
    with the older {choices} field still gets it; one without the choices is a cloze prompt."""
    row, _ = HARNESS_CSQA[0]
    old_layout = (
        "Question: Where would you put a plate after washing it?\n"
        "Choices: (A) cupboard (B) table (C) restaurant (D) dishwasher (E) flea market\nAnswer:"
    )
    default = load_template("tasks/csqa", {"question", "choices", *CSQA_LABELS})
    assert _csqa_fields(row, default, _encode)[0] == old_layout
    assert _csqa_fields(row, "Question: {question}\nChoices: {choices}\nAnswer:", _encode)[0] == old_layout
    cloze = load_template("tasks/csqa_cloze", {"question", "choices", *CSQA_LABELS})
    assert _csqa_fields(row, cloze, _encode)[3]["gold_is_text"] is True
