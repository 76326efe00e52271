"""The bucketed gradient reducer (``thinkrl.distributed.grad_buckets``) on a real 2-rank gloo group: bucket boundaries,
launches from the gradient hooks in index order, a parameter used on one rank only, one never used, gradient
accumulation, and the means equal to the per-parameter all-reduce the trainer did before.

The two ranks are forked from the test process (a fresh interpreter would spend seconds importing torch) and join a
gloo group of their own, not the default group, which the test process may hold already; each sends back its
failure, if any. The 2-process training runs are in ``test_multiprocess.py``."""

from __future__ import annotations

import datetime
import multiprocessing
import traceback

import torch
import torch.distributed as dist

from thinkrl.distributed.grad_buckets import GradBucketReducer, plan_buckets

# 1 KiB buckets over these parameters (fp32 unless said): walking them in reverse, s64 (float64) has a bucket of its
# own, w3 (256 B) opens the first fp32 bucket, w2 (1 KiB) does not fit beside it, w1 (512 B) not beside w2, and
# only_rank0 and never join w1.
SHAPES = {"never": (3,), "only_rank0": (4,), "w1": (16, 8), "w2": (16, 16), "w3": (4, 16), "s64": (4,)}
EXPECTED_BUCKETS = [[5], [4], [3], [2, 1, 0]]
BUCKET_MB = 1024 / 2**20


def _params() -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)  # the same initial weights on every rank
    return {
        name: torch.nn.Parameter(
            torch.randn(shape, generator=gen, dtype=torch.float64 if name == "s64" else torch.float32)
        )
        for name, shape in SHAPES.items()
    }


def _loss(p: dict, rank: int, seed: int) -> torch.Tensor:
    """A small MLP on rank-specific data; ``only_rank0`` is used on rank 0 only, ``never`` nowhere."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * seed + rank))
    h = torch.tanh(torch.tanh(x @ p["w1"].T) @ p["w2"].T) @ p["w3"].T  # (5, 4)
    loss = (h * p["s64"].float()).pow(2).mean()
    if rank == 0:
        loss = loss + (p["only_rank0"] * h.mean(0)).sum()
    return loss


def _per_parameter_mean(params: list[torch.nn.Parameter], group) -> list[torch.Tensor]:
    """What ``Trainer._average_gradients`` did before the buckets: zeros for a missing gradient, then one all-reduce
    per parameter (sum, divided by the process count)."""
    out = []
    for p in params:
        grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(grad, group=group)
        out.append(grad / 2)
    return out


def _rank(rank: int, port: int, failures) -> None:
    try:
        torch.set_num_threads(1)
        timeout = datetime.timedelta(seconds=60)
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timeout)
        _check(rank, dist.ProcessGroupGloo(store, rank, 2, timeout))
    except BaseException:
        failures.put(f"rank {rank}: {traceback.format_exc()}")


def _check(rank: int, group) -> None:
    named = _params()
    params = list(named.values())
    assert plan_buckets(params, 1024) == EXPECTED_BUCKETS
    reducer = GradBucketReducer(params, BUCKET_MB, group)
    ids = [id(p) for p in params]
    assert [[ids.index(id(q)) for q in b.params] for b in reducer.buckets] == EXPECTED_BUCKETS

    # Record every all-reduce the reducer starts: which bucket, and whether backward was still running.
    launches, in_backward = [], [False]
    buffers = {b.buffer.data_ptr(): i for i, b in enumerate(reducer.buckets)}
    real_all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        launches.append((buffers.get(tensor.data_ptr()), in_backward[0]))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording

    def backward(seed: int) -> None:
        in_backward[0] = True
        _loss(named, rank, seed).backward()
        in_backward[0] = False

    # One backward: buckets 0-2 fill during backward and start there, in order; bucket 3 waits for `never` (and, on
    # rank 1, `only_rank0`), so finish() starts it.
    backward(seed=1)
    assert launches == [(0, True), (1, True), (2, True)], launches
    launches.clear()
    dist.all_reduce = real_all_reduce
    expected = _per_parameter_mean(params, group)
    dist.all_reduce = recording
    assert reducer.finish() == 4  # one all-reduce per bucket, not per parameter
    assert launches == [(3, False)]
    for name, p, want in zip(named, params, expected):
        assert torch.equal(p.grad, want), name  # 2 ranks: (a + b) / 2 in either path, bit for bit
    assert torch.equal(named["never"].grad, torch.zeros(3))
    assert named["only_rank0"].grad.abs().sum() > 0  # rank 0's gradient, halved, on both ranks

    # Gradient accumulation: the first backward only accumulates; the second starts the reduction of the sums.
    for p in params:
        p.grad = None
    launches.clear()
    with reducer.no_sync():
        backward(seed=2)
    assert launches == []
    backward(seed=3)
    assert [bucket for bucket, _ in launches] == [0, 1, 2]
    dist.all_reduce = real_all_reduce
    expected = _per_parameter_mean(params, group)
    assert reducer.finish() == 4
    for name, p, want in zip(named, params, expected):
        assert torch.equal(p.grad, want), name

    # A further backward after buckets were launched, without no_sync(), would be lost: it is refused.
    for p in params:
        p.grad = None
    backward(seed=4)
    try:
        backward(seed=5)
    except RuntimeError as exc:
        assert "already being reduced" in str(exc)
    else:
        raise AssertionError("a second backward after the reduction started was accepted")
    reducer.finish()  # every rank issues the same collectives
    reducer.remove()
    for p in params:
        p.grad = None
    launches.clear()
    backward(seed=6)  # no hooks any more: nothing is launched
    assert launches == []


def test_bucketed_means_equal_the_per_parameter_all_reduce_on_two_ranks():
    from launching import free_port

    fork = multiprocessing.get_context("fork")
    failures = fork.SimpleQueue()
    port = int(free_port())
    ranks = [fork.Process(target=_rank, args=(rank, port, failures)) for rank in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
        if rank.is_alive():
            rank.kill()
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, "\n".join(errors)
    assert [rank.exitcode for rank in ranks] == [0, 0]


def test_one_process_is_a_no_op():
    params = list(_params().values())
    reducer = GradBucketReducer(params, BUCKET_MB)  # no process group: one process
    _loss(dict(zip(SHAPES, params)), 0, 1).backward()
    before = [None if p.grad is None else p.grad.clone() for p in params]
    assert reducer.finish() == 0
    for p, grad in zip(params, before):
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)
