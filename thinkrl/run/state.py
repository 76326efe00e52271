"""Run-folder state shared by every trainer (thought RL, Coconut): tracker start, metrics, checkpoints, resume.

Checkpoints are ``checkpoint-<step>/`` folders holding accelerate's full state (models, optimizers, schedulers,
RNG, registered objects such as the data position) plus the tokenizer and ``trainer_state.json``. They are
written into ``.tmp-checkpoint-<step>`` and renamed when complete, so a crash never leaves a folder that looks
usable but is not; ``trainer_state.json`` marks a complete one. Its ``manifest.json`` (``integrity``), written last,
lets a resume find one broken later (a truncated or deleted file) and fall back to the newest whole one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from thinkrl.config import to_dict
from thinkrl.errors import ConfigError, StorageFullError
from thinkrl.run import integrity
from thinkrl.run.files import append_jsonl, write_atomic

CHECKPOINT_PREFIX = "checkpoint-"
logger = logging.getLogger(__name__)


def step_of(checkpoint: Path) -> int:
    return int(Path(checkpoint).name[len(CHECKPOINT_PREFIX) :])


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>/`` with trainer_state.json), oldest first. Folders set aside as
    broken (``checkpoint-<step>.broken``) are not among them."""
    found = [
        p
        for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=step_of)


def newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that ``integrity.problem`` finds whole, and the broken ones newer than it
    (each with what is wrong). Reads only."""
    broken = []
    for checkpoint in reversed(find_checkpoints(run_dir)):
        found = integrity.problem(checkpoint)
        if found is None:
            return checkpoint, broken
        broken.append((checkpoint, found))
    if broken:
        listed = "; ".join(f"{c.name}: {why}" for c, why in broken)
        raise ConfigError(
            f"no checkpoint in {run_dir} is whole ({listed}); nothing was changed: restore one from a copy, or "
            "start a new trainer.output_dir"
        )
    return None, []


def checkpoint_to_resume(run_dir: Path, how: str) -> Path | None:
    """The checkpoint ``trainer.resume`` names: auto = the newest whole one in run_dir (None if there is none),
    never = None, else a path that must be a complete, whole checkpoint folder."""
    if how == "never":
        return None
    if how == "auto":
        return newest_intact(run_dir)[0]
    path = Path(how)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(
            f"trainer.resume={how} is not a complete checkpoint folder; use auto, never or a checkpoint-<step> path"
        )
    found = integrity.problem(path)
    if found:
        raise ConfigError(f"checkpoint {path} is broken ({found}); pass another one, or trainer.resume=auto")
    return path


def use_cpu() -> bool:
    """CPU when there is no GPU or when ``ACCELERATE_USE_CPU`` says so (set by ``accelerate launch --cpu`` and by
    ``use_cpu: true`` in a launch config; parsed as accelerate parses it: true/yes/1/on ...)."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def make_accelerator(trainer_cfg, run_dir: Path):
    """The Accelerator every trainer runs under: CPU per ``use_cpu()``, trackers per ``trainer.report_to``.

    ``step_scheduler_with_optimizer=False``: accelerate's scheduler wrapper otherwise steps the LR schedule once per
    process on every optimizer step (it assumes each process walks its own dataloader), while ``trainer.max_steps``
    and the schedule count global steps, so N processes would decay the learning rate N times too fast."""
    from accelerate import Accelerator

    return Accelerator(
        cpu=use_cpu(),
        log_with=None if trainer_cfg.report_to == "none" else trainer_cfg.report_to,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
    )


def init_tracker(accelerator, trainer_cfg, run_dir: Path, cfg) -> None:
    """Start wandb/tensorboard through accelerate (main process only); wandb stays offline unless told otherwise."""
    if trainer_cfg.report_to == "none":
        return
    kwargs = {}
    if trainer_cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # never ask for a key or a network by default
        kwargs = {"wandb": {"dir": str(run_dir), "name": trainer_cfg.run_name or Path(run_dir).name}}
    try:
        accelerator.init_trackers(trainer_cfg.project, config=to_dict(cfg), init_kwargs=kwargs)
    except Exception as exc:  # any tracker failure becomes one line
        raise ConfigError(
            f"trainer.report_to={trainer_cfg.report_to} failed to start ({type(exc).__name__}: {exc}); "
            "set trainer.report_to=none or install/configure the tracker"
        ) from None


def log_metrics(accelerator, run_dir: Path, report_to: str, step: int, metrics: dict) -> None:
    if accelerator.is_main_process:
        append_jsonl(Path(run_dir) / "metrics.jsonl", {"step": step, **metrics})
    if report_to != "none":
        accelerator.log(metrics, step=step)


def resume(accelerator, run_dir: Path, how: str, trim_metrics: bool = True, load_weights=None) -> Path | None:
    """Load the checkpoint ``how`` names (auto = newest in run_dir, never, or a path); returns it or None.

    With ``trim_metrics`` (training), metric lines logged after that checkpoint are dropped: those steps are
    about to be redone. Evaluation loads without touching the run's history. ``load_weights(path) -> bool``
    may load the models and optimizer itself (sharded checkpoints); when it returns True accelerate loads the
    rest (scheduler, RNG, registered objects) only."""
    path = checkpoint_to_resume(run_dir, how)
    if how == "auto":
        path = _agreed(accelerator, run_dir, path)
    if path is None:
        return None
    if load_weights is not None and load_weights(path):
        _load_state_without_models(accelerator, path)
    else:
        accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    metrics = Path(run_dir) / "metrics.jsonl"
    if trim_metrics and accelerator.is_main_process and metrics.is_file():
        step = int(path.name[len(CHECKPOINT_PREFIX) :]) if path.name[len(CHECKPOINT_PREFIX) :].isdigit() else None
        step = state.get("global_step", state.get("step", step))
        kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step]
        write_atomic(metrics, "".join(f"{ln}\n" for ln in kept))
    return path


def lr_at_restored_step(scheduler) -> None:
    """Set each group's lr to this run's schedule at the restored step. The optimizer's saved lr belongs to the
    schedule of the run that wrote the checkpoint, whose length was its trainer.max_steps: a run resumed with
    another max_steps would take its first step at the old schedule's lr (0 at the end of a linear decay)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper holds the torch scheduler
    if not hasattr(inner, "lr_lambdas"):
        return
    lrs = [base * fn(inner.last_epoch) for fn, base in zip(inner.lr_lambdas, inner.base_lrs)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs


def _agreed(accelerator, run_dir: Path, mine: Path | None) -> Path | None:
    """The checkpoint every process found whole (the oldest of their choices: each checks the files it sees, so
    ranks without a shared disk check their own shards). The main process sets newer, broken ones aside."""
    step = step_of(mine) if mine is not None else -1
    if accelerator.num_processes > 1:
        import torch
        import torch.distributed as dist

        agreed = torch.tensor([step], dtype=torch.long, device=accelerator.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        step = int(agreed)
    chosen = Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}" if step >= 0 else None
    newer = [c for c in find_checkpoints(run_dir) if step_of(c) > step]
    accelerator.wait_for_everyone()  # everyone has chosen before a folder is renamed
    if accelerator.is_main_process:
        for checkpoint in newer:
            why = integrity.problem(checkpoint) or "another process found its files broken"
            logger.warning(
                "%s is broken (%s): set aside as %s; resuming from %s",
                checkpoint,
                why,
                integrity.set_aside(checkpoint).name,
                chosen.name if chosen else "step 0",
            )
    accelerator.wait_for_everyone()
    return chosen


def _load_state_without_models(accelerator, path: Path) -> None:
    """accelerate's load_state for everything but the prepared models and optimizers (loaded by the caller).

    accelerate has no switch for this; it loads whatever it has prepared, so those lists are hidden meanwhile."""
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        accelerator.load_state(str(path))
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


# errno values (and the texts libraries that do not raise OSError put in their messages) of a refused write
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded")


def is_storage_full(exc: BaseException) -> bool:
    """The write failed for lack of space: ENOSPC, EFBIG (``ulimit -f``) or EDQUOT, as an OSError anywhere in the
    exception chain or in the message of a library that wraps it (safetensors: "No space left on device (os error
    28)")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(text in str(exc) for text in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _size(folder: Path) -> str:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def save_checkpoint(
    accelerator, run_dir: Path, step: int, tokenizer, trainer_state: dict, keep: int, save_weights=None
) -> Path:
    """Write checkpoint-<step>/ atomically and keep only the newest ``keep`` checkpoints.

    ``save_weights(folder)``, called on every process, writes what accelerate does not hold (sharded models).
    A full disk raises ``StorageFullError`` after removing the half-written folder; earlier checkpoints stay."""
    run_dir = Path(run_dir)
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = run_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()  # nobody writes into tmp before it is cleared
    try:
        accelerator.save_state(str(tmp))
        if save_weights is not None:
            tmp.mkdir(parents=True, exist_ok=True)  # accelerate creates it on the main process only
            save_weights(tmp)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tmp / "tokenizer")
            write_atomic(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2))
        accelerator.wait_for_everyone()  # every process's files are written before the manifest lists them
        if accelerator.is_main_process:
            integrity.write_manifest(tmp)  # last: a checkpoint is whole when the files its manifest lists are
    except Exception as exc:
        if not is_storage_full(exc):
            raise
        previous = find_checkpoints(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # frees what it took; a .tmp folder is never resumed from
        reason = " ".join(str(exc).split())[:160]
        raise StorageFullError(
            f"writing {final} failed: {reason}; free disk space (a checkpoint here takes "
            f"{_size(previous[-1]) if previous else 'its model and optimizer state'}, and {keep} are kept: "
            f"trainer.keep_checkpoints=1 keeps one), then rerun the same command to resume from "
            f"{previous[-1].name if previous else 'step 0'}"
        ) from None
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in find_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
