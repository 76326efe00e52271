"""FSDP2 sharding of the role models and the mixing head (``trainer.sharding=fsdp2``).

Every decoder layer is its own FSDP2 unit and each model is one more (its embeddings, final norm and LM head);
weights, gradients and optimizer state rest sharded. In a training step a unit's weights are gathered at its
first forward and stay gathered until ``reshard_all`` after backward (FSDP2's reshard_after_forward=False):
the scorer computes a shared prefix once and reuses its keys/values through a KV cache, so backward reaches a
layer's first call through the cache rather than through that call's outputs, where FSDP2 would gather again.
Gradients are reduce-scattered (averaged) in backward, so the hand-written averaging of unsharded runs is not
used. The scorer may also call a model's LM head directly on hidden states after that model's forward.

Sampling and evaluation run inside ``gathered``: forwards there issue no collectives, so processes may run
different numbers of decoding steps (a batch stops when its thoughts have ended).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from thinkrl.errors import ConfigError
from thinkrl.models.checkpointing import decoder_layers as checkpointed_layers
from thinkrl.models.meta_loading import to_empty_keeping_buffers


def uses_fsdp2(accelerator, setting: str) -> bool:
    """Whether this run shards: ``trainer.sharding=fsdp2`` or an accelerate FSDP launch (which must be FSDP2).

    thinkrl applies ``fully_shard`` itself either way (accelerate's plugin does not engage on CPU-only machines,
    and the scorer needs the models unwrapped); a single process gets a process group of its own."""
    kind = accelerator.distributed_type.value
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"{kind} launches are not supported; shard with FSDP2 (configs/accelerate/fsdp2.yaml, or "
            "trainer.sharding=fsdp2 under any accelerate launch)"
        )
    if kind == "FSDP":
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(f"the accelerate config asks for FSDP version {version}; set fsdp_version: 2")
    elif setting not in ("fsdp2", "hsdp"):
        return False
    if not dist.is_initialized():
        backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def hsdp_mesh(setting: str, device_type: str) -> DeviceMesh | None:
    """``trainer.sharding=hsdp``: a 2-D mesh (machines × processes per machine) on which FSDP2 shards within a
    machine and replicates across machines (gradients reduce-scattered inside a machine, then all-reduced between
    the replicas); None for fsdp2 (one 1-D mesh over every process, FSDP2's default)."""
    if setting != "hsdp":
        return None
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise ConfigError(
            f"trainer.sharding=hsdp needs the same process count on every machine ({world} over {local})"
        )
    return init_device_mesh(device_type, (world // local, local), mesh_dim_names=("replicate", "shard"))


def shard_group(mesh: DeviceMesh | None):
    """The processes that together hold each parameter once: a machine under hsdp, everyone under fsdp2."""
    return mesh["shard"].get_group() if mesh is not None else None


def vllm_memory_need(param_count: int, world: int, compute_bytes: int) -> int:
    """Bytes one process needs for training next to a vLLM engine: fp32 weights, gradients and two AdamW moments
    sharded over ``world`` (16 bytes per parameter), plus the whole model gathered in the compute dtype for
    evaluation. Activations come on top."""
    return (16 * param_count) // world + compute_bytes * param_count


def check_vllm_fits(roles, rollout_cfg, world: int) -> None:
    """On a GPU, refuse fsdp2 + a per-process vLLM engine when the engine's share leaves too little for training."""
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    params = sum(p.numel() for m in roles.modules().values() for p in m.parameters())
    need = vllm_memory_need(params, world, 2)
    free = total * (1 - rollout_cfg.vllm_gpu_memory_utilization)
    if need > free:
        raise ConfigError(
            f"fsdp2 training needs about {need / 2**30:.1f} GiB per GPU but rollout.vllm_gpu_memory_utilization="
            f"{rollout_cfg.vllm_gpu_memory_utilization} leaves {free / 2**30:.1f} GiB next to the vLLM engine; "
            "lower it, use more processes, or set rollout.backend=hf"
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (LoRA-wrapped or not), found as gradient checkpointing finds
    them (``models.checkpointing.decoder_layers``): each becomes one FSDP2 unit."""
    layers = checkpointed_layers(model)
    if not layers:
        hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
        raise ConfigError(
            f"trainer.sharding=fsdp2 cannot find the decoder layers of {type(hf or model).__name__} (no module of it "
            "is a transformers GradientCheckpointingLayer); use trainer.sharding=none or a model class built of them"
        )
    return layers


def mixed_precision(name: str) -> MixedPrecisionPolicy:
    """accelerate's ``mixed_precision`` → FSDP2 policy: bf16 compute, fp32 master weights and gradient reductions."""
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if name in ("no", None):
        return MixedPrecisionPolicy()
    raise ConfigError(f"trainer.sharding=fsdp2 supports mixed_precision bf16 or no, not {name}; launch with bf16")


def shard_model(model: nn.Module, policy: MixedPrecisionPolicy, mesh: DeviceMesh | None = None) -> None:
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    model.set_reshard_after_backward(False)  # recurses: reshard_all does it once the whole backward is done


def shard_roles(roles, device: torch.device, policy: MixedPrecisionPolicy, fill=None, mesh=None) -> None:
    """Shard every weight group's model and the mixing head in place (build the optimizer afterwards); ``mesh``:
    see ``hsdp_mesh``.

    A model built on the meta device (``models/meta_loading``) is sharded there, given empty local shards, and
    then ``fill(group, model, made)`` writes them (``made``: its buffers that were on the meta device too)."""
    for group, model in roles.models.items():
        if any(p.is_meta for p in model.parameters()):
            shard_model(model, policy, mesh)
            fill(group, model, to_empty_keeping_buffers(model, device))
            continue
        model.to(device)
        shard_model(model, policy, mesh)
    roles.head.to(device)
    if any(True for _ in roles.head.parameters()):
        fully_shard(roles.head, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        roles.head.set_reshard_after_backward(False)


def shard_copy(copy: nn.Module, device: torch.device, policy: MixedPrecisionPolicy, mesh=None) -> None:
    """Shard a meta-device copy of a role model (``rl.ema.meta_copy``) by the calls ``shard_roles`` made on the
    model (same units, mesh and policy), so every parameter gets the placements of the one it copies; then give it
    empty local shards on ``device``, its real buffers kept. The caller fills them."""
    shard_model(copy, policy, mesh)
    to_empty_keeping_buffers(copy, device)


def shard_sizes(roles) -> dict[str, dict[str, int]]:
    """Parameters this process holds of each weight group and the head, against their full counts."""
    sizes = {}
    for name, module in roles.modules().items():
        params = list(module.parameters())
        sizes[name] = {
            "local": sum(_local(p).numel() for p in params),
            "full": sum(p.numel() for p in params),
        }
    return sizes


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def _units(roots) -> list[FSDPModule]:
    return [m for root in roots for m in root.modules() if is_sharded(m)]


def reshard_all(roots) -> None:
    """Free the gathered weights of every unit under ``roots``; gradients are reduced by now. Call it after the
    last backward before an optimizer step, since a unit that is still gathered would not gather the new weights."""
    for m in _units(roots):
        m.reshard()


@contextmanager
def gathered(roots):
    """Keep the weights of ``roots`` (FSDP2 root modules; unsharded ones are passed over) gathered inside.

    Forwards inside issue no collectives, so each process may call them any number of times. No gradients."""
    units = _units(roots)
    for m in units:
        m.unshard()
    try:
        with torch.no_grad():
            yield
    finally:
        for m in units:
            m.reshard()


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def group_grad_norms(param_groups: list[dict], group=None) -> dict[str, float]:
    """L2 norm of each optimizer group's gradients across all shards (one all-reduce over ``group``, the processes
    holding each parameter once: ``shard_group``; every process gets them)."""
    squares = torch.stack(
        [
            sum(
                (_local(p.grad).float().pow(2).sum() for p in g["params"] if p.grad is not None),
                torch.zeros((), device=g["params"][0].device),
            )
            for g in param_groups
        ]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares, group=group)
    return {g["name"]: float(s.sqrt()) for g, s in zip(param_groups, squares)}


def clip_gradients(params: list[torch.Tensor], total_norm: float, max_norm: float) -> None:
    """Scale sharded gradients as torch's clip_grad_norm_ would, given the global norm."""
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def full_tensors(model: nn.Module):
    """Yield ``(name, full tensor)`` for the model's state dict, gathering one tensor at a time.

    Every process must consume it in step (each gather is a collective)."""
    for name, value in model.state_dict().items():
        yield name, value.full_tensor() if isinstance(value, DTensor) else value
