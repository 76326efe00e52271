"""Data sources → train and held-out position pools.

``synthetic`` (generated here), ``text`` (one local text file) and ``hf`` (any ``datasets`` corpus or QA set, see
``hf_sources``). ``gsm8k`` and ``csqa`` are presets of the hf path: local JSON-lines files under ``data.data_dir``
(default ``../shared/data``) read with ``datasets.load_dataset("json", ...)``, or, for users with internet, their hub
copies when the local file is absent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinkrl.config import DataConfig
from thinkrl.data.hf_sources import (
    HfSpec,
    StreamedPool,
    answer_extractor,
    check_fields,
    load_split,
    qa_fields,
    spec_from_config,
    text_datasets,
    train_and_held_out,
)
from thinkrl.data.positions import Position, PositionPool, task_pool, text_pool
from thinkrl.data.synthetic import synthetic_documents
from thinkrl.errors import DataError
from thinkrl.prompts import load_template, placeholders, task_context_encoder


@dataclass(frozen=True)
class Preset:
    """A task that is a fixed hf dataset: local files under data.data_dir, else its hub copy."""

    train_file: str
    eval_file: str
    hub_id: str
    hub_config: str | None
    hub_train: str
    hub_eval: str


PRESETS = {
    "gsm8k": Preset("gsm8k/train.jsonl", "gsm8k/test.jsonl", "openai/gsm8k", "main", "train", "test"),
    "csqa": Preset(
        "csqa/train_rand_split.jsonl", "csqa/dev_rand_split.jsonl", "tau/commonsense_qa", None, "train", "validation"
    ),
}
SYNTHETIC_TRAIN_DOCS = 20_000
CSQA_LABELS = ("A", "B", "C", "D", "E")  # every CSQA question has five choices; templates name them {A} … {E}
HF_QA_TEMPLATE = "tasks/gsm8k_harness"  # "Question: {question}\nAnswer:", the thought goes after "Answer:"


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


def preset_spec(cfg: DataConfig, split: str) -> HfSpec:
    """The hf spec of a preset task's split: its local file (data.train_file/eval_file override it), else the hub."""
    preset = PRESETS[cfg.source]
    setting = f"data.{split}_file"
    local = (cfg.train_file or preset.train_file) if split == "train" else (cfg.eval_file or preset.eval_file)
    path = resolve_data_file(cfg, local)
    if path.is_file():
        return HfSpec("json", files={split: [path]}, split=split, what=cfg.source, hint=setting)
    if cfg.hub_id or cfg.data_dir == "auto":  # only users with internet get further than load_dataset here
        hub_split = preset.hub_train if split == "train" else preset.hub_eval
        spec = HfSpec(cfg.hub_id or preset.hub_id, preset.hub_config, split=hub_split, what=cfg.source, hint=setting)
        try:
            return spec, load_split(spec, hub_split, cfg)
        except DataError:
            raise DataError(
                f"{path} does not exist and the hub copy could not be loaded; set data.data_dir to a folder with the "
                "task files"
            ) from None
    raise DataError(f"data file {path} does not exist; set data.data_dir (folder with {local}) or data.hub_id")


def load_task_rows(cfg: DataConfig, split: str):
    """The rows (a ``datasets.Dataset``) of a task's ``split`` (train | eval): a preset's, or an hf QA set's."""
    if cfg.source == "hf":
        train, held = train_and_held_out(spec_from_config(cfg), cfg)
        rows = train if split == "train" else held
        needed = {"question_field": cfg.question_field, "answer_field": cfg.answer_field}
        check_fields(rows, needed, f"hf {split} ({spec_from_config(cfg).where('train')})")
        return rows
    spec = preset_spec(cfg, split)
    if isinstance(spec, tuple):  # loaded from the hub
        spec, rows = spec
    else:
        rows = load_split(spec, split, cfg)
    if cfg.max_docs:
        rows = rows.select(range(min(cfg.max_docs, len(rows))))
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


def hf_item(cfg: DataConfig):
    """(row, template) → (prompt, " " + answer, meta) for an hf QA set: the GSM8K item with the set's own field
    names and answer extractor (the gsm8k preset is this with question/answer and the #### rule)."""
    fields = qa_fields(cfg, answer_extractor(cfg))

    def item(row: dict, template: str) -> tuple[str, str, dict]:
        question, answer = fields(row)
        return template.format(question=question), " " + answer, {"answer": answer}

    return item


def task_context(cfg: DataConfig, tokenizer):
    """``encode(prompt) -> context ids`` of a task item: bos + its tokens, or (``data.chat_template`` or a template
    with ``chat: true``) the tokens of the tokenizer's chat template around it, the thought after the generation
    prompt (``thinkrl.prompts.task_context_encoder``)."""
    name = cfg.prompt_template or (HF_QA_TEMPLATE if cfg.source == "hf" else f"tasks/{cfg.source}")
    return task_context_encoder(tokenizer, name, cfg.chat_template, cfg.system_prompt)


def task_template(cfg: DataConfig) -> str:
    """The prompt template that formats ``cfg.source``'s items (``data.prompt_template``, else ``tasks/<source>``;
    ``tasks/gsm8k_harness`` for an hf QA set)."""
    if cfg.source == "hf":
        return load_template(cfg.prompt_template or HF_QA_TEMPLATE, {"question"})
    _, allowed = TASK_ITEMS[cfg.source]
    return load_template(cfg.prompt_template or f"tasks/{cfg.source}", allowed)


def parse_rows(rows, indices, parse, what: str, where: str = ""):
    """Yield (index, parse(row)) for the given rows; a row that does not parse is a one-line error naming it (and,
    for a missing field, the fields the rows have)."""
    for i in indices:
        try:
            parsed = parse(rows[i])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            names = getattr(rows, "column_names", None)
            known = f"; its fields are {', '.join(names)}" if isinstance(exc, KeyError) and names else ""
            raise DataError(
                f"{what} row {i + 1}{where} is malformed ({type(exc).__name__}: {exc}{known}); fix or drop it"
            ) from None
        yield i, parsed


def _row_item(cfg: DataConfig):
    return hf_item(cfg) if cfg.source == "hf" else TASK_ITEMS[cfg.source][0]


def _task_pool(cfg: DataConfig, tokenizer, split: str) -> PositionPool:
    make_item = _row_item(cfg)
    template = task_template(cfg)
    contexts, targets, metas = [], [], []
    encode_context = task_context(cfg, tokenizer)
    rows = load_task_rows(cfg, split)
    where = _rows_where(cfg, split)
    for _, (context, target, meta) in parse_rows(
        rows,
        range(len(rows)),
        lambda row: make_item(row, template),
        f"{cfg.source} {split}",
        where,
    ):
        contexts.append(encode_context(context))
        targets.append(tokenizer.encode(target, add_special_tokens=False)[: cfg.n_ahead])
        metas.append(meta)
    return task_pool(contexts, targets, cfg.context_len, metas)


def _rows_where(cfg: DataConfig, split: str) -> str:
    """ " in <file>" when the split's rows are one local file's, row for row (so "row N" is its N-th row)."""
    if cfg.source in PRESETS:
        preset = PRESETS[cfg.source]
        local = (cfg.train_file or preset.train_file) if split == "train" else (cfg.eval_file or preset.eval_file)
        path = resolve_data_file(cfg, local)
        return f" ({path})" if path.is_file() else ""
    if cfg.data_files and (split == "train" or cfg.eval_file):
        spec = spec_from_config(cfg)
        return f" ({spec.where(spec.split if split == 'train' else 'eval')})"
    return ""


def _task_stream(cfg: DataConfig, tokenizer) -> StreamedPool:
    """Training items of a streamed hf QA set, one position each."""
    train, _ = train_and_held_out(spec_from_config(cfg), cfg)
    make_item, template, encode_context = hf_item(cfg), task_template(cfg), task_context(cfg, tokenizer)

    def positions(row: dict, epoch: int, index: int) -> list[Position]:
        ((_, (context, target, meta)),) = parse_rows([row], [0], lambda r: make_item(r, template), "hf train")
        ctx = encode_context(context)
        tgt = tokenizer.encode(target, add_special_tokens=False)[: cfg.n_ahead]
        return [Position(ctx[-cfg.context_len :], tgt, index, meta)]

    return StreamedPool(train, positions, cfg.context_len, cfg.shuffle_buffer)


def _windows(ids, cfg: DataConfig) -> list[np.ndarray]:
    """A token document cut into windows of context_len + n_ahead tokens (positions stay within one window)."""
    ids = np.asarray(ids, dtype=np.int64)
    span = cfg.context_len + cfg.n_ahead
    return [ids[i : i + span] for i in range(0, max(1, len(ids) - cfg.n_ahead), cfg.context_len)]


def _hf_text_pools(cfg: DataConfig, tokenizer, seed: int):
    """(train, held-out) pools of an hf text corpus (or mixture); the train pool is a StreamedPool when streaming."""
    train, held = text_datasets(cfg, seed)

    def encode(batch: dict) -> dict:
        return {"ids": [tokenizer.encode(t or "", add_special_tokens=False) for t in batch["text"]]}

    def pool(ds, pool_seed: int) -> PositionPool:
        tokenized = ds.map(encode, batched=True, remove_columns=["text"], desc="tokenizing")
        docs = [w for ids in tokenized["ids"] for w in _windows(ids, cfg) if len(ids)]
        if cfg.max_docs:
            docs = docs[: cfg.max_docs]
        return text_pool(
            docs, cfg.positions, cfg.n_ahead, cfg.context_len, cfg.every_k, cfg.positions_per_doc, pool_seed
        )

    if not cfg.streaming:
        return pool(train, seed), pool(held, seed + 1)

    def positions(row: dict, epoch: int, index: int) -> list[Position]:
        windows = [w for w in _windows(tokenizer.encode(row["text"] or "", add_special_tokens=False), cfg)]
        windows = [w for w in windows if len(w) >= cfg.n_ahead + 2]
        if not windows:
            return []
        doc_pool = text_pool(
            windows,
            cfg.positions,
            cfg.n_ahead,
            cfg.context_len,
            cfg.every_k,
            cfg.positions_per_doc,
            [seed, epoch, index],
        )
        return [Position(p.context_ids, p.target_ids, index) for p in doc_pool]

    return StreamedPool(train, positions, cfg.context_len, cfg.shuffle_buffer), pool(held, seed + 1)


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
    """(train pool, held-out pool) for ``cfg.source``; a streamed hf train split gives a ``StreamedPool``."""
    if cfg.source == "synthetic":
        return _synthetic_pools(cfg, tokenizer, seed)
    if cfg.source == "text":
        return _text_pools(cfg, tokenizer, seed)
    if cfg.is_text_corpus():  # hf text corpus or mixture
        return _hf_text_pools(cfg, tokenizer, seed)
    if cfg.streaming:
        return _task_stream(cfg, tokenizer), _task_pool(cfg, tokenizer, "eval")
    return _task_pool(cfg, tokenizer, "train"), _task_pool(cfg, tokenizer, "eval")
