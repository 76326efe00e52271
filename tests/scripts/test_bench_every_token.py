"""scripts/bench_every_token.py --quick runs end to end and writes a row per path, the trainer's own step included
(about 30-60 s on 2 CPU cores)."""

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
    report = json.loads(out.read_text())
    rows = report["rows"]
    measured = [r for r in rows if r["status"] == "measured"]
    assert {r["path"] for r in measured} == {"parallel", "per_position", "plain", "trainer"}
    for r in measured:
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert all(math.isfinite(s) and s > 0 for s in r["runs"]), r
        if r["path"] != "trainer":  # the trainer column has no memory figure
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
    # The trainer's own step (a real `thinkrl train`): its timing/* phases, at the isolated step's shapes. Its
    # positions per step are counted from its rollout dumps, so a trainer that ran other windows, another batch or
    # other thoughts fails here.
    trainer = at_64["trainer"]
    assert len(trainer["runs"]) == 1  # --quick: repeats 1, the trainer's first step is left out like a warm-up
    assert {"rollout", "score_and_loss", "backward", "optimizer", "other"} <= set(trainer["phases"]), trainer
    assert all(math.isfinite(v) and v >= 0 for v in trainer["phases"].values()), trainer
    assert sum(v for k, v in trainer["phases"].items() if k != "other") <= trainer["seconds"] + 1e-9, trainer
    assert trainer["positions"] == at_64["parallel"]["positions"] == 2 * (64 - 2 - 1), trainer
    assert trainer["positions_per_step"] == [trainer["positions"]], trainer
    assert trainer["windows"] == 2 and trainer["window_tokens"] == 64, trainer
    assert trainer["thought_lens_seen"] == [4] and trainer["thoughts_per_position"] == [2], trainer
    assert trainer["target_lens_seen"] == [2], trainer
    line = next(x for x in report["summary"] if x["seq"] == 64)
    assert line["trainer_s"] == trainer["seconds"] and line["trainer_positions"] == line["positions"]
    assert line["trainer_plain"] > 0 and line["trainer_par"] > 0
    assert "trn/plain" in done.stdout and "N trn" in done.stdout


def test_origin_fit_measures_the_worst_point():
    """The thought-length check of bench_every_token: a line through the origin and its largest relative miss."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_every_token import origin_fit
    finally:
        sys.path.pop(0)
    slope, worst = origin_fit([8, 10, 12, 16], [4.0, 5.0, 6.0, 8.0])
    assert slope == pytest.approx(0.5) and worst == pytest.approx(0.0, abs=1e-12)
    # A fixed cost (here 2 s) makes a line through the origin miss the shortest thought most.
    slope, worst = origin_fit([8, 10, 12, 16], [6.0, 7.0, 8.0, 10.0])
    assert worst == pytest.approx(abs(6.0 / (slope * 8) - 1)) and worst > 0.1
