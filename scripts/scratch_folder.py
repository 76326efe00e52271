"""A model folder with random weights at the shapes of a ``config.json`` (any of them changed), plus a tokenizer: what
``model.default.path`` needs to run a GPU recipe's architecture offline, where the hub or the GPUs are out of reach.
The weights are transformers' own initialisation (seeded), saved as safetensors; the tokenizer is ByT5's (bytes, no
files needed) or one installed here, so ``model.tokenizer=auto`` reads it from the folder. thinkrl then loads the
folder as any pretrained model (sharded runs: on the meta device, each process reading its shards).

    # Qwen3-1.7B's shapes, every layer (configs/rlp/qwen3-1.7b_gpu.yaml's model), SmolLM2's BPE tokenizer:
    .venv/bin/python scripts/scratch_folder.py configs/models/qwen3-1.7b.json runs/scratch/qwen3-1.7b \
        --tokenizer smollm2-135m-instruct
    # a tiny model of the same architecture with a byte tokenizer (vocabulary = its 384 tokens):
    .venv/bin/python scripts/scratch_folder.py configs/models/qwen3-1.7b.json runs/scratch/qwen3-tiny \
        hidden_size=64 intermediate_size=128 num_hidden_layers=2 num_attention_heads=2 num_key_value_heads=1 \
        head_dim=32 vocab_size=384
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_scratch_folder(
    config_json: Path, out: Path, dtype: str = "float32", seed: int = 0, tokenizer: str = "byte", **changes
) -> Path:
    """``out`` gets ``config.json``, ``model.safetensors`` (random weights of the architecture ``config_json``
    names, with ``changes`` to its fields) and a tokenizer: ``byte`` (ByT5's) or a thinkrl model path or alias
    whose tokenizer to copy (``smollm2-135m-instruct``: a BPE tokenizer that is installed offline). Returns ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

    from thinkrl.models.roles import resolve_model_path

    # ByT5 cannot decode ids past its 384 tokens: give it a vocabulary of its size (vocab_size=384), while a fast
    # (BPE) tokenizer skips such ids, as a padded checkpoint vocabulary needs (Qwen: 151,936 rows, 151,669 tokens).
    if tokenizer == "byte":
        tokenizer = ByT5Tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
    fields = {k: v for k, v in json.loads(Path(config_json).read_text()).items() if not k.startswith("_")}
    fields.pop("torch_dtype", None)
    # the special tokens are the tokenizer's (the original ids may lie outside a shrunk vocabulary)
    eos = tokenizer.eos_token_id
    fields.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **changes)
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _value(text: str):
    """``key=value`` overrides: ints, floats, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a config.json, e.g. configs/models/qwen3-1.7b.json")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("changes", nargs="*", help="config fields to change: num_hidden_layers=2 hidden_size=64 ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default="byte", help="byte (ByT5), or a model path/alias: its tokenizer")
    args = parser.parse_args(argv)
    changes = {k: _value(v) for k, v in (item.split("=", 1) for item in args.changes)}
    out = write_scratch_folder(args.config, args.out, args.dtype, args.seed, args.tokenizer, **changes)
    print(out)


if __name__ == "__main__":
    main()
