"""Timing for the benchmark scripts: one warm-up call, then repeated timed calls (medians resist noisy CPUs).

CUDA kernels run asynchronously, so the clock is read only after the GPU has finished the work queued before it."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch


def default_device() -> str:
    """What the benchmarks run on unless ``--device`` says otherwise: cuda when there is a GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    """Wait until the GPU has run everything queued (a no-op on CPU-only runs, where CUDA is never initialised)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_runs(fn: Callable[[], Any], repeats: int) -> list[tuple[Any, float]]:
    """Call ``fn`` once to warm up (caches, allocator, engine graphs), then ``repeats`` times: (result, seconds)."""
    fn()
    runs = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        runs.append((result, time.perf_counter() - start))
    return runs


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(seconds for _, seconds in timed_runs(fn, repeats))


def proc_status_kb(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM...); None where there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def max_rss_kb() -> float:
    """This process's peak resident set so far, in KiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux
