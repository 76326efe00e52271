"""Hand freed host memory back to the operating system between parallel passes (glibc ``malloc_trim``).

Why: on CPU every parallel pass allocates and frees many tensors of 0.1–4 MB (per-chunk queries, scores, partial
outputs) between the tensors that outlive it (the pass's keys/values in the thought history, a checkpointed layer's
inputs). glibc serves such sizes from its heap once a freed block has raised its mmap threshold (dynamically, up to
32 MB) and keeps the freed holes between live tensors as resident memory. Measured on the 512-wide model (2 layers,
2 windows of 512 tokens, K = 2, thought 6, checkpointed): the process grew by 2.0 GB while the tensors saved for the
backward held 0.3 GB, and peaked at 2.6 GB. Trimming after each pass's forward and before each pass's backward gave
a peak of 1.6 GB in the same time (52 s); a fixed 128 KB mmap threshold gave 1.3 GB but took 1.4× as long, since every
tensor then comes zeroed from the kernel. Trimming costs time where passes are small, so it happens only once the
process has grown by ``TRIM_GROWTH`` since the last trim (docs/every-token.md has the long-window figures).

No effect (and no cost) elsewhere: CUDA tensors, or a C library without ``malloc_trim`` (macOS, musl)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

# Trim only when the process has grown by this much since the last trim: each trim returns the free pages, and the
# next allocations fault them in again (zeroed by the kernel). Measured on the Quiet-STaR preset (128 wide, 4 layers,
# 128-token windows, 2.1 s steps): trimming after every pass took its step to 3.2 s; its resident size stops growing
# after the first steps (the heap's holes are reused), so this rule trims there twice in 12 steps, at no cost seen
# above the steps' ±15% scatter.
TRIM_GROWTH = 512 * 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_after_last_trim = [0]  # resident bytes right after the last trim


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` on Linux (resident size from /proc), or None."""
    if not os.path.exists("/proc/self/statm"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def trim(growth: int = TRIM_GROWTH) -> bool:
    """Return the heap's free pages to the system if the process grew by more than ``growth`` bytes since the last
    trim (glibc on Linux; elsewhere nothing); says whether it trimmed."""
    fn = _malloc_trim()
    if fn is None or resident_bytes() - _after_last_trim[0] <= growth:
        return False
    fn(0)
    _after_last_trim[0] = resident_bytes()
    return True


def trim_around_pass(hidden: torch.Tensor) -> None:
    """After a pass's forward on CPU: trim now, and again when the backward reaches this pass (a hook on its
    output), where the recomputed layers and the gradients of the next pass down take the place of the freed ones."""
    if hidden.device.type != "cpu" or _malloc_trim() is None:
        return
    trim()
    if hidden.requires_grad:
        hidden.register_hook(_trim_hook)


def _trim_hook(grad: torch.Tensor) -> None:
    trim()
