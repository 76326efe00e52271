"""Model and optimizer state of a checkpoint as a torch distributed checkpoint (DCP), for sharded runs.

A sharded run's ``checkpoint-<step>/`` holds accelerate's usual files (scheduler, RNG, data position, trainer
state) and ``sharded/``: every process writes its own shards of the models, the mixing head and the optimizer,
keyed by parameter name (``A.model.layers.0...``, ``head....``), and of the EMA reference (``reward.baseline=ema``)
under ``ema.`` (beside ``model.``: offline readers of the models never see it). DCP reshards on load, so a
checkpoint resumes under any process count, sharded or not. Unsharded runs keep accelerate's files
(``model*.safetensors``, ``optimizer.bin``); a sharded run can resume from those too (``load_unsharded_into``).

Offline, in one process (``thinkrl eval``, ``thinkrl export``), ``ShardedTensors`` reads a checkpoint one tensor at
a time: DCP's metadata gives every tensor's name, shape and dtype, and each read is a ``dcp.load`` of that one key
(DCP assembles it from the shards of every process that wrote it). ``fill_from_sharded`` fills models built on the
meta device that way, so the host never holds a whole model beside the checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from thinkrl.errors import ConfigError
from thinkrl.models.meta_loading import to_empty_keeping_buffers

SHARDED_DIR = "sharded"


def container(roles) -> nn.Module:
    """One module over every weight group and the head, so parameter names say whose they are."""
    return nn.ModuleDict({**roles.models, "head": roles.head})


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def save_sharded(path: Path, roles, optimizer, ema: nn.Module | None = None) -> None:
    """Collective: every process writes its shards into ``path/sharded``; ``ema``: the EMA reference's model
    (``reward.baseline=ema``), under ``ema.``."""
    model_state, optim_state = get_state_dict(container(roles), optimizer)
    state = {"model": model_state, "optim": optim_state}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    dcp.save(state, checkpoint_id=str(Path(path) / SHARDED_DIR))


def _mismatch(path: Path, exc: Exception) -> ConfigError:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"checkpoint {path} does not fit this run's models or optimizer ({first}); resume it with the recipe "
        "that wrote it (its run folder's config.yaml) or start a new trainer.output_dir"
    )


def load_sharded(path: Path, roles, optimizer=None, ema: nn.Module | None = None) -> None:
    """Load ``path/sharded`` into the models and head (and the optimizer, and the EMA reference's model, when
    given), sharded or not."""
    module = container(roles)
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(module)}
        else:
            model_state, optim_state = get_state_dict(module, optimizer)
            state = {"model": model_state, "optim": optim_state}
        if ema is not None:
            state["ema"] = get_model_state_dict(ema)
        dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))
        if optimizer is None:
            set_model_state_dict(module, state["model"])
        else:
            set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if ema is not None:
            set_model_state_dict(ema, state["ema"])
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


class _Reader(FileSystemReader):
    """DCP's file reader with the metadata read once (each ``dcp.load`` asks for it again)."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._metadata = super().read_metadata()

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata


class ShardedTensors:
    """The model tensors of a checkpoint's ``sharded/`` folder, read one at a time in one process (no process
    group): names as in the container (``A.model.layers.0...``, ``head....``), without the optimizer's."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._reader = _Reader(self.path / SHARDED_DIR)
        entries = self._reader.read_metadata().state_dict_metadata
        self.meta: dict[str, TensorStorageMetadata] = {
            k.removeprefix("model."): v
            for k, v in entries.items()
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
        }

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names under ``prefix`` (``"A."``: weight group A's), in the checkpoint's order."""
        return [k for k in self.meta if k.startswith(prefix)]

    def shape(self, name: str) -> torch.Size:
        return self.meta[name].size

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[name].properties.dtype

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, whole: into ``into`` (its shape, on its device, cast to its dtype) or a new CPU one."""
        if name not in self.meta:
            raise KeyError(f"no tensor {name} in the checkpoint")
        shape = self.shape(name)
        if into is not None and into.shape != shape:
            raise ValueError(f"{name} is {tuple(shape)} in the checkpoint, {tuple(into.shape)} in the model")
        direct = into is not None and into.dtype == self.dtype(name) and into.is_contiguous()
        out = into if direct else torch.empty(shape, dtype=self.dtype(name))
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({f"model.{name}": out}, storage_reader=self._reader, no_dist=True)
        if into is not None and not direct:
            into.copy_(out)
            return into
        return out


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a sharded checkpoint, whole, on the CPU (``ShardedTensors`` for several)."""
    return ShardedTensors(path).read(name)


def iter_sharded_tensors(path: Path, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every model tensor under ``prefix``, one at a time: drop each before the next."""
    tensors = ShardedTensors(path)
    for name in tensors.names(prefix):
        yield name, tensors.read(name)


def _restore_marker_originals(model: nn.Module) -> None:
    """peft's ``trainable_tokens_original`` (not saved: used only to unmerge) are the base rows at the markers."""
    for module in model.modules():
        originals = getattr(module, "trainable_tokens_original", None)
        if originals is None or not hasattr(module, "token_indices"):
            continue
        for adapter, buf in originals.items():
            buf.copy_(module.base_layer.weight[module.token_indices[adapter]])


def fill_from_sharded(path: Path, roles, device: torch.device) -> None:
    """Every weight group's model and the head from ``path/sharded``, one tensor at a time, on ``device``.

    A model built on the meta device (``build_roles(meta=True)``) gets empty storage on ``device`` first, its real
    buffers kept (``meta_loading.to_empty_keeping_buffers``, as ``sharding.shard_roles`` does); whole ones are moved.
    Names match the checkpoint's (same container), so a model whose tensors differ from the checkpoint's in name or
    shape raises the one-line ConfigError of ``load_sharded``."""
    tensors = ShardedTensors(path)
    for name, module in container(roles).items():
        if any(p.is_meta for p in module.parameters()):
            to_empty_keeping_buffers(module, device)  # peft's marker originals: _restore_marker_originals below
        else:
            module.to(device)
        state = module.state_dict(keep_vars=True)
        wanted = {f"{name}.{k}" for k in state}
        saved = set(tensors.names(f"{name}."))
        try:
            if wanted != saved:
                missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
                raise ValueError(
                    f"missing in the checkpoint: {missing[0]}" if missing else f"not in the model: {unexpected[0]}"
                )
            with torch.no_grad():
                for key, value in state.items():
                    tensors.read(f"{name}.{key}", into=value.data)
        except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
            raise _mismatch(path, exc) from None
        with torch.no_grad():
            _restore_marker_originals(module)
