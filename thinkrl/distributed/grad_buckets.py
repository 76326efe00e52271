"""Bucketed data-parallel gradient averaging for unsharded multi-process runs: what DDP's reducer does inside.

The role models run unwrapped (the scorer reads hidden states and LM heads directly and reuses KV caches), so DDP's
wrapper cannot average their gradients; ``Trainer._average_gradients`` does, through a ``GradBucketReducer``:

- the parameters are packed into flat buckets of about ``trainer.grad_bucket_mb`` MB (DDP's default: 25) in reverse
  order, roughly the order backward produces their gradients, one dtype and device per bucket;
- a post-accumulate-grad hook marks each parameter ready; during the backward that precedes an optimizer step, a
  bucket whose parameters are all ready is copied into its buffer and all-reduced asynchronously (gloo on CPU, NCCL
  on GPUs: the default process group accelerate created) while backward goes on; earlier backwards of an
  accumulated step run under ``no_sync()`` and only accumulate;
- ``finish()``, between backward and the optimizer step, reduces the buckets no hook completed (a parameter without
  a gradient counts as zeros, as in the per-parameter loop), waits for every bucket and writes the mean (sum, then
  divided by the process count) back into each ``p.grad``.

Every process must issue the same collectives in the same order whatever gradients it saw. A parameter that gets a
gradient on one process and none on another (DDP's "unused parameter" hazard) would otherwise complete buckets in a
different order on each, and mismatched all-reduces mix buckets or hang. So buckets launch in index order only: a
hook launches the ready buckets up to the first one still waiting, and ``finish()`` launches the rest in order. A
process whose first bucket waits for a parameter it never uses overlaps nothing, and still gets the right answer.

With 2 processes each element's result is ``(a + b) / 2`` in either path, so the per-parameter loop (kept as
``trainer.grad_bucket_mb=0``, the baseline of ``scripts/bench_grad_buckets.py``) and the buckets agree exactly;
with more, only the order of fp32 additions can differ. Simplified against DDP: no rebuilding of the buckets in the
gradient order observed at the first step, no small first bucket, and gradients are copied into and out of the
buffers rather than being views of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate

import torch
import torch.distributed as dist


@dataclass
class Bucket:
    """One flat buffer of gradients: ``params[i]`` occupies ``buffer[offsets[i] : offsets[i] + numel]``."""

    params: list[torch.nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor  # (total numel,), the params' dtype and device
    ready: set[int] = field(default_factory=set)  # indices into params marked ready in this backward

    def slices(self):
        for p, offset in zip(self.params, self.offsets):
            yield p, self.buffer[offset : offset + p.numel()].view_as(p)


def plan_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[int]]:
    """Indices into ``params`` per bucket, in launch order: walking the parameters in reverse, each joins the open
    bucket of its dtype and device, which is closed first when the parameter would take it past ``bucket_bytes``
    (a parameter larger than that gets a bucket of its own)."""
    buckets: list[list[int]] = []
    open_bucket: dict[tuple, tuple[int, int]] = {}  # (dtype, device) → (bucket index, bytes in it)
    for i in reversed(range(len(params))):
        p = params[i]
        key, size = (p.dtype, p.device), p.numel() * p.element_size()
        index, used = open_bucket.get(key, (None, 0))
        if index is None or used + size > bucket_bytes:
            index, used = len(buckets), 0
            buckets.append([])
        buckets[index].append(i)
        open_bucket[key] = (index, used + size)
    return buckets


class GradBucketReducer:
    """Averages the gradients of ``params`` over the processes of ``group`` (default: the default process group) in
    buckets of ``bucket_mb`` MB; a no-op (no hooks, no collectives) with one process. ``overlap=False`` reduces
    every bucket in ``finish()``, after backward (the benchmark's middle setting)."""

    def __init__(self, params: list[torch.nn.Parameter], bucket_mb: float, group=None, overlap: bool = True):
        unique = list({id(p): p for p in params}.values())  # a parameter listed twice is reduced once
        self.params, self.bucket_mb, self.group = unique, bucket_mb, group
        initialized = group is not None or (dist.is_available() and dist.is_initialized())
        self.world = dist.get_world_size(group) if initialized else 1
        self.buckets: list[Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # param index → (bucket, position in it)
        for b, indices in enumerate(plan_buckets(unique, int(bucket_mb * 2**20))):
            members = [unique[i] for i in indices]
            ends = list(accumulate(p.numel() for p in members))
            buffer = torch.empty(ends[-1], dtype=members[0].dtype, device=members[0].device)
            offsets = [0, *ends[:-1]]
            self.buckets.append(Bucket(members, offsets, buffer))
            self._where.update({i: (b, j) for j, i in enumerate(indices)})
        self.overlap = overlap  # False: hooks only check; every bucket starts in finish() (a benchmark's control)
        self._sync = True
        self._launched = 0  # buckets launched in this round: always a prefix 0 .. _launched - 1
        self._works: list = []
        self._handles = []
        if self.world > 1:
            self._handles = [
                p.register_post_accumulate_grad_hook(partial(self._ready, i)) for i, p in enumerate(unique)
            ]

    def covers(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether this reducer was built for exactly these parameters."""
        return [id(p) for p in {id(p): p for p in params}.values()] == [id(p) for p in self.params]

    @contextmanager
    def no_sync(self):
        """Backwards inside only accumulate gradients (gradient accumulation); the backward right before the
        optimizer step runs outside and starts the reduction."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _ready(self, index: int, param: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: ``param.grad`` holds its whole gradient for this backward."""
        b, j = self._where[index]
        if b < self._launched:
            raise RuntimeError(
                "a gradient arrived for a parameter whose bucket was already being reduced: a second backward "
                "before the optimizer step must run under GradBucketReducer.no_sync() (gradient accumulation), "
                "and each parameter may reach its gradient only once per backward (no reentrant checkpointing)"
            )
        if not (self._sync and self.overlap):
            return
        self.buckets[b].ready.add(j)
        while self._launched < len(self.buckets) and self._complete(self._launched):
            self._launch()

    def _complete(self, b: int) -> bool:
        bucket = self.buckets[b]
        return len(bucket.ready) == len(bucket.params)

    def _launch(self) -> None:
        """Copy the next bucket's gradients (zeros where a parameter has none) into its buffer and start its sum."""
        bucket = self.buckets[self._launched]
        for p, flat in bucket.slices():
            if p.grad is None:
                flat.zero_()
            else:
                flat.copy_(p.grad)
        self._works.append(dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        self._launched += 1

    def finish(self) -> int:
        """Reduce what is left, wait for every bucket and write each mean into ``p.grad``; returns the number of
        all-reduces this round issued (0 with one process)."""
        if self.world == 1:
            return 0
        while self._launched < len(self.buckets):  # in index order: the same sequence on every process
            self._launch()
        for work in self._works:
            work.wait()
        for bucket in self.buckets:
            bucket.buffer.div_(self.world)
            for p, flat in bucket.slices():
                if p.grad is None:
                    p.grad = flat.clone()
                else:
                    p.grad.copy_(flat)
            bucket.ready.clear()
        count = self._launched
        self._launched, self._works = 0, []
        return count

    def remove(self) -> None:
        """Unregister the hooks (the trainer switches reducers when it trains another parameter list)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
