"""``model.init_from``: start a run from another run's weights, with a fresh optimizer, step 0 and its own folder.

The source is a run folder (its newest whole checkpoint, normally the final one) or one ``checkpoint-<step>``
folder, written sharded or not. What comes over: every weight group's model (the thought markers' embedding rows
and LoRA adapters included: they are model tensors) and the mixing head when the source has one of the same form.
Nothing else does: optimizer moments, scheduler, data position, RNG and step all start fresh. Both arms of a study
can so start from one domain-adapted model (``thinkrl sweep --compute-matched-baseline`` passes the override to the
baseline like any other).

The source must have the same ``model.weight_groups`` and, per group, the same tensor names and shapes; anything
else is a one-line ConfigError. Loading goes through ``set_model_state_dict`` with whole tensors, so the same code
fills plain models and FSDP2-sharded ones (each process keeps its rows).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from thinkrl.errors import ConfigError
from thinkrl.run import integrity
from thinkrl.run.state import CHECKPOINT_PREFIX, newest_intact

logger = logging.getLogger(__name__)


def source_checkpoint(spec: str, output_dir: str = "") -> Path:
    """The checkpoint folder ``model.init_from=spec`` names (a run folder: its newest whole checkpoint)."""
    path = Path(spec).expanduser()
    if output_dir and path.resolve() == Path(output_dir).expanduser().resolve():
        raise ConfigError(
            f"model.init_from={spec} is this run's own folder; to continue a run, resume it (drop model.init_from)"
        )
    if path.name.startswith(CHECKPOINT_PREFIX) and (path / "trainer_state.json").is_file():
        found = integrity.problem(path)
        if found:
            raise ConfigError(f"model.init_from={spec} is broken ({found}); give another checkpoint or its run")
        return path
    if path.is_dir() and (path / "config.yaml").is_file():
        checkpoint, _ = newest_intact(path)
        if checkpoint is None:
            raise ConfigError(f"model.init_from={spec} is a run with no checkpoint yet; let it save one first")
        return checkpoint
    raise ConfigError(
        f"model.init_from={spec} is neither a thinkrl run folder (with config.yaml) nor a checkpoint-<step> folder"
    )


def _source_config(checkpoint: Path):
    from thinkrl.config import load_config

    return load_config(checkpoint.parent / "config.yaml", [])


def check_compatible(cfg, source_cfg, spec: str) -> None:
    """Same weight groups; the model sizes are checked tensor by tensor when loading."""
    ours, theirs = list(cfg.model.weight_groups), list(source_cfg.model.weight_groups)
    if ours != theirs:
        raise ConfigError(
            f"model.init_from={spec} has model.weight_groups={theirs}, this recipe {ours}; they must be the same"
        )


def _group_states(checkpoint: Path, groups: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name ('A', ..., 'head'): whole state dict} of a checkpoint, sharded or not."""
    from thinkrl.distributed.checkpoint import ShardedTensors, _model_files, is_sharded_checkpoint

    names = [*groups, "head"]
    if is_sharded_checkpoint(checkpoint):
        tensors = ShardedTensors(checkpoint)
        return {name: {key[len(name) + 1 :]: tensors.read(key) for key in tensors.names(f"{name}.")} for name in names}
    files = _model_files(checkpoint, len(names))  # accelerate's order: the models by group, then the head
    missing = [f.name for f in files[:-1] if not f.is_file()]
    if missing:
        raise ConfigError(f"model.init_from: {checkpoint} lacks {', '.join(missing)}; it is not a thinkrl checkpoint")
    return {name: load_file(str(f)) if f.is_file() else {} for name, f in zip(names, files)}


def _fill(module: nn.Module, state: dict[str, torch.Tensor], what: str, spec: str) -> None:
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        which = (
            f"{what}.{missing[0]} is not in the source" if missing else f"the source's {what}.{extra[0]} is not here"
        )
        raise ConfigError(f"model.init_from={spec} does not fit this recipe's models: {which}")
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"model.init_from={spec} does not fit this recipe's models: {what}.{key} is "
                f"{tuple(value.shape)} there, {tuple(own[key].shape)} here (another model size or vocabulary)"
            )
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def check_source(cfg):
    """(source checkpoint, its run's config) of ``model.init_from``, or None when unset; raises the one-line
    ConfigError of a source that is missing, broken or has other weight groups. Reads only."""
    spec = cfg.model.init_from
    if not spec:
        return None
    checkpoint = source_checkpoint(spec, cfg.trainer.output_dir)
    source_cfg = _source_config(checkpoint)
    check_compatible(cfg, source_cfg, spec)
    return checkpoint, source_cfg


def load_initial_weights(cfg, roles) -> Path | None:
    """Fill ``roles`` (built, sharded or not, not on the meta device) from ``cfg.model.init_from``; returns the
    source checkpoint (None when unset)."""
    found = check_source(cfg)
    if found is None:
        return None
    checkpoint, source_cfg = found
    spec = cfg.model.init_from
    states = _group_states(checkpoint, list(roles.models))
    with torch.no_grad():
        for group, model in roles.models.items():
            _fill(model, states[group], group, spec)
        head_state = states["head"]
        if cfg.head.form != "none" and source_cfg.head.form == cfg.head.form and head_state:
            _fill(roles.head, head_state, "head", spec)
            head = "and its mixing head"
        else:
            head = f"with a fresh {cfg.head.form} mixing head (the source's is {source_cfg.head.form})"
    logger.info("model.init_from: weights of %s %s", checkpoint, head)
    return checkpoint
