"""Sharded models built on the meta device and filled from their safetensors files, one slice at a time.

Under ``trainer.sharding=fsdp2`` (``model.sharded_loading=meta``, the default) a model with a path is never whole
in any process: it is built on the meta device (parameters without storage; buffers such as RoPE's frequencies are
real, as accelerate's ``init_empty_weights(include_buffers=False)`` makes them), wrapped in LoRA if the recipe asks,
cut by ``fully_shard``, given empty local shards (``to_empty``), and then every parameter's local shard is read from
the checkpoint's safetensors files: ``safe_open(...).get_slice(key)[rows]`` reads only this process's rows of one
tensor. Nothing is broadcast; each process opens the files itself.

What the checkpoint does not hold is made here, as ``roles.build_model`` makes it for a whole model:
- the untied LM head: a tied checkpoint has no ``lm_head.weight``, so the head's rows are the embedding's;
- rows past the checkpoint's vocabulary (the thought markers, and any other tokens the tokenizer adds): the markers
  are the mean embedding of ``model.thought_init_token`` (input and output side), other new rows are drawn from
  N(0, initializer_range) as ``resize_token_embeddings`` does (with a generator seeded by the run's seed and the
  parameter's name, so every process draws the same full rows and keeps its own);
- LoRA adapters: A by peft's kaiming-uniform initialisation (same seeding), B zeros; the trainable marker rows
  (peft's ``trainable_tokens_delta`` and its ``trainable_tokens_original`` buffer) equal the markers' rows.
A process holds its shards plus at most one tensor slice in flight. Weights are stored in ``model.dtype``:
``bfloat16`` gives bf16 shards directly; ``float32`` gives fp32 master shards (bf16 compute comes from the
launch's ``mixed_precision``).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from thinkrl.errors import ModelLoadError
from thinkrl.models.roles import EOT, SOT, from_pretrained_or_error, resolve_model_path

PEFT_PREFIX = "base_model.model."
WRAPPERS = (".base_layer", ".token_adapter")  # module levels peft inserts between a layer and its weight


def checkpoint_files(path: str) -> dict[str, Path]:
    """Checkpoint tensor name → the safetensors file holding it (single file, or sharded with an index)."""
    folder = Path(resolve_model_path(path)).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:
            raise ModelLoadError(
                f"model {path!r} is not a local folder and its files could not be fetched ({type(exc).__name__}); "
                "download it first or use a local path"
            ) from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(
            f"model {path!r} has no safetensors weights, which sharded loading reads slice by slice; convert it "
            "(save_pretrained writes safetensors) or set model.sharded_loading=full"
        )
    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def meta_model(path: str, tokenizer, dtype: torch.dtype, attn: str) -> PreTrainedModel:
    """The model of ``path`` without weights: untied, its vocabulary grown to the tokenizer's (as build_model
    does), parameters on the meta device, buffers real."""
    config = from_pretrained_or_error(AutoConfig, path, "model")
    config.tie_word_embeddings = False
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def checkpoint_key(name: str) -> str:
    """A parameter's name in the checkpoint: peft's prefix and inserted levels removed."""
    name = name.removeprefix(PEFT_PREFIX)
    for level in WRAPPERS:
        name = name.replace(level, "")
    return name


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this process's storage of ``tensor``, its offset in the full tensor): the local shard of a DTensor."""
    if isinstance(tensor, DTensor):
        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), tuple(offset)
    return tensor, (0,) * tensor.dim()


def _generator(seed: int, name: str) -> torch.Generator:
    """The same stream on every process for one parameter: seeded by the run's seed and the name."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class CheckpointFiller:
    """Fills one sharded model (after ``to_empty``) from ``path``'s safetensors files."""

    def __init__(self, model: nn.Module, path: str, tokenizer, init_text: str, seed: int):
        self.model, self.path, self.seed = model, path, seed
        self.files = checkpoint_files(path)
        self.base = _unwrapped(model)
        self.config = self.base.config
        # by module, not by .weight: peft's trainable-token wrapper computes its weight on access
        modules = {id(m): checkpoint_key(n) for n, m in model.named_modules()}
        self.embed_key = modules[id(self.base.get_input_embeddings())] + ".weight"
        self.head_key = modules[id(self.base.get_output_embeddings())] + ".weight"
        self.marker_ids = tokenizer.convert_tokens_to_ids([SOT, EOT])
        self.init_ids = tokenizer.encode(init_text, add_special_tokens=False) or [tokenizer.eos_token_id]
        self._marker_rows: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------------------------------------------------------
    def fill(self, made: list[str]) -> None:
        """Every parameter's local shard, and the buffers named in ``made`` (those that were on the meta device:
        peft's marker rows; ``to_empty_keeping_buffers`` put the others back)."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                self._fill(name, param)
            buffers = dict(self.model.named_buffers())
            for name in made:
                self._fill(name, buffers[name])

    def _fill(self, name: str, tensor: torch.Tensor) -> None:
        local, offset = local_rows(tensor)
        if local.numel() == 0:
            return
        rows = slice(offset[0], offset[0] + local.shape[0])
        if "lora_A." in name:
            local.copy_(self._drawn(name, tensor.shape, tensor.dtype, "kaiming")[rows])
        elif "lora_B." in name:
            local.zero_()
        elif "trainable_tokens_" in name:  # peft's marker rows of the embedding or LM head it adapts
            owner = checkpoint_key(name).split(".trainable_tokens_")[0] + ".weight"
            local.copy_(self.marker_rows(self.head_key if owner == self.head_key else self.embed_key).expand_as(local))
        else:
            self._read(checkpoint_key(name), name, tensor, local, rows)

    def _read(self, key: str, name: str, tensor: torch.Tensor, local: torch.Tensor, rows: slice) -> None:
        source = key
        if key == self.head_key and key not in self.files:
            source = self.embed_key  # a tied checkpoint: the untied head starts as the embedding
        if source not in self.files:
            raise ModelLoadError(
                f"model {self.path!r}: tensor {key} is not in its safetensors files, so it cannot be loaded sharded; "
                "set model.sharded_loading=full"
            )
        with safe_open(str(self.files[source]), "pt") as f:
            stored = f.get_slice(source)
            saved_rows = stored.get_shape()[0]
            end = min(rows.stop, saved_rows)
            if rows.start < end:
                local[: end - rows.start].copy_(stored[rows.start : end].to(local.dtype))
        if key in (self.embed_key, self.head_key):
            if rows.stop > saved_rows:  # rows the tokenizer added: drawn as resize_token_embeddings draws them
                new = self._drawn(name, (tensor.shape[0] - saved_rows, *tensor.shape[1:]), tensor.dtype, "normal")
                lo = max(rows.start, saved_rows)
                local[lo - rows.start :].copy_(new[lo - saved_rows : rows.stop - saved_rows])
            for i in self.marker_ids:
                if rows.start <= i < rows.stop:
                    local[i - rows.start].copy_(self.marker_rows(key)[0])

    def marker_rows(self, key: str) -> torch.Tensor:
        """(1, d): the mean of the init text's rows of the embedding (or the LM head) named ``key``."""
        if key not in self._marker_rows:
            source = key if key in self.files else self.embed_key
            dtype = self.base.dtype
            with safe_open(str(self.files[source]), "pt") as f:
                stored = f.get_slice(source)
                picked = torch.cat([stored[i : i + 1] for i in self.init_ids]).to(dtype)
            self._marker_rows[key] = picked.mean(0, keepdim=True).to(dtype)
        return self._marker_rows[key]

    def _drawn(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, how: str) -> torch.Tensor:
        """A tensor drawn on every process alike, of which each keeps its rows: small (a LoRA matrix, or the block
        of rows past the checkpoint's vocabulary)."""
        full = torch.empty(shape, dtype=torch.float32)
        g = _generator(self.seed, name)
        if how == "kaiming":  # peft's LoRA A initialisation
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
        else:
            nn.init.normal_(full, std=getattr(self.config, "initializer_range", 0.02), generator=g)
        return full.to(dtype)


def to_empty_keeping_buffers(module: nn.Module, device: torch.device) -> list[str]:
    """``module.to_empty(device)`` with its real buffers (RoPE's frequencies, built with the model) put back; returns
    the names of the buffers that were on the meta device, which the caller fills."""
    real = {n: b.detach().clone() for n, b in module.named_buffers() if not b.is_meta}
    made = [n for n, b in module.named_buffers() if b.is_meta]
    module.to_empty(device=device)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in real:
                buf.copy_(real[name])
    return made


def fill_sharded(cfg, tokenizer, group: str, model: nn.Module, made: list[str]) -> None:
    """``sharding.shard_roles``'s fill: the local shards of weight group ``group``'s model from its files."""
    path = cfg.model.spec(group).path
    CheckpointFiller(model, path, tokenizer, cfg.model.thought_init_token, cfg.trainer.seed).fill(made)


def _unwrapped(model: nn.Module) -> PreTrainedModel:
    return next(m for m in model.modules() if isinstance(m, PreTrainedModel))
