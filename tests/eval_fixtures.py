"""Tiny GSM8K/CSQA rows and the byte-level scratch-model overrides the eval tests share."""

from __future__ import annotations

import json

TINY_BYTE = [
    "model.tokenizer=byte",
    "model.weight_groups=[A,A,A]",
    "model.freeze=[]",
    "head.form=none",
    "data.interpreter_window=0",
    "rollout.max_thought_len=4",
    "trainer.report_to=none",
]
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=7\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs in 2 boxes?", "answer": "#### 24"},
    {"question": "Sam had $1,000 and spent $250. How much is left?", "answer": "#### 750"},
    {"question": "What is 9 minus 4?", "answer": "#### 5"},
    {"question": "What is 6 times 7?", "answer": "#### 42"},
]
CSQA_ROWS = [
    {
        "question": {"stem": stem, "choices": [{"label": lab, "text": t} for lab, t in zip("ABCDE", texts)]},
        "answerKey": key,
    }
    for stem, texts, key in [
        ("Where do fish live?", ["desert", "water", "sky", "oven", "moon"], "B"),
        ("What melts in the sun?", ["ice", "rock", "iron", "glass", "wood"], "A"),
        ("What do bees make?", ["milk", "silk", "honey", "wool", "salt"], "C"),
        ("Where do you sleep?", ["sink", "road", "roof", "bed", "pond"], "D"),
    ]
]


def write_eval_data(tmp_path):
    """A data folder with the rows above in the layout of ../shared/data."""
    for name, rows in (("gsm8k/test.jsonl", GSM8K_ROWS), ("csqa/dev_rand_split.jsonl", CSQA_ROWS)):
        path = tmp_path / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"
