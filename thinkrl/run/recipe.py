"""A run folder means one recipe: the ``config.yaml`` it records.

``thinkrl train`` on a folder that already holds a run continues that run, so it must be the same recipe.
``check_run_folder`` runs before anything is built or written (every process reaches the same verdict from the same
files) and refuses, in one line naming the differing keys, a recipe that differs from the recorded one in anything
but ``MAY_CHANGE_ON_RESUME``:

- a complete checkpoint to resume: the checkpoint's run folder must record the same recipe;
- no checkpoint but outputs of an earlier start (metrics.jsonl lines, summary.json): the same recipe starts again
  from step 0 and those stale outputs are cleared (before, a restart appended a second step 0 to metrics.jsonl);
  another recipe is refused, since its metrics would be read as this folder's run;
- ``trainer.resume=never`` into a folder holding checkpoints is refused: a fresh run would interleave its
  checkpoints with the old ones, ``keep_checkpoints`` would delete the new ones (the old steps are higher), and a
  later ``auto`` resume would pick the old run up again;
- a folder with only a config.yaml (a start that failed before any output) may start over with another recipe.

A folder holding a run but no config.yaml (written by hand, or before config.yaml existed) cannot be checked; it
resumes with a warning.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

from thinkrl.errors import ConfigError

logger = logging.getLogger(__name__)

# Keys (fnmatch patterns over dotted names) a resumed run may change: they say how long a run goes, what it logs
# and keeps, and how its work is laid out on the machine, never what a step computes.
MAY_CHANGE_ON_RESUME = (
    # length and place: a longer max_steps continues the same run; a moved folder records its old output_dir
    "trainer.max_steps",
    "trainer.max_flops",
    "trainer.compute_match",
    "trainer.output_dir",
    "trainer.resume",
    # cadence and logging (held-out evaluation draws from its own generator, not the training RNG)
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.dump_rollouts",
    "trainer.progress",
    "trainer.report_to",
    "trainer.project",
    "trainer.run_name",
    # machine layout: checkpoints resume across sharded/unsharded and process counts (distributed/checkpoint.py), and
    # every position has its own sampling seed whatever the sampling batch
    "trainer.num_threads",
    "trainer.sharding",
    "model.sharded_loading",  # a resumed run loads its weights from the checkpoint anyway
    "trainer.grad_bucket_mb",
    "rollout.batch_positions",
    # memory knobs that compute the same values; the vLLM engine's size and cache blocks, not its samples
    "model.default.gradient_checkpointing",
    "model.groups.*.gradient_checkpointing",
    "learner.lean_losses",
    "rollout.vllm_kv_cache_gb",
    "rollout.vllm_gpu_memory_utilization",
    "rollout.vllm_block_size",
    # where and how the engine runs: a served engine samples the same thoughts as a colocated one from the same
    # weights and seeds (tests/rollout/test_vllm_server.py), and both sync paths deliver the same weights
    "rollout.vllm_mode",
    "rollout.vllm_transfer",
    "rollout.vllm_urls",
    "rollout.vllm_sync",
    "rollout.vllm_sync_timeout_s",
    "rollout.vllm_enforce_eager",
    "rollout.vllm_sleep",
)
# Not listed, so refused: rollout.backend (hf and vLLM draw different thoughts from the same seeds, and vLLM samples
# with stale weights between syncs), rollout.async_steps (how stale every later step's rollouts are), data.data_dir
# (another folder may hold other data), trainer.batch_positions, trainer.seed and every recipe field.

STALE_OUTPUTS = ("metrics.jsonl", "summary.json", "results.md")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → {dotted key: leaf}; lists are leaves (compared whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def may_change(key: str, patterns: tuple[str, ...] = MAY_CHANGE_ON_RESUME) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


_UNSET = object()  # a key one of the two recipes lacks


def _show(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return "''" if value == "" else str(value)


def recipe_changes(recorded: dict, current: dict, patterns: tuple[str, ...] = MAY_CHANGE_ON_RESUME) -> list[str]:
    """``key (old → new)`` for every dotted key whose value differs, except those matching ``patterns``."""
    old, new = flatten(recorded), flatten(current)
    keys = list(old) + [k for k in new if k not in old]
    return [
        f"{k} ({_show(old.get(k, _UNSET))} → {_show(new.get(k, _UNSET))})"
        for k in keys
        if old.get(k, _UNSET) != new.get(k, _UNSET) and not may_change(k, patterns)
    ]


def recorded_recipe(run_dir: Path) -> dict | None:
    """The resolved recipe in ``run_dir/config.yaml`` as a nested dict (None without one), read through the schema
    so that defaults added since fill in and values compare by type (1e-3 == 0.001)."""
    from thinkrl.config import load_config, to_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return to_dict(load_config(path))
    except ConfigError as exc:
        raise ConfigError(
            f"{path} records a recipe this version cannot read ({exc}); start a new trainer.output_dir"
        ) from None


def held_outputs(run_dir: Path) -> list[str]:
    """What of a run ``run_dir`` holds: complete checkpoints, metrics.jsonl lines, summary.json (names, for errors)."""
    from thinkrl.run.state import find_checkpoints

    run_dir = Path(run_dir)
    held = [p.name for p in find_checkpoints(run_dir)]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        held.append("metrics.jsonl")
    if (run_dir / "summary.json").is_file():
        held.append("summary.json")
    return held


def check_same_recipe(run_dir: Path, current: dict, what: str) -> None:
    """ConfigError naming every changed key when ``run_dir`` records a recipe other than ``current``."""
    recorded = recorded_recipe(run_dir)
    if recorded is None:
        logger.warning("%s records no config.yaml: cannot check that %s uses the same recipe", run_dir, what)
        return
    changes = recipe_changes(recorded, current)
    if changes:
        raise ConfigError(
            f"{run_dir} holds a run of another recipe (its config.yaml), so {what} would mix two: "
            f"{', '.join(changes)}; rerun with its recipe to continue it, or start a new run in a new "
            "trainer.output_dir (trainer.resume=never only starts over in a folder without checkpoints)"
        )


def check_run_folder(cfg) -> bool:
    """Refuse to continue a run folder under another recipe (module docstring); call before writing or building.

    Returns True when the run starts from step 0 in a folder holding outputs of an earlier start that never wrote a
    checkpoint: the caller (main process) clears them with ``clear_stale_outputs``."""
    from thinkrl.config import to_dict
    from thinkrl.run.state import checkpoint_to_resume, find_checkpoints

    tc = cfg.trainer
    run_dir = Path(tc.output_dir)
    current = to_dict(cfg)
    checkpoint = checkpoint_to_resume(run_dir, tc.resume)
    if checkpoint is not None:
        check_same_recipe(checkpoint.parent, current, f"resuming {checkpoint}")
        if checkpoint.parent.resolve() != run_dir.resolve() and held_outputs(run_dir):
            check_same_recipe(run_dir, current, f"continuing {checkpoint} here")
        return False
    held = held_outputs(run_dir)
    if not held:
        return False
    checkpoints = find_checkpoints(run_dir)
    if checkpoints:  # only trainer.resume=never gets here with checkpoints
        raise ConfigError(
            f"trainer.resume=never would start a new run in {run_dir}, which holds one ({checkpoints[-1].name}); "
            "pass a new trainer.output_dir, or delete the folder first"
        )
    check_same_recipe(run_dir, current, "starting it again")
    logger.info("%s holds %s from a start without checkpoints: starting again at step 0", run_dir, ", ".join(held))
    return True


def is_run_folder(folder: Path) -> bool:
    """A run folder written before folders carried thinkrl's stamp: its config.yaml reads as a recipe, or it holds
    complete checkpoints."""
    from thinkrl.run.state import find_checkpoints

    try:
        return recorded_recipe(folder) is not None or bool(find_checkpoints(folder))
    except ConfigError:
        return False


def clear_stale_outputs(run_dir: Path) -> None:
    """Remove metrics.jsonl, summary.json, results.md and the rollout dumps (``rollouts/step-*.jsonl``) of a start
    that left no checkpoint; nothing else in the folder, not even other files in ``rollouts/``."""
    run_dir = Path(run_dir)
    for name in STALE_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    rollouts = run_dir / "rollouts"
    for dump in rollouts.glob("step-*.jsonl"):
        dump.unlink()
    if rollouts.is_dir() and not any(rollouts.iterdir()):
        rollouts.rmdir()


def plan_start(cfg, overwrite: bool = False):
    """(folder decision, stale) for ``trainer.output_dir``, reading only, on every process: thinkrl's folder rule,
    then, unless an overwrite leaves no run there, ``check_run_folder``. Raises the refusals."""
    from thinkrl import output_folder

    folder = output_folder.decide(cfg.trainer.output_dir, "train", is_run_folder, overwrite)
    return folder, (check_run_folder(cfg) if folder.state != "overwrite" else False)


def describe_start(cfg, overwrite: bool = False) -> str:
    """What ``thinkrl train`` would do with ``trainer.output_dir``, in one line, reading only (``--dry-run``):
    a new run, a resume from which checkpoint, a restart of a start without checkpoints, or (raised) a refusal."""
    from thinkrl.run.state import checkpoint_to_resume

    tc = cfg.trainer
    folder, stale = plan_start(cfg, overwrite)
    if folder.state == "overwrite":
        return f"{folder.describe()}; a new run trains steps 1..{tc.max_steps}"
    checkpoint = checkpoint_to_resume(Path(tc.output_dir), tc.resume)
    if checkpoint is not None:
        return f"{tc.output_dir}: resumes from {checkpoint} and trains to step {tc.max_steps}"
    if stale:
        return f"{tc.output_dir}: a start that left no checkpoint; begins again at step 0 (its outputs are replaced)"
    return f"{tc.output_dir}: a new run, steps 1..{tc.max_steps}"
