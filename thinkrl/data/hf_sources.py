"""``data.source = hf``: any ``datasets`` corpus or QA set, read with ``datasets.load_dataset``.

A *spec* names one dataset split: a hub id (``data.hub_id``, ``data.hub_config``) or local files (``data.data_files``,
the builder picked from the extension: parquet, json/jsonl, csv, arrow, txt). Text corpora give ``data.text_field``
documents; QA sets give one item per row from ``data.question_field`` / ``data.answer_field`` and an answer
extractor. GSM8K and CSQA are presets of this path (``sources.PRESETS``).

What ``datasets`` does here: loading (and its cache), ``select``, ``shuffle``/``set_epoch`` buffer shuffles when
streaming, ``interleave_datasets`` for mixtures, ``map`` for tokenizing text. What it does not do well is say which
line of a file is broken; on a load failure the JSON-lines files are scanned once to name the line.

Streaming (``data.streaming``) yields documents in a buffer-shuffled order (``IterableDataset.shuffle(seed,
buffer_size)``, reshuffled per epoch with ``set_epoch``): it is deterministic for a seed but not the non-streamed
order. Resume is exact: the stream's state is (epoch, documents done, positions of the current document done) and a
resumed stream reads (without tokenizing) the rows before that point again. ``IterableDataset.state_dict()`` is not
used because ``datasets`` drops the shuffle buffer's content from it (it refills the buffer on resume, so the order
after a resume would differ).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from thinkrl.errors import ConfigError, DataError

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}


# ----------------------------------------------------------------------------------------------------------------
# configuration rules (called from DataConfig.__post_init__)
# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# specs and loading
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class HfSpec:
    """One dataset to read: a hub id or a builder over local files, and its splits."""

    path: str  # hub id, or builder name (json, parquet, ...) for local files
    name: str | None = None  # hub configuration
    files: dict[str, list[Path]] = field(default_factory=dict)  # split → local files
    split: str = "train"
    eval_split: str = ""
    text_field: str = "text"
    weight: float = 1.0
    what: str = "hf"  # names the source in messages ("gsm8k", "hf", "data.mixture[1]")
    hint: str = "data.data_files"  # the setting that points at the files (for messages)

    def where(self, split: str) -> str:
        files = self.files.get(split)
        return ", ".join(map(str, files)) if files else f"{self.path} split {split!r}"


def builder_for(files: list[Path], setting: str) -> str:
    kinds = {BUILDERS.get("".join(p.suffixes[-1:]).lower()) for p in files}
    if None in kinds:
        bad = next(p for p in files if p.suffix.lower() not in BUILDERS)
        raise ConfigError(f"{setting}: cannot tell the format of {bad}; use .parquet, .json(l), .csv, .arrow or .txt")
    if len(kinds) > 1:
        raise ConfigError(f"{setting} mixes formats ({', '.join(sorted(kinds))}); give files of one format")
    return kinds.pop()


def local_files(cfg, names, setting: str) -> list[Path]:
    from thinkrl.data.sources import resolve_data_file

    names = [names] if isinstance(names, str) else list(names)
    paths = [resolve_data_file(cfg, str(n)) for n in names]
    for path in paths:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist; fix {setting} (paths, or relative to data.data_dir)")
    return paths


def spec_from_config(cfg, entry: Mapping | None = None, what: str = "hf") -> HfSpec:
    """The spec of ``data.*`` (or of one ``data.mixture`` entry, its keys over data.*)."""
    get = (lambda k: entry.get(k, getattr(cfg, k))) if entry is not None else (lambda k: getattr(cfg, k))
    files, eval_split = {}, cfg.eval_split
    setting = f"{what}.data_files" if entry is not None else "data.data_files"
    data_files = entry.get("data_files", []) if entry is not None else cfg.data_files
    if data_files:
        files["train"] = local_files(cfg, data_files, setting)
        if entry is None and cfg.eval_file:
            files["eval"] = local_files(cfg, cfg.eval_file, "data.eval_file")
            eval_split = "eval"
        path = builder_for([*files["train"], *files.get("eval", [])], setting)
        split = "train"
    else:
        path, split = get("hub_id"), get("split")
    return HfSpec(
        path,
        get("hub_config") or None,
        files,
        split,
        eval_split if entry is None else "",
        get("text_field"),
        float(entry.get("weight", 1.0)) if entry is not None else 1.0,
        what,
        setting,
    )


def _datasets():
    import datasets

    datasets.disable_progress_bars()  # one bar per tiny local file is noise; errors still say what went wrong
    return datasets


def _broken_json_line(files: list[Path]) -> str | None:
    """``file:line (reason)`` of the first line of a JSON-lines file that does not parse, if any."""
    for path in files:
        if path.suffix.lower() != ".jsonl":
            continue
        with path.open(encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as exc:
                        return f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or delete that line"
    return None


def load_split(spec: HfSpec, split: str, cfg, streaming: bool = False):
    """``datasets.load_dataset`` for one split of ``spec`` (a Dataset, or an IterableDataset when streaming)."""
    datasets = _datasets()
    files = spec.files.get(split) if spec.files else None
    kwargs = {"cache_dir": cfg.cache_dir or None, "streaming": streaming}
    try:
        if spec.files:
            ds = datasets.load_dataset(spec.path, data_files={split: [str(p) for p in files]}, split=split, **kwargs)
        else:
            ds = datasets.load_dataset(spec.path, spec.name, split=split, **kwargs)
    except Exception as exc:  # datasets raises many kinds; the user needs the file and what to do
        broken = _broken_json_line(files or [])
        if broken:
            raise DataError(broken) from None
        if files and all(_blank(p) for p in files):
            raise DataError(
                f"{spec.what} {split} ({spec.where(split)}) holds no rows; point {spec.hint} at non-empty data"
            ) from None
        reason = _first_line(exc)
        if files:
            raise DataError(f"{spec.what}: could not read {spec.where(split)} ({reason}); check the file") from None
        raise DataError(
            f"{spec.what}: could not load {spec.path!r} split {split!r} ({reason}); check data.hub_id/split, the "
            "network, or use local files (data.data_files)"
        ) from None
    if not streaming and len(ds) == 0:
        raise DataError(
            f"{spec.what} {split} ({spec.where(split)}) holds no rows; point {spec.hint} at non-empty data"
        )
    return ds


def _blank(path: Path) -> bool:
    """Whether a file holds no rows (datasets fails on such files instead of giving an empty split)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not parquet after all: datasets' own error says so
            return False
    with path.open("rb") as fh:
        return not any(chunk.strip() for chunk in iter(lambda: fh.read(1 << 20), b""))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    while exc.__cause__ is not None and not text:
        exc = exc.__cause__
        text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def column_names(ds) -> list[str]:
    names = ds.column_names
    if names is None:  # a stream whose features are unknown until read
        first = next(iter(ds.take(1)), None)
        names = list(first) if first is not None else []
    return list(names)


def check_fields(ds, needed: dict[str, str], what: str) -> None:
    """A missing column is one line naming the setting and the columns that exist."""
    names = column_names(ds)
    for setting, name in needed.items():
        if name not in names:
            raise DataError(
                f"{what} has no field {name!r} (fields: {', '.join(names) or 'none'}); "
                f"set data.{setting} to one of them"
            )


def train_and_held_out(spec: HfSpec, cfg):
    """(train, held-out) datasets of ``spec``: the eval split when there is one, else the last ``eval_docs`` rows
    of the training split (streaming: the first ones, since a stream has no end to cut from). ``data.max_docs``
    caps each."""
    streaming = cfg.streaming
    train = load_split(spec, spec.split, cfg, streaming)
    if spec.eval_split:
        held = load_split(spec, spec.eval_split, cfg, streaming=False)
    elif streaming:
        held = _datasets().Dataset.from_list(list(train.take(cfg.eval_docs)))
        train = train.skip(cfg.eval_docs)
        if len(held) == 0:
            raise DataError(
                f"{spec.what} {spec.split} ({spec.where(spec.split)}) holds no rows; point {spec.hint} "
                "at non-empty data"
            )
    else:
        n = len(train)
        if n <= cfg.eval_docs:
            raise DataError(
                f"{spec.what} {spec.split} has {n} rows, not more than data.eval_docs={cfg.eval_docs} held out; lower "
                "data.eval_docs or give data.eval_split (data.eval_file)"
            )
        held = train.select(range(n - cfg.eval_docs, n))
        train = train.select(range(n - cfg.eval_docs))
    if cfg.max_docs:
        train = train.take(cfg.max_docs) if streaming else train.select(range(min(cfg.max_docs, len(train))))
        held = held.select(range(min(cfg.max_docs, len(held))))
    return train, held


def text_datasets(cfg, seed: int):
    """(train, held-out) text datasets with one column ``text``: one source, or the weighted mixture."""
    datasets = _datasets()
    if not cfg.mixture:
        spec = spec_from_config(cfg)
        train, held = train_and_held_out(spec, cfg)
        check_fields(train, {"text_field": spec.text_field}, f"{spec.what} {spec.where(spec.split)}")
        return _as_text(train, spec.text_field), _as_text(held, spec.text_field)
    specs = [spec_from_config(cfg, dict(e), f"data.mixture[{i}]") for i, e in enumerate(cfg.mixture)]
    trains, helds = [], []
    for spec in specs:
        train, held = train_and_held_out(spec, cfg)
        check_fields(train, {"text_field": spec.text_field}, f"{spec.what} {spec.where(spec.split)}")
        trains.append(_as_text(train, spec.text_field))
        helds.append(_as_text(held, spec.text_field))
    total = sum(s.weight for s in specs)
    mixed = datasets.interleave_datasets(
        trains, probabilities=[s.weight / total for s in specs], seed=seed, stopping_strategy="first_exhausted"
    )
    return mixed, datasets.concatenate_datasets(helds)


def _as_text(ds, text_field: str):
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


# ----------------------------------------------------------------------------------------------------------------
# QA items
# ----------------------------------------------------------------------------------------------------------------
def answer_extractor(cfg) -> Callable[[str], str]:
    """The gold answer from an answer field's text; a ValueError names what is missing."""
    kind = cfg.answer_extractor
    if kind == "gsm8k":
        from thinkrl.data.sources import gsm8k_answer

        return gsm8k_answer
    if kind == "regex":
        pattern = re.compile(cfg.answer_regex)

        def by_regex(text: str) -> str:
            match = pattern.search(text)
            if match is None:
                raise ValueError(f"data.answer_regex {cfg.answer_regex!r} does not match")
            return (match.group(1) if pattern.groups else match.group(0)).strip()

        return by_regex
    if kind == "math-verify":
        from math_verify import parse

        def by_math_verify(text: str) -> str:
            parsed = parse(text)  # [sympy value, the answer's text] or [] when nothing parses
            if len(parsed) < 2:
                raise ValueError("math-verify found no final answer")
            return str(parsed[1]).strip()

        return by_math_verify
    return lambda text: text.strip()


def qa_fields(cfg, extract: Callable[[str], str]) -> Callable[[dict], tuple[str, str]]:
    """row → (question, gold answer) for an hf QA set."""

    def fields(row: dict) -> tuple[str, str]:
        answer = row[cfg.answer_field]
        if not isinstance(answer, str):
            answer = str(answer)
        return row[cfg.question_field].strip(), extract(answer)

    return fields


# ----------------------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------------------
class StreamedPool:
    """Training positions of a streamed dataset, document by document (no random access, no length).

    ``documents(seed, epoch, skip)`` yields each document's positions in the buffer-shuffled order of ``epoch``,
    starting after ``skip`` documents (read again, not tokenized). ``PositionStream`` walks it."""

    def __init__(self, dataset, to_positions: Callable[[dict, int, int], list], context_len: int, buffer: int):
        self.dataset, self.to_positions, self.context_len, self.buffer = dataset, to_positions, context_len, buffer

    def documents(self, seed: int, epoch: int, skip: int = 0) -> Iterator[list]:
        ds = self.dataset.shuffle(seed=seed, buffer_size=self.buffer) if self.buffer else self.dataset
        ds.set_epoch(epoch)
        for index, row in enumerate(itertools.islice(iter(ds), skip, None), skip):
            yield self.to_positions(row, epoch, index)
