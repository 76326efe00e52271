"""Windows: the thought positions of one text window, kept together so the window is read once (parallel passes).

A text pool's documents are already windows (``context_len + n_ahead`` tokens, see ``sources._text_pools``) and each
of its positions has context ``doc[:t]``. A ``Window`` is one document with all its positions (slots); its
``positions()`` are exactly the per-position ``Position``s the pool gives for that document, in slot order, so the
two paths see the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from thinkrl.data.positions import Position, PositionPool


@dataclass
class Window:
    tokens: np.ndarray  # (L,) the document
    slots: list[int]  # context length t of each thought position, ascending
    n_ahead: list[int]  # true tokens scored after each slot
    doc_id: int = 0

    def positions(self) -> list[Position]:
        return [
            Position(self.tokens[:t].tolist(), self.tokens[t : t + n].tolist(), self.doc_id)
            for t, n in zip(self.slots, self.n_ahead)
        ]


class WindowPool(Sequence[Window]):
    """The windows of a text ``PositionPool`` (one per document that has positions), in document order."""

    def __init__(self, pool: PositionPool):
        self.pool = pool
        spots = pool.spots
        self.doc_ids = np.unique(spots[:, 0])
        self._rows = {int(d): spots[spots[:, 0] == d] for d in self.doc_ids}
        if any((rows[:, 1] > pool.context_len).any() for rows in self._rows.values()):
            raise ValueError("parallel passes need every position's context to start at its window's first token")

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, i: int) -> Window:  # type: ignore[override]
        doc = int(self.doc_ids[i])
        rows = self._rows[doc]
        order = np.argsort(rows[:, 1], kind="stable")
        return Window(self.pool.docs[doc], rows[order, 1].tolist(), rows[order, 2].tolist(), doc)

    def slots_per_window(self) -> int:
        """Slots of a typical (full) window: the most common count."""
        counts = np.asarray([len(r) for r in self._rows.values()])
        return int(np.bincount(counts).argmax())


@dataclass
class WindowBatch:
    """B windows as tensors. P = most slots in any window; padded slots have ``valid`` False and slot_len 1."""

    ids: torch.Tensor  # (B, L) right-padded with pad_id
    slot_len: torch.Tensor  # (B, P)
    valid: torch.Tensor  # (B, P) bool
    target_ids: torch.Tensor  # (B, P, n) true tokens after each slot, pad_id beyond the window
    target_mask: torch.Tensor  # (B, P, n) bool

    @property
    def num_positions(self) -> int:
        return int(self.valid.sum())


def window_batch(windows: list[Window], pad_id: int, device="cpu") -> WindowBatch:
    width = max(len(w.tokens) for w in windows)
    slots = max(len(w.slots) for w in windows)
    n = max(max(w.n_ahead) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    slot_len = torch.ones((len(windows), slots), dtype=torch.long)
    valid = torch.zeros((len(windows), slots), dtype=torch.bool)
    target_ids = torch.full((len(windows), slots, n), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(windows), slots, n), dtype=torch.bool)
    for b, w in enumerate(windows):
        tokens = torch.as_tensor(np.asarray(w.tokens), dtype=torch.long)
        ids[b, : len(tokens)] = tokens
        for p, (t, k) in enumerate(zip(w.slots, w.n_ahead)):
            y = tokens[t : t + k]
            slot_len[b, p], valid[b, p] = t, True
            target_ids[b, p, : len(y)], target_mask[b, p, : len(y)] = y, True
    return WindowBatch(ids.to(device), slot_len.to(device), valid.to(device), target_ids.to(device), target_mask.to(device))


def positions_of(windows: list[Window]) -> list[Position]:
    """The per-position view of the windows, in the order the parallel path lays out its (N, ...) tensors."""
    return [p for w in windows for p in w.positions()]
