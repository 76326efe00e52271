"""Study (d), stage 1: LM-adapt a model until its held-out NLL flattens, by a rule fixed before the run.

Trains ``--config`` (a ``learner.objective=lm`` recipe with ``trainer.eval_every`` set) in chunks of ``--chunk``
steps, resuming the same run folder each time, and after each chunk end S reads the held-out curve
(``eval/nll_base`` in metrics.jsonl). It stops at the first S where

    NLL(0.8·S) − NLL(S) < --min-gain        (less than that gained over the last 20% of steps)

or at ``--max-steps``. The decision, the rule and the curve go to ``<run>/adaptation.json``. Rerunning after a
stop resumes the run and re-applies the rule, so nothing is lost.

    python scripts/adapt_until_flat.py --config configs/smollm2/study_d_adapt.yaml \
        --out runs/study-smollm2-d-start/adapt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def held_out_curve(run: Path) -> dict[int, float]:
    """{step: eval/nll_base} from the run's metrics (a resumed run may log a step twice: the last one wins)."""
    curve: dict[int, float] = {}
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "eval/nll_base" in row:
                curve[int(row["step"])] = float(row["eval/nll_base"])
    return curve


def flat_at(curve: dict[int, float], steps: int, min_gain: float) -> tuple[bool, float | None]:
    """Whether NLL(0.8·steps) − NLL(steps) < min_gain, and that gain (None while either point is missing)."""
    early = round(0.8 * steps)
    if early not in curve or steps not in curve:
        return False, None
    gain = curve[early] - curve[steps]
    return gain < min_gain, gain


def _done_steps(run: Path) -> int:
    return int(json.loads((run / "summary.json").read_text()).get("steps", 0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="the adaptation run's folder (trainer.output_dir)")
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--min-gain", type=float, default=0.01)
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for thinkrl train")
    args = p.parse_args()
    thinkrl = os.environ.get("THINKRL", "thinkrl")
    run = Path(args.out)
    steps, flat, gain = 0, False, None
    while steps < args.max_steps:
        steps += args.chunk
        flat, gain = flat_at(held_out_curve(run), steps, args.min_gain)
        if gain is None or not (run / "summary.json").is_file() or _done_steps(run) < steps:  # not trained that far
            cmd = [
                thinkrl,
                "train",
                "--config",
                args.config,
                f"trainer.output_dir={run}",
                f"trainer.max_steps={steps}",
            ]
            subprocess.run(cmd + args.overrides, check=True)
            flat, gain = flat_at(held_out_curve(run), steps, args.min_gain)
        print(f"adaptation: {steps} steps, held-out gain over the last 20%: {gain}", flush=True)
        if flat:
            break
    decision = {
        "rule": f"stop at the first multiple S of {args.chunk} steps where NLL(0.8*S) - NLL(S) < {args.min_gain} "
        f"(eval/nll_base on the held-out tail of the training text), at most {args.max_steps} steps",
        "steps": steps,
        "flat": flat,
        "gain_last_20pct": gain,
        "curve": held_out_curve(run),
    }
    (run / "adaptation.json").write_text(json.dumps(decision, indent=1) + "\n")
    print(json.dumps({k: v for k, v in decision.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
