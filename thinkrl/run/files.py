"""What a run writes besides checkpoints: metrics.jsonl, rollout dumps, summary.json, results.md. Main process only."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import: eval.report writes its files through write_atomic and stays cheap to import
    import torch


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write via a temporary file in the same folder and os.replace, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")


def dump_rollouts(path: Path, step: int, tokenizer, positions, thoughts, out) -> None:
    """Decoded thoughts with their rewards and advantages, one JSON object per position; ``copies_first`` /
    ``copies_target``: the thought contains y_1 / the whole target as a contiguous run (``rl.copy_gauge``). A run
    that did not score the null thought (``learner.score_null``) has no rewards against it: no ``reward``,
    ``per_token_reward`` or ``nll_null``."""
    from thinkrl.rl.copy_gauge import copy_flags  # torch: imported by a run, not by this module

    k = thoughts.num_thoughts
    first, whole = copy_flags(thoughts.thought_ids, thoughts.lengths, out.scores.target_ids, out.scores.target_mask)
    with path.open("w", encoding="utf-8") as fh:
        for i, pos in enumerate(positions):
            items = []
            for j in range(k):
                z = thoughts.thought_ids[i, j, : int(thoughts.lengths[i, j])].tolist()
                items.append(
                    {
                        "text": tokenizer.decode(z),
                        "length": len(z),
                        "finished": bool(thoughts.finished[i, j]),
                        "copies_first": bool(first[i, j]),
                        "copies_target": bool(whole[i, j]),
                        "advantage": round(float(out.advantages[i, j]), 5),
                    }
                )
                if out.rewards is not None:  # None: the null thought was the reference and was not scored
                    items[-1]["reward"] = round(float(out.rewards[i, j]), 5)
                    items[-1]["per_token_reward"] = [
                        round(float(v), 5) for v in out.per_token_rewards[i, j][out.scores.target_mask[i]]
                    ]
            record = {
                "step": step,
                "context": tokenizer.decode(pos.context_ids[-200:]),
                "target": tokenizer.decode(pos.target_ids),
            }
            if out.scores.has_null:
                record["nll_null"] = round(-float(out.scores.logp[i, -1].detach()[out.scores.target_mask[i]].sum()), 5)
            fh.write(json.dumps({**record, "thoughts": items}) + "\n")


def write_summary(run_dir: Path, initial: dict, final: dict, extra: dict) -> None:
    from thinkrl.run.heldout import EVAL_KEYS  # models and torch: imported by a run, not by this module

    summary = {"initial_eval": initial, "final_eval": final, **extra}
    write_atomic(
        run_dir / "summary.json", json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2, default=_clean)
    )
    lines = ["| metric | initial | final | change |", "|---|---|---|---|"]
    for key in EVAL_KEYS:
        a, b = initial.get(key), final.get(key)
        if a is None or b is None:
            continue
        lines.append(f"| {key} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    gain = lambda e: e["nll_null"] - e["nll_thought"]  # noqa: E731
    lines.append(
        f"| nll_null - nll_thought | {gain(initial):.4f} | {gain(final):.4f} | {gain(final) - gain(initial):+.4f} |"
    )
    body = "\n".join(lines)
    write_atomic(
        run_dir / "results.md",
        f"# {run_dir.name}\n\nHeld-out evaluation before and after training "
        f"({final.get('positions', '?')} positions, NLL in nats per target token).\n\n{body}\n",
    )


def mean_or_nan(t: torch.Tensor) -> float:
    return float(t.float().mean()) if t.numel() else float("nan")
