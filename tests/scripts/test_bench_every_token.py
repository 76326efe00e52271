"""scripts/bench_every_token.py --quick runs end to end and writes a row per path (about 20-50 s on 2 CPU cores)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_every_token_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "scripts/bench_every_token.py", "--quick", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    measured = [r for r in rows if r["status"] == "measured"]
    assert {r["path"] for r in measured} == {"parallel", "per_position", "plain"}
    for r in measured:
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert all(math.isfinite(s) and s > 0 for s in r["runs"]), r
        assert math.isfinite(r["peak_mb"]), r
    at_64 = {r["path"]: r for r in measured if r["seq"] == 64}
    assert {"parallel", "per_position"} <= set(at_64)
    assert at_64["parallel"]["positions"] == at_64["per_position"]["positions"] == 2 * (64 - 2 - 1)
    # Same seeds, same thoughts: the two thought paths compute the same loss.
    assert at_64["parallel"]["loss"] == pytest.approx(at_64["per_position"]["loss"], abs=1e-4)
    # README's peak memory, parallel / per-position, quotes 71 / 356 MB at window 64 (a ratio of 5): the
    # per-position path holds every position's own sequence, the parallel one reads the window once.
    assert at_64["per_position"]["peak_mb"] > 2.5 * at_64["parallel"]["peak_mb"] > 0, at_64
    assert "parallel" in done.stdout and "skipped (est." not in done.stdout
