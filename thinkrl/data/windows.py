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
        spots = pool.spots[np.lexsort((pool.spots[:, 1], pool.spots[:, 0]))]  # by document, then position
        self.doc_ids, starts = np.unique(spots[:, 0], return_index=True)
        self._rows = dict(zip(self.doc_ids.tolist(), np.split(spots, starts[1:])))
        if (spots[:, 1] > pool.context_len).any():
            raise ValueError("parallel passes need every position's context to start at its window's first token")

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, i: int) -> Window:  # type: ignore[override]
        doc = int(self.doc_ids[i])
        rows = self._rows[doc]
        return Window(self.pool.docs[doc], rows[:, 1].tolist(), rows[:, 2].tolist(), doc)

    def slots_per_window(self) -> int:
        """Slots of a typical (full) window: the most common count."""
        counts = np.asarray([len(r) for r in self._rows.values()])
        return int(np.bincount(counts).argmax())


@dataclass
class WindowBatch:
    """B windows as tensors. P = most slots in any window; padded slots have ``valid`` False (their slot_len repeats
    the window's last one)."""

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
        slot_len[b, len(w.slots) :] = w.slots[-1]  # padding slots repeat the last context: slots stay ascending
    return WindowBatch(
        ids.to(device), slot_len.to(device), valid.to(device), target_ids.to(device), target_mask.to(device)
    )


def positions_of(windows: list[Window]) -> list[Position]:
    """The per-position view of the windows, in the order the parallel path lays out its (N, ...) tensors."""
    return [p for w in windows for p in w.positions()]


def batch_positions(batch: WindowBatch) -> tuple[list[list[int]], list[list[int]]]:
    """(contexts, targets) of the valid slots, as the per-position path reads them, in the parallel path's order."""
    ids, lens = batch.ids.tolist(), batch.slot_len.tolist()
    tgt, tmask = batch.target_ids.tolist(), batch.target_mask.tolist()
    contexts, targets = [], []
    for b, row in enumerate(batch.valid.tolist()):
        for p, ok in enumerate(row):
            if ok:
                contexts.append(ids[b][: lens[b][p]])
                targets.append([t for t, keep in zip(tgt[b][p], tmask[b][p]) if keep])
    return contexts, targets


def take_positions(windows: list[Window], n: int) -> list[Window]:
    """The windows covering the first ``n`` positions (the last one cut short): the same positions as the first n
    of the per-position pool, which lists a document's positions together and in order."""
    out, left = [], n
    for w in windows:
        if left <= 0:
            break
        out.append(Window(w.tokens, w.slots[:left], w.n_ahead[:left], w.doc_id))
        left -= len(out[-1].slots)
    return out


def group_windows(windows: list[Window], max_positions: int) -> list[list[Window]]:
    """Consecutive groups of windows with at most ``max_positions`` positions each (at least one window)."""
    groups, current, count = [], [], 0
    for w in windows:
        if current and count + len(w.slots) > max_positions:
            groups.append(current)
            current, count = [], 0
        current.append(w)
        count += len(w.slots)
    if current:
        groups.append(current)
    return groups
