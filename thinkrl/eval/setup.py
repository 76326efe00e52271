"""What ``thinkrl eval`` evaluates: a training run (its recipe and newest checkpoint), one checkpoint folder, or a
plain model (local HF folder, hub id, or the ``smollm2-135m-instruct`` alias) used in every role."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkrl.config import Config, load_config
from thinkrl.distributed.checkpoint import is_sharded_checkpoint
from thinkrl.errors import ConfigError
from thinkrl.models.roles import RoleModels, build_roles, set_threads
from thinkrl.run import integrity
from thinkrl.run.init_from import load_initial_weights
from thinkrl.run.state import CHECKPOINT_PREFIX, newest_intact, use_cpu

logger = logging.getLogger(__name__)


@dataclass
class EvalSetup:
    cfg: Config
    roles: RoleModels
    checkpoint: Path | None  # None: a plain model, no thinkrl training behind it


def locate_checkpoint(model: str) -> tuple[Path, Path | None] | None:
    """(run folder, checkpoint) when ``model`` names a thinkrl run or one of its checkpoints, else None."""
    path = Path(model).expanduser()
    if path.name.startswith(CHECKPOINT_PREFIX) and (path / "trainer_state.json").is_file():
        found = integrity.problem(path)
        if found:
            raise ConfigError(f"checkpoint {path} is broken ({found}); give another checkpoint or its run folder")
        return path.parent, path
    if (path / "config.yaml").is_file() and path.is_dir():
        checkpoint, broken = newest_intact(path)
        for skipped, why in broken:
            logger.warning("%s is broken (%s): using %s", skipped, why, checkpoint.name if checkpoint else "none")
        return path, checkpoint
    return None


class _Skipped:
    """Stands in for a trainer's registered object (data position, counters) that evaluation does not need."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def checkpoint_device() -> torch.device:
    """Where evaluation puts the models: accelerate's choice (a GPU unless ``ACCELERATE_USE_CPU`` or none)."""
    return torch.device("cpu" if use_cpu() else "cuda")


def load_checkpoint_weights(roles: RoleModels, checkpoint: Path) -> None:
    """Load a training checkpoint's models and head: a sharded checkpoint's ``sharded/`` folder one tensor at a time
    (``distributed.checkpoint.fill_from_sharded``: the models may be on the meta device), or accelerate's state
    (same order as the trainer prepared them)."""
    from accelerate import Accelerator

    from thinkrl.distributed.checkpoint import fill_from_sharded, is_sharded_checkpoint

    if is_sharded_checkpoint(checkpoint):
        fill_from_sharded(checkpoint, roles, checkpoint_device())
        return

    accelerator = Accelerator(cpu=use_cpu())
    prepared = accelerator.prepare(*roles.models.values(), roles.head)
    for group, model in zip(list(roles.models), prepared):
        roles.models[group] = accelerator.unwrap_model(model)
    for _ in checkpoint.glob("custom_checkpoint_*"):
        accelerator.register_for_checkpointing(_Skipped())
    try:
        accelerator.load_state(str(checkpoint), strict=True)
    except Exception as exc:
        raise ConfigError(
            f"checkpoint {checkpoint} does not match its run's config.yaml ({type(exc).__name__}: {exc}); "
            "evaluate the run folder it came from"
        ) from None


def _build(cfg: Config, meta: bool = False) -> RoleModels:
    """Roles with the recipe's seed: new parts (scratch weights, a fresh head) are the same on every call.
    ``meta``: models with a path come without weights (``build_roles``), to be filled from a sharded checkpoint."""
    set_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.trainer.seed)
    return build_roles(cfg, meta=meta)


def describe_model(model: str | None, config: str | None) -> str:
    """What ``load_setup`` would evaluate, without building it (``--dry-run``)."""
    located = locate_checkpoint(model) if model else None
    if located:
        run_dir, checkpoint = located
        return f"model: run {run_dir}, " + (checkpoint.name if checkpoint else "its initial weights (no checkpoint)")
    if model is None and config is None:
        raise ConfigError("give --model (run folder, checkpoint, HF folder, hub id or smollm2-135m-instruct)")
    return f"model: {model} in every role" if model else f"model: the recipe {config}"


def load_setup(model: str | None, config: str | None, overrides: list[str]) -> EvalSetup:
    """Build the roles to evaluate. ``overrides`` (dotted key=value) apply last, e.g. rollout.max_thought_len=16."""
    located = locate_checkpoint(model) if model else None
    if located:
        run_dir, checkpoint = located
        cfg = load_config(run_dir / "config.yaml", overrides)
        # A sharded checkpoint is read one tensor at a time into models built without weights: the host never
        # holds the pretrained weights beside the checkpoint (scratch models and the head are small: built whole).
        roles = _build(cfg, meta=checkpoint is not None and is_sharded_checkpoint(checkpoint))
        if checkpoint is None:
            logger.warning("run %s has no complete checkpoint: using its initial weights", run_dir)
            load_initial_weights(cfg, roles)
        else:
            load_checkpoint_weights(roles, checkpoint)
            logger.info("loaded %s", checkpoint)
        return EvalSetup(cfg, roles, checkpoint)
    if model is None and config is None:
        raise ConfigError("give --model (run folder, checkpoint, HF folder, hub id or smollm2-135m-instruct)")
    plain = (
        [f"model.default.path={model}", "model.groups={}", "model.weight_groups=[A,A,A]", "head.form=none"]
        if model
        else []
    )
    cfg = load_config(config, [*plain, *overrides])
    roles = _build(cfg)
    if model is None:  # a recipe: its model.init_from weights, as its run would start
        load_initial_weights(cfg, roles)
    return EvalSetup(cfg, roles, None)
