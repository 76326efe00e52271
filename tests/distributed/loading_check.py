"""Run under a 2-process launch: build a recipe's roles twice, whole then sharded (today's loading) and on the meta
device then filled from the files (``models/meta_loading``), and write how their gathered tensors compare as JSON.

    accelerate launch ... tests/distributed/loading_check.py OUT.json RECIPE.yaml [overrides...]
"""

import json
import sys
from functools import partial

import torch
import torch.distributed as dist

from thinkrl.config import load_config
from thinkrl.distributed.sharding import full_tensors, mixed_precision, shard_roles
from thinkrl.models.meta_loading import fill_sharded
from thinkrl.models.roles import build_roles


def loaded(cfg, meta: bool):
    torch.manual_seed(cfg.trainer.seed)
    roles = build_roles(cfg, meta=meta)
    shard_roles(roles, torch.device("cpu"), mixed_precision("no"), partial(fill_sharded, cfg, roles.tokenizer))
    return roles


def main(out: str, recipe: str, *overrides: str) -> None:
    dist.init_process_group("gloo")  # the launcher's environment: rank, world size, address
    cfg = load_config(recipe, list(overrides))
    whole, meta = loaded(cfg, meta=False), loaded(cfg, meta=True)
    vocab = len(whole.tokenizer)
    report = {"tensors": {}, "buffers": {}, "on_meta": [], "dtypes": {}}
    for group in whole.models:
        pairs = zip(full_tensors(whole.models[group]), full_tensors(meta.models[group]))
        for (name, a), (name_b, b) in pairs:
            assert name == name_b, (name, name_b)
            entry = {"shape": list(a.shape), "max_diff": float((a.float() - b.float()).abs().max())}
            if a.dim() == 2 and a.shape[0] == vocab:  # embedding / LM head: rows the checkpoint lacks, apart
                entry["row_diff"] = (a.float() - b.float()).abs().amax(1).tolist()
                entry["row_std"] = b.float().std(1).tolist()
            if "lora_A" in name:
                entry["std"] = [float(a.float().std()), float(b.float().std())]
            report["tensors"][f"{group}.{name}"] = entry
            report["dtypes"][f"{group}.{name}"] = str(b.dtype)
        buffers = dict(meta.models[group].named_buffers())
        for name, a in whole.models[group].named_buffers():
            report["buffers"][f"{group}.{name}"] = float((a.float() - buffers[name].float()).abs().max())
        report["on_meta"] += [n for n, p in meta.models[group].named_parameters() if p.to_local().is_meta]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
