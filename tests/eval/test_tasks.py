"""Text slices are drawn window by window, and ``item_windows`` regroups the items as windows."""

from __future__ import annotations

import numpy as np
import pytest

from thinkrl.data.windows import positions_of
from thinkrl.errors import DataError
from thinkrl.eval.tasks import EvalItem, choose_windows, item_windows


def _spots(windows: int, per_window: int) -> np.ndarray:
    return np.asarray([(d, 4 * (s + 1), 3) for d in range(windows) for s in range(per_window)])


def test_choose_windows_takes_whole_windows_and_cuts_the_last():
    spots = _spots(10, 8)
    ids = choose_windows(spots, 20, seed=3)
    assert len(ids) == 20 and ids == sorted(ids)
    docs, counts = np.unique(spots[ids, 0], return_counts=True)
    assert len(docs) == 3 and sorted(counts.tolist()) == [4, 8, 8]
    cut = docs[counts == 4][0]
    assert spots[ids][spots[ids, 0] == cut, 1].tolist() == [4, 8, 12, 16]  # the cut window keeps its first slots
    assert choose_windows(spots, 20, seed=3) == ids and choose_windows(spots, 20, seed=4) != ids
    assert choose_windows(spots, 0, seed=3) == list(range(80)) == choose_windows(spots, 500, seed=3)


def test_item_windows_are_the_items_positions():
    tokens = np.arange(100, 140)
    items = [
        EvalItem(i, tokens[:t].tolist(), [tokens[t : t + 3].tolist()], "", {"doc": d, "slot": t}, tokens)
        for i, (d, t) in enumerate([(0, 4), (0, 8), (0, 12), (2, 4), (2, 16)])
    ]
    windows = item_windows(items)
    assert [(w.doc_id, w.slots, w.n_ahead) for w in windows] == [(0, [4, 8, 12], [3, 3, 3]), (2, [4, 16], [3, 3])]
    assert [(p.context_ids, p.target_ids) for p in positions_of(windows)] == [
        (it.context, it.targets[0]) for it in items
    ]
    items[1].context = items[1].context[1:]  # a context cut to data.context_len: not a whole window
    with pytest.raises(DataError, match="per_position"):
        item_windows(items)
