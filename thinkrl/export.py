"""``thinkrl export CHECKPOINT OUT_DIR``: a training checkpoint (sharded or not) as plain HF folders.

OUT_DIR gets one folder per weight group (``A/``, ``B/``...: config, safetensors, tokenizer; LoRA adapters merged
in, so transformers and vLLM load them as they are), ``head.safetensors`` with the mixing head and ``roles.json``
saying which folder plays which role. It runs in one process.

An unsharded checkpoint is loaded into whole models, merged (peft's ``merge_and_unload``) and saved with
``save_pretrained``. A sharded one (``checkpoint-<step>/sharded/``) is streamed instead, never building a model:
DCP's metadata names every tensor, each is read whole on its own (``distributed.checkpoint.ShardedTensors``),
renamed to the plain model's name (peft's ``base_model.model.``, ``.base_layer`` and ``.token_adapter`` dropped),
merged as peft merges it (a LoRA layer's weight W + (B @ A)·alpha/r; the thought markers' rows replaced by peft's
trainable rows) and written straight into its place in a safetensors file whose header was written first. The
files, their names (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index past
``max_shard_size``), config.json and generation_config.json are what ``save_pretrained`` writes for the merged
model, the tensors bit for bit; the process holds one tensor (a LoRA layer's three) at a time.

OUT_DIR follows thinkrl's folder rule (``thinkrl.output_folder``): a new or empty folder, or an earlier export
(its entries are replaced); a folder holding anything else is refused unless ``--overwrite``, which replaces only
the entries an export writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl import output_folder
from thinkrl.errors import ConfigError

DEFAULT_MAX_SHARD_SIZE = "50GB"  # save_pretrained's: one model.safetensors up to 50 GB


def _is_export(folder: Path) -> bool:
    """An export written before folders carried thinkrl's stamp: its roles.json names roles and the head."""
    try:
        recorded = json.loads((folder / "roles.json").read_text(encoding="utf-8"))
        return {"roles", "head_form"} <= set(recorded)
    except (OSError, ValueError, TypeError):
        return False


def _plan(checkpoint: str | Path, out_dir: str | Path, overwrite: bool):
    """(checkpoint, the entries an export writes, folder decision), reading only: a checkpoint folder as given (it
    must be whole), a run folder's newest whole one; thinkrl's folder rule for ``out_dir``. Raises the refusals."""
    from thinkrl.config import load_config
    from thinkrl.eval.setup import locate_checkpoint

    located = locate_checkpoint(str(checkpoint))
    if located is None or located[1] is None:
        raise ConfigError(
            f"{checkpoint} is not a complete checkpoint folder (checkpoint-<step>/ of a thinkrl run) or a run with one"
        )
    run_dir, checkpoint = located
    groups = list(dict.fromkeys(load_config(run_dir / "config.yaml").model.weight_groups))
    written = (output_folder.STAMP, "roles.json", "head.safetensors", *groups)
    return checkpoint, written, output_folder.decide(out_dir, "export", _is_export, overwrite, owns=written)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``checkpoint`` (or a run's newest) into ``out_dir``; model files split past ``max_shard_size`` (bytes,
    or "500MB"...) as ``save_pretrained`` splits them."""
    from thinkrl.distributed.checkpoint import is_sharded_checkpoint

    out_dir = Path(out_dir)
    checkpoint, written, decision = _plan(checkpoint, out_dir, overwrite)  # before any model is loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out_dir.name}-", dir=out_dir.parent))
    try:
        write = _write_streamed if is_sharded_checkpoint(checkpoint) else _write_whole
        role_group, head_form = write(checkpoint, tmp, max_shard_size)
        recorded = {"roles": role_group, "head_form": head_form, "checkpoint": str(checkpoint)}
        (tmp / "roles.json").write_text(json.dumps(recorded, indent=2))
        if decision.state == "new" and not out_dir.exists():
            output_folder.claim(output_folder.Decision(tmp, "export", "new"))
            os.replace(tmp, out_dir)
            return out_dir
        # Into an existing folder: replace the export's own entries one by one; nothing else is touched.
        if decision.state == "ours":
            decision.remove = [out_dir / name for name in written if (out_dir / name).exists()]
        output_folder.claim(decision)
        for entry in sorted(tmp.iterdir()):
            target = out_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_whole(checkpoint: Path, tmp: Path, max_shard_size: int | str) -> tuple[dict, str]:
    """An unsharded checkpoint: whole models loaded, LoRA merged by peft, saved by transformers."""
    from safetensors.torch import save_file

    from thinkrl.eval.setup import load_setup

    roles = load_setup(str(checkpoint), None, []).roles
    for group, model in roles.models.items():
        plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        plain.save_pretrained(tmp / group, max_shard_size=max_shard_size)
        roles.tokenizer.save_pretrained(tmp / group)
    head = {k: v.contiguous() for k, v in roles.head.state_dict().items()}
    save_file(head, str(tmp / "head.safetensors"), metadata={"form": roles.head.form})
    return roles.role_group, roles.head.form


def _write_streamed(checkpoint: Path, tmp: Path, max_shard_size: int | str) -> tuple[dict, str]:
    """A sharded checkpoint, one tensor at a time: no model is built (only its skeleton on the meta device)."""
    from safetensors.torch import save_file

    from thinkrl.config import ROLES, load_config
    from thinkrl.distributed.checkpoint import ShardedTensors
    from thinkrl.models.roles import EOT, SOT, build_tokenizer

    cfg = load_config(checkpoint.parent / "config.yaml")
    tokenizer = build_tokenizer(cfg)
    tensors = ShardedTensors(checkpoint)
    marker_ids = tokenizer.convert_tokens_to_ids([SOT, EOT])  # peft's trainable_token_indices, in that order
    for group in dict.fromkeys(cfg.model.weight_groups):
        spec = cfg.model.spec(group)
        skeleton = _skeleton(spec, tokenizer, cfg)
        sources = _sources(checkpoint, tensors, group, skeleton)
        scaling = spec.lora.alpha / spec.lora.r if spec.lora.r > 0 else 0.0  # peft's LoRA scaling

        def merged(name: str, sources=sources, scaling=scaling):
            return _merged(tensors, sources[name], scaling, marker_ids)

        folder = tmp / group
        folder.mkdir()
        _save_configs(skeleton, folder)
        _write_weights(folder, skeleton, merged, max_shard_size)
        tokenizer.save_pretrained(folder)
    head = {k.removeprefix("head."): tensors.read(k).contiguous() for k in tensors.names("head.")}
    save_file(head, str(tmp / "head.safetensors"), metadata={"form": cfg.head.form})
    return dict(zip(ROLES, cfg.model.weight_groups)), cfg.head.form


def _skeleton(spec, tokenizer, cfg):
    """Weight group ``spec``'s plain model (no LoRA) on the meta device, configured as ``build_model`` configures
    the whole one: untied, its vocabulary grown to the tokenizer's; a pretrained model's generation config read
    from its folder as ``from_pretrained`` reads it."""
    import torch

    from thinkrl.models.meta_loading import meta_model
    from thinkrl.models.roles import DTYPES, resolve_model_path, scratch_model

    dtype, attn = DTYPES[cfg.model.dtype], cfg.model.attn_implementation
    if spec.path == "scratch":
        with torch.device("meta"):
            return scratch_model(spec, tokenizer, dtype, attn)
    model = meta_model(spec.path, tokenizer, dtype, attn)
    if model.can_generate():
        from transformers import GenerationConfig

        folder = resolve_model_path(spec.path)
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder, _from_auto=True)
        except OSError:  # no generation_config.json: from config.json, as transformers falls back
            model.generation_config = GenerationConfig.from_pretrained(
                folder, config_file_name="config.json", _from_auto=True, _from_model_config=True
            )
    return model


def _save_configs(model, folder: Path) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


@dataclass
class _Source:
    """Where one tensor of the plain model comes from in the checkpoint."""

    base: str = ""
    lora: dict[str, str] = field(default_factory=dict)  # "A"/"B" -> the adapter's matrices
    markers: str = ""  # peft's trainable rows of the thought markers (trainable_tokens_delta)


def _sources(checkpoint: Path, tensors, group: str, skeleton) -> dict[str, _Source]:
    """Plain tensor name → its checkpoint tensors, for every tensor ``save_pretrained`` would write (one-line
    ConfigError when the checkpoint's tensors are not those of this model)."""
    from thinkrl.models.meta_loading import checkpoint_key

    sources: dict[str, _Source] = {}
    for name in tensors.names(f"{group}."):
        rest = name.removeprefix(f"{group}.")
        if ".lora_A." in rest or ".lora_B." in rest:
            module, after = rest.split(".lora_", 1)
            sources.setdefault(checkpoint_key(module) + ".weight", _Source()).lora[after[0]] = name
        elif ".trainable_tokens_delta." in rest:
            module = rest.split(".trainable_tokens_delta.")[0]
            sources.setdefault(checkpoint_key(module) + ".weight", _Source()).markers = name
        elif "lora_" in rest or "trainable_tokens_" in rest:
            _unfit(checkpoint, f"{name} is an adapter tensor export cannot merge")
        else:
            sources.setdefault(checkpoint_key(rest), _Source()).base = name
    expected = _saved_state(skeleton)
    for key, source in sources.items():
        if key not in expected or not source.base:
            _unfit(
                checkpoint, f"{source.base or next(iter(source.lora.values()), source.markers)} is not in the model"
            )
        saved, wanted = tuple(tensors.shape(source.base)), tuple(expected[key].shape)
        if saved != wanted:
            _unfit(checkpoint, f"{source.base} is {saved} there, {wanted} in the model")
        if source.lora and set(source.lora) != {"A", "B"}:
            _unfit(checkpoint, f"{key}'s LoRA adapter lacks a matrix")
    missing = [k for k in expected if k not in sources]
    if missing:
        _unfit(checkpoint, f"no tensor for {group}'s {missing[0]}")
    return sources


def _unfit(checkpoint: Path, why: str):
    raise ConfigError(
        f"checkpoint {checkpoint} does not fit its run's config.yaml ({why}); export the run folder it came from"
    )


def _saved_state(model) -> dict:
    """What ``save_pretrained`` saves of ``model`` (meta tensors: names, shapes, dtypes), in its order."""
    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    return state


def _merged(tensors, source: _Source, scaling: float, marker_ids: list[int]):
    """One tensor of the merged model, as peft's ``merge_and_unload`` computes it."""
    import torch

    weight = tensors.read(source.base)
    if source.lora:
        a, b = tensors.read(source.lora["A"]), tensors.read(source.lora["B"])
        half = b.dtype in (torch.float16, torch.bfloat16)  # peft multiplies half adapters in fp32 on the CPU
        delta = (b.float() @ a.float() if half else b @ a) * scaling
        weight += delta.to(b.dtype) if half else delta
    if source.markers:
        rows = tensors.read(source.markers)
        weight = weight.index_copy(0, torch.tensor(marker_ids), rows.to(weight))
    return weight


def _write_weights(folder: Path, skeleton, tensor, max_shard_size: int | str) -> None:
    """The model's safetensors files and index, named and split as ``save_pretrained`` names and splits them;
    ``tensor(name)`` gives each tensor when its turn comes."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = _saved_state(skeleton)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        _write_safetensors(folder / filename, {n: state[n] for n in names}, tensor, {"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": skeleton.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (folder / "model.safetensors.index.json").write_text(text, encoding="utf-8")


# safetensors' dtypes in its own order: a file's data is laid out by this order (highest first), then by name.
_DTYPE_ORDER = [
    ("bool", "BOOL"), ("uint8", "U8"), ("int8", "I8"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"),
    ("int16", "I16"), ("uint16", "U16"), ("float16", "F16"), ("bfloat16", "BF16"), ("int32", "I32"),
    ("uint32", "U32"), ("float32", "F32"), ("complex64", "C64"), ("float64", "F64"), ("int64", "I64"),
    ("uint64", "U64"),
]  # fmt: skip


def _write_safetensors(path: Path, specs: dict, tensor, metadata: dict[str, str]) -> None:
    """A safetensors file written as ``safetensors.torch.save_file`` writes it (same bytes), from the tensors'
    shapes and dtypes (``specs``), each tensor fetched by ``tensor(name)`` and written in place in turn."""
    import torch

    codes = {getattr(torch, name): (rank, code) for rank, (name, code) in enumerate(_DTYPE_ORDER)}
    order = sorted(specs, key=lambda n: (-codes[specs[n].dtype][0], n))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        spec = specs[name]
        size = spec.numel() * spec.element_size()
        header[name] = {
            "dtype": codes[spec.dtype][1],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            value = tensor(name).to(specs[name].dtype)
            if value.shape != specs[name].shape:
                raise ConfigError(f"{name} is {tuple(value.shape)} in the checkpoint, {tuple(specs[name].shape)} here")
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value


def describe_export(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> str:
    """What ``export_checkpoint`` would do, reading only (``--dry-run``)."""
    checkpoint, written, decision = _plan(checkpoint, out_dir, overwrite)
    return f"export {checkpoint} (weight groups {', '.join(written[3:])}) -> {decision.describe()}"


def _shard_size(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _export(args: argparse.Namespace) -> int:
    if args.dry_run:
        print(describe_export(args.checkpoint, args.out_dir, args.overwrite))
        return 0
    out = export_checkpoint(args.checkpoint, args.out_dir, args.overwrite, _shard_size(args.max_shard_size))
    print(f"exported {args.checkpoint} to {out} (roles.json says which folder plays which role)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint (sharded or not) as plain HF folders, one per weight group")
    p.add_argument("checkpoint", help="a checkpoint-<step>/ folder of a thinkrl run, or a run folder (its newest)")
    p.add_argument("out_dir", help="a new or empty folder, or an earlier export's (its files are replaced)")
    from thinkrl.cli import add_dry_run, add_overwrite

    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="split each model's weights into files of at most this size, as save_pretrained does (bytes, or "
        "e.g. 500MB); a sharded checkpoint is written one tensor at a time whatever the size",
    )
    add_overwrite(p, "the entries an export writes")
    add_dry_run(p)
    p.set_defaults(func=_export)
