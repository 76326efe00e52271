"""Data sources → train and held-out position pools.

Local files under ``data.data_dir`` come first (default ``../shared/data``); for users with internet a
``data.hub_id`` (or the task's usual one) is loaded with ``datasets`` when the local file is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from thinkrl.config import DataConfig
from thinkrl.data.positions import PositionPool, task_pool, text_pool
from thinkrl.data.synthetic import synthetic_documents
from thinkrl.errors import DataError
from thinkrl.prompts import bos_prefix, load_template, placeholders

# task → (local train file, local held-out file, hub id, hub config, hub train split, hub held-out split)
TASK_FILES = {
    "gsm8k": ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "openai/gsm8k", "main", "train", "test"),
    "csqa": (
        "csqa/train_rand_split.jsonl",
        "csqa/dev_rand_split.jsonl",
        "tau/commonsense_qa",
        None,
        "train",
        "validation",
    ),
}
SYNTHETIC_TRAIN_DOCS = 20_000
CSQA_LABELS = ("A", "B", "C", "D", "E")  # every CSQA question has five choices; templates name them {A} … {E}


def resolve_data_file(cfg: DataConfig, name: str) -> Path:
    """Absolute paths as given; otherwise the data folder's file, falling back to the working directory."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    data_dir = cfg.resolved_data_dir()
    if data_dir is not None and ((data_dir / name).exists() or not path.exists()):
        return data_dir / name
    return path


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it") from None


def read_jsonl(path: Path, limit: int = 0) -> list[dict]:
    """Rows of a JSON-lines file; a broken row is a one-line error with its line number."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or delete that line") from None
        if limit and len(rows) >= limit:
            break
    return rows


def load_task_rows(cfg: DataConfig, split: str) -> list[dict]:
    train_file, eval_file, hub_id, hub_cfg, hub_train, hub_eval = TASK_FILES[cfg.source]
    local = cfg.train_file or train_file if split == "train" else cfg.eval_file or eval_file
    path = resolve_data_file(cfg, local)
    if path.is_file():
        rows = read_jsonl(path, cfg.max_docs)
    elif cfg.hub_id or cfg.data_dir == "auto":
        import datasets  # only users with internet reach this

        try:
            ds = datasets.load_dataset(
                cfg.hub_id or hub_id, hub_cfg, split=hub_train if split == "train" else hub_eval
            )
        except Exception as exc:  # offline, wrong id...
            raise DataError(
                f"{path} does not exist and the hub copy could not be loaded ({type(exc).__name__}); "
                "set data.data_dir to a folder with the task files"
            ) from None
        rows = [dict(r) for r in (ds.select(range(min(cfg.max_docs, len(ds)))) if cfg.max_docs else ds)]
    else:
        raise DataError(f"data file {path} does not exist; set data.data_dir (folder with {local}) or data.hub_id")
    if not rows:
        raise DataError(f"{path} holds no rows; point data.{split}_file at a non-empty file")
    return rows


def gsm8k_answer(solution: str) -> str:
    """The gold number after ``####``, commas stripped."""
    match = re.search(r"####\s*(.+)\s*$", solution.strip())
    if not match:
        raise ValueError("no '#### <answer>' line")
    return match.group(1).replace(",", "").strip()


def _gsm8k_item(row: dict, template: str) -> tuple[str, str, dict]:
    answer = gsm8k_answer(row["answer"])
    return template.format(question=row["question"].strip()), " " + answer, {"answer": answer}


def csqa_fields(row: dict) -> tuple[str, list[str], list[str], str]:
    """(question stem, choice labels, choice texts, answer label) from either CSQA layout."""
    q = row["question"]
    if isinstance(q, dict):  # official release: {"stem", "choices": [{"label", "text"}]}
        stem, labels, texts = q["stem"], [c["label"] for c in q["choices"]], [c["text"] for c in q["choices"]]
    else:  # hub form: question str, choices {"label": [...], "text": [...]}
        stem, labels, texts = q, row["choices"]["label"], row["choices"]["text"]
    answer = row["answerKey"]
    if answer not in labels:
        raise ValueError(f"answerKey {answer!r} is not a choice label")
    return stem.strip(), list(labels), list(texts), answer


def csqa_prompt(template: str, stem: str, labels: list[str], texts: list[str]) -> str:
    """A CSQA template filled: ``{question}``, each choice's text by its label (``{A}`` … ``{E}``), and
    ``{choices}``, the one-line ``(A) text (B) text ...`` list that templates written before the per-label fields
    use. The layout is the template's: ``tasks/csqa`` (the default), ``tasks/csqa_harness`` (lm-evaluation-harness)."""
    choices = " ".join(f"({label}) {text}" for label, text in zip(labels, texts))
    return template.format(question=stem, choices=choices, **dict(zip(labels, texts)))


def csqa_lists_choices(template: str) -> bool:
    """Whether a CSQA template shows the lettered choices (scored: the gold letter) or is a cloze prompt that
    shows the question alone (scored: the gold answer text)."""
    return bool(placeholders("csqa", template) & {"choices", *CSQA_LABELS})


def _csqa_item(row: dict, template: str) -> tuple[str, str, dict]:
    stem, labels, texts, answer = csqa_fields(row)
    return csqa_prompt(template, stem, labels, texts), " " + answer, {"answer": answer}


TASK_ITEMS = {"gsm8k": (_gsm8k_item, {"question"}), "csqa": (_csqa_item, {"question", "choices", *CSQA_LABELS})}


def task_template(cfg: DataConfig) -> str:
    """The prompt template that formats ``cfg.source``'s items (``data.prompt_template`` or ``tasks/<source>``)."""
    _, allowed = TASK_ITEMS[cfg.source]
    return load_template(cfg.prompt_template or f"tasks/{cfg.source}", allowed)


def parse_rows(rows: list[dict], indices, parse, what: str):
    """Yield (index, parse(row)) for the given rows; a row that does not parse is a one-line error naming it."""
    for i in indices:
        try:
            parsed = parse(rows[i])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{what} row {i + 1} is malformed ({type(exc).__name__}: {exc}); fix or drop it") from None
        yield i, parsed


def _task_pool(cfg: DataConfig, tokenizer, split: str) -> PositionPool:
    make_item, _ = TASK_ITEMS[cfg.source]
    template = task_template(cfg)
    contexts, targets, metas = [], [], []
    bos = bos_prefix(tokenizer)
    rows = load_task_rows(cfg, split)
    for _, (context, target, meta) in parse_rows(
        rows, range(len(rows)), lambda row: make_item(row, template), f"{cfg.source} {split}"
    ):
        contexts.append(bos + tokenizer.encode(context, add_special_tokens=False))
        targets.append(tokenizer.encode(target, add_special_tokens=False)[: cfg.n_ahead])
        metas.append(meta)
    return task_pool(contexts, targets, cfg.context_len, metas)


def _text_pools(cfg: DataConfig, tokenizer, seed: int) -> tuple[PositionPool, PositionPool]:
    train_path = resolve_data_file(cfg, cfg.train_file)
    if not train_path.is_file():
        raise DataError(f"data file {train_path} does not exist; set data.train_file (or data.data_dir)")
    text = read_text(train_path)
    if cfg.eval_file:
        eval_path = resolve_data_file(cfg, cfg.eval_file)
        if not eval_path.is_file():
            raise DataError(f"data file {eval_path} does not exist; set data.eval_file or leave it empty")
        eval_text = read_text(eval_path)
    else:  # hold out the tail: text later in the file than anything trained on
        cut = int(len(text) * 0.9)
        text, eval_text = text[:cut], text[cut:]
    if not text.strip():
        raise DataError(f"{train_path} is empty; give a text file with content")

    def pool(body: str, pool_seed: int) -> PositionPool:
        ids = np.asarray(tokenizer.encode(body, add_special_tokens=False), dtype=np.int64)
        # Documents are windows of context_len + n_ahead tokens so positions stay within one window.
        span = cfg.context_len + cfg.n_ahead
        docs = [ids[i : i + span] for i in range(0, max(1, len(ids) - cfg.n_ahead), cfg.context_len)]
        if cfg.max_docs:
            docs = docs[: cfg.max_docs]
        return text_pool(
            docs, cfg.positions, cfg.n_ahead, cfg.context_len, cfg.every_k, cfg.positions_per_doc, pool_seed
        )

    return pool(text, seed), pool(eval_text, seed + 1)


def _synthetic_pools(cfg: DataConfig, tokenizer, seed: int) -> tuple[PositionPool, PositionPool]:
    def pool(contexts: list[str], targets: list[str]) -> PositionPool:
        enc = lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]  # noqa: E731
        return task_pool([[tokenizer.bos_token_id] + c for c in enc(contexts)], enc(targets), cfg.context_len)

    train = synthetic_documents(cfg.synthetic, cfg.max_docs or SYNTHETIC_TRAIN_DOCS, 2 * seed)
    # Held-out documents come from another seed and drop any that also occur in training.
    seen = set(train[0])
    candidates = synthetic_documents(cfg.synthetic, 4 * cfg.eval_positions, 2 * seed + 1)
    held_out = [(c, t) for c, t in zip(*candidates) if c not in seen][: cfg.eval_positions]
    if not held_out:
        raise DataError("every held-out synthetic document also occurs in training; enlarge data.synthetic sizes")
    return pool(*train), pool([c for c, _ in held_out], [t for _, t in held_out])


def build_pools(cfg: DataConfig, tokenizer, seed: int) -> tuple[PositionPool, PositionPool]:
    """(train pool, held-out pool) for ``cfg.source``."""
    if cfg.source == "synthetic":
        return _synthetic_pools(cfg, tokenizer, seed)
    if cfg.source == "text":
        return _text_pools(cfg, tokenizer, seed)
    return _task_pool(cfg, tokenizer, "train"), _task_pool(cfg, tokenizer, "eval")
