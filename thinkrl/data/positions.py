"""Thought positions: where in a token stream a thought is written, and the true tokens y that follow.

Every source (synthetic task, plain text, GSM8K, CSQA) ends up as token documents plus *spots*
``(doc, t, n)``: context ``x = doc[:t]`` (left-truncated to ``context_len``) and target ``y = doc[t:t+n]``.
Windows are cut lazily, so a corpus with many positions costs one token array, not one list per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from thinkrl.errors import DataError


@dataclass
class Position:
    """One thought position. ``context_ids`` ends at the token after which the thought is written."""

    context_ids: list[int]
    target_ids: list[int]
    doc_id: int = 0
    meta: dict = field(default_factory=dict)


class PositionPool(Sequence[Position]):
    """Positions over token documents, cut on access."""

    def __init__(self, docs: list[np.ndarray], spots: np.ndarray, context_len: int, metas: list[dict] | None = None):
        self.docs = docs
        self.spots = np.asarray(spots, dtype=np.int64).reshape(-1, 3)  # (P, 3): doc, t, n
        self.context_len = context_len
        self.metas = metas

    def __len__(self) -> int:
        return len(self.spots)

    def __getitem__(self, i: int) -> Position:  # type: ignore[override]
        doc, t, n = (int(v) for v in self.spots[i])
        tokens = self.docs[doc]
        meta = self.metas[doc] if self.metas is not None else {}
        return Position(tokens[max(0, t - self.context_len) : t].tolist(), tokens[t : t + n].tolist(), doc, meta)


def task_pool(contexts: list[list[int]], targets: list[list[int]], context_len: int, metas: list[dict] | None = None):
    """One position per item, just before its target (e.g. before a GSM8K answer)."""
    docs = [np.asarray(c + t, dtype=np.int64) for c, t in zip(contexts, targets)]
    spots = np.asarray([(i, len(c), len(t)) for i, (c, t) in enumerate(zip(contexts, targets))], dtype=np.int64)
    return PositionPool(docs, spots, context_len, metas)


def text_pool(
    docs: list[np.ndarray],
    mode: str,
    n_ahead: int,
    context_len: int,
    every_k: int = 16,
    per_doc: int = 4,
    seed: int = 0,
) -> PositionPool:
    """Positions inside plain text: every k-th token or ``per_doc`` random ones per context window.

    A position needs at least one context token and ``n_ahead`` true tokens after it."""
    rng = np.random.default_rng(seed)
    spots = []
    for d, tokens in enumerate(docs):
        valid = np.arange(2, len(tokens) - n_ahead + 1)  # t: context length; >= 2 keeps a non-empty shared prefix
        if len(valid) == 0:
            continue
        if mode == "every_k":
            chosen = valid[(valid % every_k) == 0] if len(valid) >= every_k else valid[-1:]
        elif mode == "random":
            windows = max(1, len(valid) // context_len)
            chosen = np.sort(rng.choice(valid, size=min(len(valid), per_doc * windows), replace=False))
        else:
            raise DataError(f"text positions must be every_k or random, got {mode}")
        spots.extend((d, int(t), n_ahead) for t in chosen)
    if not spots:
        raise DataError(
            f"no thought positions: every document is shorter than {n_ahead + 2} tokens; lower data.n_ahead"
        )
    return PositionPool(docs, np.asarray(spots), context_len)


class PositionStream:
    """Endless shuffled batches over a pool, one reshuffle per epoch; its state is two integers (for resume).

    A streamed pool (``hf_sources.StreamedPool``: ``documents(seed, epoch, skip)``) is walked document by document
    in its buffer-shuffled order instead; then ``index`` counts the documents done in the epoch and ``offset`` the
    positions of the current one, and a resumed stream continues at exactly that position."""

    def __init__(self, pool, seed: int):
        self.streamed = hasattr(pool, "documents")
        if not self.streamed and len(pool) == 0:
            raise DataError(
                "the training set has no thought positions; check data.source/train_file and data.max_docs"
            )
        self.pool, self.seed = pool, seed
        self.epoch, self.index, self.offset = 0, 0, 0
        self._docs, self._current, self._fresh = None, None, True  # streamed: document iterator, its positions
        self._order = None if self.streamed else self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pool))

    def next_batch(self, n: int) -> list[Position]:
        if self.streamed:
            return self._next_streamed(n)
        batch = []
        while len(batch) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            batch.append(self.pool[int(self._order[self.index])])
            self.index += 1
        return batch

    def _next_streamed(self, n: int) -> list[Position]:
        batch = []
        while len(batch) < n:
            if self._current is None:
                if self._docs is None:
                    self._docs, self._start = self.pool.documents(self.seed, self.epoch, self.index), self.index
                self._current = next(self._docs, None)
                if self._current is None:  # the epoch is over
                    if self._fresh and self._start == 0:  # a whole epoch without one
                        raise DataError("the streamed training split gave no thought positions; check data.* fields")
                    self.epoch, self.index, self.offset, self._docs, self._fresh = self.epoch + 1, 0, 0, None, True
                    continue
            if self.offset < len(self._current):
                batch.append(self._current[self.offset])
                self.offset += 1
                self._fresh = False
            if self.offset >= len(self._current):
                self.index, self.offset, self._current = self.index + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "index": self.index, "seed": self.seed}
        return {**state, "offset": self.offset} if self.streamed else state

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        if self.streamed:
            self.offset = state.get("offset", 0)
            self._docs, self._current, self._fresh = None, None, True
        else:
            self._order = self._permutation()
