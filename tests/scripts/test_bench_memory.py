"""scripts/bench_memory.py --quick runs end to end: every variant in its own process, same loss, finite figures."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "scripts/bench_memory.py", "--quick", "--device", "cpu", "--variants", "full,lean+gc"]
    done = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", "lean+gc"} and result["device"] == "cpu"
    for row in rows.values():
        for step in ("step1", "step2"):
            assert math.isfinite(row[step]["peak_mb"]) and row[step]["seconds"] > 0, row
    assert rows["lean+gc"]["step1"]["loss"] == pytest.approx(rows["full"]["step1"]["loss"], abs=1e-4)
    assert "ratio" in done.stdout and "device    cpu" in done.stdout
