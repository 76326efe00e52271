"""Timing for the benchmark scripts: one warm-up call, then repeated timed calls (medians resist noisy CPUs)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def timed_runs(fn: Callable[[], Any], repeats: int) -> list[tuple[Any, float]]:
    """Call ``fn`` once to warm up (caches, allocator, engine graphs), then ``repeats`` times: (result, seconds)."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append((result, time.perf_counter() - start))
    return runs


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(seconds for _, seconds in timed_runs(fn, repeats))
