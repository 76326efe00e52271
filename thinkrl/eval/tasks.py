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
    TASK_ITEMS,
    bos_prefix,
    build_pools,
    csqa_fields,
    csqa_prompt,
    gsm8k_answer,
    load_task_rows,
)
from thinkrl.errors import DataError
from thinkrl.prompts import load_template

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


def _malformed(task: str, row_index: int, exc: Exception) -> DataError:
    return DataError(f"{task} row {row_index + 1} is malformed ({type(exc).__name__}: {exc}); fix or drop it")


def _gsm8k_items(cfg: Config, tokenizer, rows: list[dict], ids: list[int]) -> list[EvalItem]:
    _, allowed = TASK_ITEMS["gsm8k"]
    template = load_template(cfg.data.prompt_template or "tasks/gsm8k", allowed)
    bos, items = bos_prefix(tokenizer), []
    for i in ids:
        try:
            question, answer = rows[i]["question"].strip(), gsm8k_answer(rows[i]["answer"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed("gsm8k", i, exc) from None
        context = bos + tokenizer.encode(template.format(question=question), add_special_tokens=False)
        target = tokenizer.encode(" " + answer, add_special_tokens=False)
        items.append(EvalItem(i, context, [target], answer, {"question": question}))
    return items


def _csqa_items(cfg: Config, tokenizer, rows: list[dict], ids: list[int]) -> list[EvalItem]:
    _, allowed = TASK_ITEMS["csqa"]
    template = load_template(cfg.data.prompt_template or "tasks/csqa", allowed)
    bos, items = bos_prefix(tokenizer), []
    for i in ids:
        try:
            stem, labels, texts, answer = csqa_fields(rows[i])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed("csqa", i, exc) from None
        context = bos + tokenizer.encode(csqa_prompt(template, stem, labels, texts), add_special_tokens=False)
        letters = [tokenizer.encode(" " + label, add_special_tokens=False) for label in labels]
        answers = [tokenizer.encode(" " + text, add_special_tokens=False) for text in texts]
        # Rewards and NLLs score the gold letter when the prompt lists the choices, else (cloze) the answer text.
        info = {"question": stem, "labels": labels, "texts": texts, "gold_is_text": "{choices}" not in template}
        items.append(EvalItem(i, context, letters + answers, answer, info))
    return items


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
    return (_gsm8k_items if task == "gsm8k" else _csqa_items)(cfg, tokenizer, rows, ids)
