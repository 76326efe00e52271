"""Evaluation items: GSM8K test, CommonsenseQA dev and held-out text positions, as token contexts plus targets.

Each item's ``context`` is what the interpreter reads; a thought goes at its end, right before the answer (or
the next true tokens). ``targets`` are the candidate continuations the item is scored on: the gold answer
(GSM8K), the five letters then the five answer texts (CSQA), or the next true tokens (text).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from thinkrl.config import Config
from thinkrl.data.sources import (
    bos_prefix,
    build_pools,
    csqa_fields,
    csqa_prompt,
    gsm8k_answer,
    load_task_rows,
    parse_rows,
    task_template,
)
from thinkrl.errors import DataError

TASKS = ("gsm8k", "csqa", "text")


@dataclass
class EvalItem:
    id: int  # row of the held-out file (text: index of the held-out position)
    context: list[int]
    targets: list[list[int]]
    gold: str  # GSM8K: the number; CSQA: the letter; text: the next tokens' text
    info: dict = field(default_factory=dict)  # question, choice labels/texts (shown in reports)


def item_seed(seed: int, item_id: int) -> int:
    """The sampling seed of one item: the same whatever the batch, the slice order or a resume."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{item_id}".encode(), digest_size=8).digest(), "little") >> 2


def choose_slice(n: int, limit: int, seed: int) -> list[int]:
    """``limit`` row indices drawn by ``seed`` (all rows, in order, when limit is 0 or covers them)."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:limit].tolist())


def _gsm8k_fields(row: dict, template: str, encode) -> tuple:
    question, answer = row["question"].strip(), gsm8k_answer(row["answer"])
    return template.format(question=question), [encode(" " + answer)], answer, {"question": question}


def _csqa_fields(row: dict, template: str, encode) -> tuple:
    stem, labels, texts, answer = csqa_fields(row)
    letters = [encode(" " + label) for label in labels]
    answers = [encode(" " + text) for text in texts]
    # Rewards and NLLs score the gold letter when the prompt lists the choices, else (cloze) the answer text.
    info = {"question": stem, "labels": labels, "texts": texts, "gold_is_text": "{choices}" not in template}
    return csqa_prompt(template, stem, labels, texts), letters + answers, answer, info


TASK_FIELDS = {"gsm8k": _gsm8k_fields, "csqa": _csqa_fields}


def _task_items(cfg: Config, tokenizer, rows: list[dict], ids: list[int]) -> list[EvalItem]:
    """(prompt, candidate targets, gold, info) per row, formatted by the task's template, as token items."""
    template, fields = task_template(cfg.data), TASK_FIELDS[cfg.data.source]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    bos = bos_prefix(tokenizer)
    parsed = parse_rows(rows, ids, lambda row: fields(row, template, encode), f"{cfg.data.source} eval")
    return [EvalItem(i, bos + encode(prompt), targets, gold, info) for i, (prompt, targets, gold, info) in parsed]


def _text_items(cfg: Config, tokenizer, limit: int, seed: int) -> list[EvalItem]:
    """Held-out positions of a text corpus (or of the synthetic task): the recipe's own evaluation pool."""
    _, pool = build_pools(cfg.data, tokenizer, cfg.trainer.seed)
    items = []
    for i in choose_slice(len(pool), limit, seed):
        pos = pool[i]
        items.append(EvalItem(i, pos.context_ids, [pos.target_ids], tokenizer.decode(pos.target_ids)))
    return items


def load_items(task: str, cfg: Config, tokenizer, limit: int, seed: int) -> list[EvalItem]:
    """The held-out items of ``task``: a reproducible slice of ``limit`` items chosen by ``seed``."""
    if task == "text":
        if cfg.data.source not in ("text", "synthetic"):
            raise DataError(
                "--task text scores the recipe's held-out positions: give --text-file or a text/synthetic recipe"
            )
        return _text_items(cfg, tokenizer, limit, seed)
    data = cfg.data
    data.source = task
    rows = load_task_rows(data, "eval")
    ids = choose_slice(len(rows), limit, seed)
    return _task_items(cfg, tokenizer, rows, ids)
