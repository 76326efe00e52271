"""Model and optimizer state of a checkpoint as a torch distributed checkpoint (DCP), for sharded runs.

A sharded run's ``checkpoint-<step>/`` holds accelerate's usual files (scheduler, RNG, data position, trainer
state) and ``sharded/``: every process writes its own shards of the models, the mixing head and the optimizer,
keyed by parameter name (``A.model.layers.0...``, ``head....``). DCP reshards on load, so a checkpoint resumes
under any process count, sharded or not. Unsharded runs keep accelerate's files (``model*.safetensors``,
``optimizer.bin``); a sharded run can resume from those too (``load_unsharded_into``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from thinkrl.errors import ConfigError

SHARDED_DIR = "sharded"


def container(roles) -> nn.Module:
    """One module over every weight group and the head, so parameter names say whose they are."""
    return nn.ModuleDict({**roles.models, "head": roles.head})


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def save_sharded(path: Path, roles, optimizer) -> None:
    """Collective: every process writes its shards into ``path/sharded``."""
    model_state, optim_state = get_state_dict(container(roles), optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(path) / SHARDED_DIR))


def _mismatch(path: Path, exc: Exception) -> ConfigError:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"checkpoint {path} does not fit this run's models or optimizer ({first}); resume it with the recipe "
        "that wrote it (its run folder's config.yaml) or start a new trainer.output_dir"
    )


def load_sharded(path: Path, roles, optimizer=None) -> None:
    """Load ``path/sharded`` into the models and head (and the optimizer when given), sharded or not."""
    module = container(roles)
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(module)}
            dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))
            set_model_state_dict(module, state["model"])
            return
        model_state, optim_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
        raise _mismatch(path, exc) from None


def _model_files(path: Path, count: int) -> list[Path]:
    """accelerate's names for the prepared models, in order: model.safetensors, model_1.safetensors, ..."""
    return [Path(path) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors") for i in range(count)]


def load_unsharded_into(path: Path, roles, optimizer) -> None:
    """Load an unsharded run's accelerate checkpoint into sharded models, head and optimizer.

    The trainer prepared the models by group, then the head: their files come in that order. The optimizer's
    state is keyed by parameter index in group order, which ``build_optimizer`` makes the same in both modes."""
    modules = [*roles.models.values(), roles.head]
    files = _model_files(path, len(modules))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {', '.join(missing)}; it was not written by this run's recipe")
    full = StateDictOptions(full_state_dict=True)
    try:
        for module, file in zip(modules, files):
            if any(True for _ in module.parameters()):
                set_model_state_dict(module, load_file(str(file)), options=full)
        saved = torch.load(Path(path) / "optimizer.bin", map_location="cpu", weights_only=True)
        names = {id(p): n for n, p in container(roles).named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {order[i]: s for i, s in saved["state"].items()}
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
        set_optimizer_state_dict(container(roles), optimizer, {"state": state, "param_groups": groups}, options=full)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise _mismatch(path, exc) from None
