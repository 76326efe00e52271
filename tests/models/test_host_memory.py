"""Freed host memory goes back to the system between parallel passes (``thinkrl.models.host_memory``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from stock_models import stock_model

import thinkrl.models.host_memory as hm
from thinkrl.models.parallel_passes import read_window, run_passes

glibc = pytest.mark.skipif(hm._malloc_trim() is None, reason="no glibc malloc_trim or /proc (not Linux with glibc)")

# A fresh interpreter (the allocator state of this one depends on the tests before): a freed 8 MB block lifts glibc's
# mmap threshold, so 1 MB tensors then come from the heap; small tensors allocated between them stay alive, so the
# freed 1 MB blocks are holes that stay resident until trimmed.
FRAGMENT = """
import torch
from thinkrl.models.host_memory import resident_bytes, trim
mb = lambda: resident_bytes() / 2**20
trim(growth=0)  # the starting point
x = torch.ones(2 * 2**20)
del x
big, small = [], []
for _ in range(300):
    big.append(torch.ones(2**18))
    small.append(torch.ones(16))
del big
before = mb()
kept = trim(growth=400 * 2**20)  # grown by about 300 MB since: nothing happens
after_kept = mb()
trimmed = trim(growth=200 * 2**20)
print(kept, before - after_kept, trimmed, before - mb())
"""


@glibc
def test_trim_returns_the_holes_freed_tensors_leave_once_the_process_grew_past_its_threshold():
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True)
    kept, released_kept, trimmed, released = out.stdout.split()
    assert (kept, float(released_kept)) == ("False", 0.0), "trim acted though the process grew less than its threshold"
    assert trimmed == "True" and float(released) > 200, f"trim released {released} MB of 300 MB of freed holes"


@glibc
def test_passes_trim_after_each_forward_and_before_each_backward(monkeypatch):
    calls = []
    monkeypatch.setattr(hm, "trim", lambda: calls.append(torch.is_grad_enabled()))  # the threshold aside
    model = stock_model("llama-gqa")
    ids = torch.randint(0, 40, (2, 12))
    slot_len = torch.tensor([[2, 5, 9, 12], [3, 4, 7, 11]])
    read = read_window(model, ids)
    history: dict = {}
    hidden = [run_passes(model, read, torch.randint(0, 40, (2, 2, 4, 1)), slot_len, s, history)[0] for s in range(3)]
    assert len(calls) == 3  # one per forward
    torch.stack(hidden).sum().backward()
    assert len(calls) == 6  # and one as the backward reaches each pass
    with torch.no_grad():  # sampling without grad: no hook, one trim per pass
        run_passes(model, read_window(model, ids), torch.randint(0, 40, (2, 2, 4, 1)), slot_len)
    assert len(calls) == 7
