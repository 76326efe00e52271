"""Evaluation items: GSM8K test, CommonsenseQA dev and held-out text positions, as token contexts plus targets.

Each item's ``context`` is what the interpreter reads; a thought goes at its end, right before the answer (or
the next true tokens). ``targets`` are the candidate continuations the item is scored on: the gold answer
(GSM8K), the five letters then the five answer texts (CSQA), or the next true tokens (text).

Text items are single thought positions too, but the slice is drawn window by window (a window is one document of
the held-out pool: ``context_len + n_ahead`` tokens with its thought positions) so that parallel passes can read
each window once, and so that the report can show whole passages. ``item_windows`` regroups consecutive items of
one window as a ``Window``; its positions are exactly the items' (context, target) pairs, in item order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from thinkrl.config import Config
from thinkrl.data.sources import (
    build_pools,
    csqa_fields,
    csqa_lists_choices,
    csqa_prompt,
    gsm8k_answer,
    hf_item,
    load_task_rows,
    parse_rows,
    task_context,
    task_template,
)
from thinkrl.data.windows import Window
from thinkrl.errors import DataError

TASKS = ("gsm8k", "csqa", "text")


@dataclass
class EvalItem:
    id: int  # row of the held-out file (text: index of the held-out position)
    context: list[int]
    targets: list[list[int]]
    gold: str  # GSM8K: the number; CSQA: the letter; text: the next tokens' text
    info: dict = field(default_factory=dict)  # question, choice labels/texts; text: doc, slot (shown in reports)
    window: np.ndarray | None = None  # text: the whole document (window) the position belongs to


def item_seed(seed: int, item_id: int) -> int:
    """The sampling seed of one item: the same whatever the batch, the slice order or a resume."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{item_id}".encode(), digest_size=8).digest(), "little") >> 2


def choose_slice(n: int, limit: int, seed: int) -> list[int]:
    """``limit`` row indices drawn by ``seed`` (all rows, in order, when limit is 0 or covers them)."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:limit].tolist())


def choose_windows(spots: np.ndarray, limit: int, seed: int) -> list[int]:
    """Pool indices of whole windows drawn by ``seed`` until ``limit`` positions (the last window cut short to its
    first positions), in pool order; all of them when limit is 0 or covers them. ``spots`` (P, 3): doc, t, n."""
    n = len(spots)
    if not limit or limit >= n:
        return list(range(n))
    chosen, left = [], limit
    for doc in np.random.default_rng(seed).permutation(np.unique(spots[:, 0])):
        rows = np.flatnonzero(spots[:, 0] == doc)
        rows = rows[np.argsort(spots[rows, 1], kind="stable")][:left]
        chosen += rows.tolist()
        left -= len(rows)
        if left <= 0:
            break
    return sorted(chosen)


def _gsm8k_fields(row: dict, template: str, encode) -> tuple:
    question, answer = row["question"].strip(), gsm8k_answer(row["answer"])
    return template.format(question=question), [encode(" " + answer)], answer, {"question": question}


def _csqa_fields(row: dict, template: str, encode) -> tuple:
    stem, labels, texts, answer = csqa_fields(row)
    letters = [encode(" " + label) for label in labels]
    answers = [encode(" " + text) for text in texts]
    # Rewards and NLLs score the gold letter when the prompt lists the choices, else (cloze) the answer text.
    info = {"question": stem, "labels": labels, "texts": texts, "gold_is_text": not csqa_lists_choices(template)}
    return csqa_prompt(template, stem, labels, texts), letters + answers, answer, info


def _hf_fields(data, row: dict, template: str, encode) -> tuple:
    prompt, target, meta = hf_item(data)(row, template)  # an hf QA set, scored like GSM8K (one gold answer)
    question = row[data.question_field].strip()
    return prompt, [encode(target)], meta["answer"], {"question": question}


TASK_FIELDS = {"gsm8k": _gsm8k_fields, "csqa": _csqa_fields}


def _task_items(cfg: Config, tokenizer, rows: list[dict], ids: list[int]) -> list[EvalItem]:
    """(prompt, candidate targets, gold, info) per row, formatted by the task's template, as token items."""
    template = task_template(cfg.data)
    fields = partial(_hf_fields, cfg.data) if cfg.data.source == "hf" else TASK_FIELDS[cfg.data.source]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    encode_context = task_context(cfg.data, tokenizer)
    parsed = parse_rows(rows, ids, lambda row: fields(row, template, encode), f"{cfg.data.source} eval")
    return [EvalItem(i, encode_context(prompt), targets, gold, info) for i, (prompt, targets, gold, info) in parsed]


def _text_items(cfg: Config, tokenizer, limit: int, seed: int) -> list[EvalItem]:
    """Held-out positions of a text corpus (or of the synthetic task): the recipe's own evaluation pool. Text is
    sliced by whole windows (``choose_windows``); the synthetic task, one position per document, by positions."""
    _, pool = build_pools(cfg.data, tokenizer, cfg.trainer.seed)
    if cfg.data.is_text_corpus():
        ids = choose_windows(pool.spots, limit, seed)
    else:
        ids = choose_slice(len(pool), limit, seed)
    items = []
    for i in ids:
        pos, (doc, t, _) = pool[i], pool.spots[i]
        info = {"doc": int(doc), "slot": int(t)}
        target = pos.target_ids
        items.append(EvalItem(i, pos.context_ids, [target], tokenizer.decode(target), info, pool.docs[int(doc)]))
    return items


def item_windows(items: list[EvalItem]) -> list[Window]:
    """Consecutive text items of one document (slots ascending) as windows; ``positions_of`` the result gives the
    items' own (context, target) pairs in item order."""
    windows: list[Window] = []
    for it in items:
        doc, slot = it.info["doc"], it.info["slot"]
        if len(it.context) != slot:
            raise DataError(
                f"text item {it.id}: its context was cut to data.context_len, so it does not start at its window's "
                "first token; parallel passes need whole windows (rollout.thought_passes=per_position)"
            )
        last = windows[-1] if windows else None
        if last is not None and last.doc_id == doc and last.slots[-1] < slot:
            last.slots.append(slot)
            last.n_ahead.append(len(it.targets[0]))
        else:
            windows.append(Window(it.window, [slot], [len(it.targets[0])], doc))
    return windows


def load_items(task: str, cfg: Config, tokenizer, limit: int, seed: int) -> list[EvalItem]:
    """The held-out items of ``task``: a reproducible slice of ``limit`` items chosen by ``seed``."""
    if task == "text":
        if not (cfg.data.is_text_corpus() or cfg.data.source == "synthetic"):
            raise DataError(
                "--task text scores the recipe's held-out positions: give --text-file or a text/synthetic recipe"
            )
        return _text_items(cfg, tokenizer, limit, seed)
    data = cfg.data
    if not (data.source == "hf" and data.question_field and task == "gsm8k"):  # hf QA sets are scored as gsm8k
        data.source = task
    rows = load_task_rows(data, "eval")
    ids = choose_slice(len(rows), limit, seed)
    return _task_items(cfg, tokenizer, rows, ids)
