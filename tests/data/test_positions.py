"""Thought positions: slicing of context/target windows, position placement in text, and the resumable stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from thinkrl.data.positions import Position, PositionPool, PositionStream, task_pool, text_pool
from thinkrl.errors import DataError


# ----------------------------------------------------------------------------------------------------------------
# PositionPool / task_pool
# ----------------------------------------------------------------------------------------------------------------
def test_pool_cuts_context_and_target_by_hand():
    docs = [np.arange(10), np.arange(100, 106)]
    spots = [(0, 4, 3), (0, 9, 3), (1, 2, 2), (0, 2, 1)]
    pool = PositionPool(docs, np.asarray(spots), context_len=3, metas=[{"answer": "a"}, {"answer": "b"}])

    assert len(pool) == 4
    p = pool[0]
    assert isinstance(p, Position)
    assert p.context_ids == [1, 2, 3]  # doc[:4] left-truncated to the last 3 tokens
    assert p.target_ids == [4, 5, 6]
    assert p.doc_id == 0 and p.meta == {"answer": "a"}
    # near the end of a document the target is what is left
    assert pool[1].context_ids == [6, 7, 8] and pool[1].target_ids == [9]
    # second document: shorter context than context_len is kept whole
    assert pool[2].context_ids == [100, 101] and pool[2].target_ids == [102, 103]
    assert pool[2].doc_id == 1 and pool[2].meta == {"answer": "b"}
    assert pool[3].context_ids == [0, 1] and pool[3].target_ids == [2]
    # plain python ints (they are fed to tokenizers / torch.tensor) and iteration ends cleanly
    assert all(type(v) is int for v in pool[0].context_ids + pool[0].target_ids)
    assert [q.target_ids for q in pool] == [[4, 5, 6], [9], [102, 103], [2]]


def test_pool_without_metas_gives_empty_meta():
    pool = PositionPool([np.arange(5)], np.asarray([[0, 2, 2]]), context_len=8)
    assert pool[0].meta == {}
    assert pool[0].context_ids == [0, 1] and pool[0].target_ids == [2, 3]


def test_task_pool_one_position_before_each_target():
    contexts = [[1, 2, 3, 4, 5], [6, 7], [8]]
    targets = [[50, 51], [60], [70, 71, 72]]
    metas = [{"i": 0}, {"i": 1}, {"i": 2}]
    pool = task_pool(contexts, targets, context_len=16, metas=metas)
    assert len(pool) == 3
    for i in range(3):
        assert pool[i].context_ids == contexts[i]
        assert pool[i].target_ids == targets[i]
        assert pool[i].doc_id == i and pool[i].meta == metas[i]


def test_task_pool_left_truncates_context():
    pool = task_pool([[1, 2, 3, 4, 5], [6, 7]], [[50, 51], [60]], context_len=3)
    assert pool[0].context_ids == [3, 4, 5]  # the end (next to the target) is kept, the start dropped
    assert pool[0].target_ids == [50, 51]
    assert pool[1].context_ids == [6, 7]
    assert pool[1].target_ids == [60]


# ----------------------------------------------------------------------------------------------------------------
# text_pool
# ----------------------------------------------------------------------------------------------------------------
def test_text_pool_every_k_positions():
    doc = np.arange(1000, 1050)
    pool = text_pool([doc], "every_k", n_ahead=3, context_len=100, every_k=8)
    ts = [int(t) for _, t, _ in pool.spots]
    # t = context length; multiples of 8 that leave 3 true tokens after them (t <= 47)
    assert ts == [8, 16, 24, 32, 40]
    for p, t in zip(pool, ts):
        assert p.context_ids == list(range(1000, 1000 + t))
        assert p.target_ids == list(range(1000 + t, 1000 + t + 3))


def test_text_pool_every_k_with_context_truncation_and_several_docs():
    docs = [np.arange(0, 40), np.arange(500, 507), np.arange(900, 902)]
    pool = text_pool(docs, "every_k", n_ahead=2, context_len=5, every_k=10)
    by_doc = {}
    for (d, t, n), p in zip(pool.spots.tolist(), pool):
        by_doc.setdefault(d, []).append(t)
        assert n == 2 and len(p.target_ids) == 2
        assert len(p.context_ids) == min(5, t)
        assert p.context_ids == docs[d][:t][-5:].tolist()
        assert p.target_ids == docs[d][t : t + 2].tolist()
    assert by_doc[0] == [10, 20, 30]
    # a document with fewer valid positions than every_k still gets one position, at its end
    assert by_doc[1] == [5]
    # a document too short for any position (needs >= n_ahead + 2 tokens) is skipped
    assert 2 not in by_doc


def test_text_pool_random_positions_reproducible():
    docs = [np.arange(200), np.arange(1000, 1090)]
    kw = dict(n_ahead=4, context_len=32, per_doc=3)
    a = text_pool(docs, "random", seed=7, **kw)
    b = text_pool(docs, "random", seed=7, **kw)
    c = text_pool(docs, "random", seed=8, **kw)
    assert np.array_equal(a.spots, b.spots)
    assert not np.array_equal(a.spots, c.spots)
    for d, doc in enumerate(docs):
        ts = a.spots[a.spots[:, 0] == d, 1]
        valid_count = len(doc) - 4 - 1  # t in [2, len - n_ahead]
        assert len(ts) == 3 * max(1, valid_count // 32)  # per_doc per context window
        assert len(set(ts.tolist())) == len(ts)  # no repeated position
        assert ts.min() >= 2 and ts.max() <= len(doc) - 4
    assert all(len(p.target_ids) == 4 for p in a)


def test_text_pool_too_short_documents_error():
    docs = [np.arange(5), np.arange(3)]
    with pytest.raises(DataError) as err:
        text_pool(docs, "every_k", n_ahead=4, context_len=16)
    msg = str(err.value)
    assert "6 tokens" in msg and "data.n_ahead" in msg


def test_text_pool_unknown_mode_error():
    with pytest.raises(DataError, match="every_k or random"):
        text_pool([np.arange(50)], "task", n_ahead=2, context_len=16)


# ----------------------------------------------------------------------------------------------------------------
# PositionStream
# ----------------------------------------------------------------------------------------------------------------
def _numbered_pool(n: int) -> PositionPool:
    """Position i has target [i], so a batch is identified by its targets."""
    return task_pool([[1000 + i] for i in range(n)], [[i] for i in range(n)], context_len=4)


def _ids(batch: list[Position]) -> list[int]:
    return [p.target_ids[0] for p in batch]


def test_stream_covers_pool_once_per_epoch():
    stream = PositionStream(_numbered_pool(10), seed=3)
    epoch1 = _ids(stream.next_batch(5)) + _ids(stream.next_batch(5))
    epoch2 = _ids(stream.next_batch(4)) + _ids(stream.next_batch(6))
    assert sorted(epoch1) == list(range(10))
    assert sorted(epoch2) == list(range(10))
    assert epoch1 != epoch2  # reshuffled each epoch
    assert epoch1 != list(range(10))  # shuffled at all


def test_stream_batch_across_epoch_boundary():
    stream = PositionStream(_numbered_pool(7), seed=0)
    seen = []
    for _ in range(7):  # 7 batches of 3 = 3 full epochs
        batch = stream.next_batch(3)
        assert len(batch) == 3
        seen += _ids(batch)
    for e in range(3):
        assert sorted(seen[7 * e : 7 * (e + 1)]) == list(range(7))
    assert stream.state_dict()["epoch"] == 2


def test_stream_same_seed_same_order_other_seed_other_order():
    pool = _numbered_pool(12)
    a = _ids(PositionStream(pool, seed=5).next_batch(24))
    b = _ids(PositionStream(pool, seed=5).next_batch(24))
    c = _ids(PositionStream(pool, seed=6).next_batch(24))
    assert a == b
    assert a != c


@pytest.mark.parametrize("consumed", [0, 4, 10, 13, 23])
def test_stream_resume_gives_same_next_batches(consumed):
    pool = _numbered_pool(10)
    a = PositionStream(pool, seed=11)
    if consumed:
        a.next_batch(consumed)
    state = json.loads(json.dumps(a.state_dict()))  # a checkpoint holds plain JSON values

    b = PositionStream(pool, seed=999)  # seed is part of the state
    b.next_batch(3)  # and whatever b did before is overwritten
    b.load_state_dict(state)
    for n in (4, 7, 10):
        assert _ids(b.next_batch(n)) == _ids(a.next_batch(n))
    assert b.state_dict() == a.state_dict()


def test_stream_empty_pool_error():
    empty = PositionPool([], np.zeros((0, 3), dtype=np.int64), context_len=4)
    with pytest.raises(DataError, match="no thought positions"):
        PositionStream(empty, seed=0)
