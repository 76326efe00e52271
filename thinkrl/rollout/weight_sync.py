"""How the learner's reasoner weights reach a vLLM engine: in memory through vLLM's weight-transfer API, or (the
fallback, ``rollout.vllm_sync=disk``) through a ``save_pretrained`` folder the engine reloads.

The memory path hands vLLM a ``WeightSource`` over the reasoner in checkpoint naming (LoRA merged, FSDP2 shards
gathered one tensor at a time) and drives the transfer with a ``TrainerWeightTransferEngine`` from vLLM's factory:
``thinkrl_gloo`` (``gloo_transfer.py``) on machines without CUDA, through any ``VLLMWeightSyncClient`` — the
colocated engine's ``collective_rpc`` here, a server's HTTP routes in server mode.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from thinkrl.distributed.sharding import full_tensors, is_sharded
from thinkrl.models.meta_loading import checkpoint_key


def _keep(name: str) -> bool:
    return "lora_" not in name and "trainable_tokens" not in name


def _stack(name: str) -> str:
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else ""


@contextmanager
def merged(model):
    """A peft model with its adapters merged into the base weights for the duration (then restored)."""
    if not hasattr(model, "merge_adapter"):
        yield model
        return
    model.merge_adapter()
    try:
        yield model.get_base_model()
    finally:
        model.unmerge_adapter()


class ReasonerSource(WeightSource):
    """The reasoner's tensors as the engine's checkpoint loader names them. Groups are runs of one decoder layer
    (or the embedding / the head), in the model's own order: the sender holds one group in full at a time."""

    def __init__(self, model, device="cpu"):
        self.model, self.device = model, device  # where the sender needs the tensors (gloo: host, NCCL: the GPU)

    def _named(self, base) -> Iterator[tuple[str, torch.Tensor]]:
        items = full_tensors(base) if is_sharded(base) else base.state_dict().items()
        for name, tensor in items:
            if _keep(name):
                yield checkpoint_key(name), tensor

    def metadata(self) -> list[ParamMeta]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        state = base.state_dict()  # DTensors report their global shape: nothing is gathered here
        return [ParamMeta(checkpoint_key(n), t.dtype, tuple(t.shape)) for n, t in state.items() if _keep(n)]

    def groups(self) -> list[list[str]]:
        groups: list[list[str]] = []
        for meta in self.metadata():
            if groups and _stack(groups[-1][-1]) == _stack(meta.name):
                groups[-1].append(meta.name)
            else:
                groups.append([meta.name])
        return groups

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        with merged(self.model) as base:
            for name, tensor in self._named(base):
                yield name, tensor.detach().to(self.device)


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over a colocated engine: each call is a ``collective_rpc`` to its
    workers, run through ``call(method, kwargs)`` (the actor's dead-engine watch)."""

    def __init__(self, call: Callable[[str, dict], object]):
        self.call = call

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.call("init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self.call("start_weight_update", {})

    def update_weights(self, update_info) -> None:
        self.call("update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.call("finish_weight_update", {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_address_towards(host: str) -> str:
    """This machine's address as seen from ``host`` (where a server's workers must reach the learner)."""
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # no packet is sent: this only picks the outgoing interface
        return s.getsockname()[0]


def gloo_trainer(
    client, model, workers: int, host: str, timeout_s: float, is_sender: bool = True, shared_memory: bool = False
):
    """A ready ``thinkrl_gloo`` sender for ``workers`` engine workers (one per tensor-parallel rank of each engine);
    ``shared_memory``: every worker runs on this machine, so the buffers go through a shared slot, not TCP."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from thinkrl.rollout.gloo_transfer import GlooTrainerInitInfo, register

    register()
    info = GlooTrainerInitInfo(
        master_address=host,
        master_port=free_port(),
        world_size=1 + workers,
        timeout_s=timeout_s,
        rank=0,
        shared_memory=shared_memory,
    )
    if not is_sender:
        info.rank = 1  # only rank 0 sends; the others gather in step
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=ReasonerSource(model))


class _Versioned:
    """A weight-sync client whose ``finish_weight_update`` carries the version of the push under way: vLLM's NCCL
    sender finishes without one."""

    def __init__(self, client):
        self.client, self.version = client, None

    def __getattr__(self, name):
        return getattr(self.client, name)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.client.finish_weight_update(weight_version if weight_version is not None else self.version)


class NcclSender:
    """vLLM's own NCCL trainer engine (GPU to GPU, TRL's server-mode route) behind the gloo sender's interface."""

    def __init__(self, engine, client: _Versioned):
        self.engine, self.client = engine, client

    def send_weights(self, weight_version: str | None = None) -> None:
        self.client.version = weight_version
        self.engine.send_weights()

    def shutdown(self) -> None:
        self.engine.shutdown()


def nccl_trainer(client, model, workers: int, host: str, is_sender: bool = True) -> NcclSender:
    """A ready NCCL sender for ``workers`` served engine workers; the tensors go from the learner's GPU. Needs CUDA
    on both sides (``rollout.vllm_transfer``); not run on the CPU machines this project is tested on."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    info = NCCLTrainerInitInfo(
        master_address=host, master_port=free_port(), world_size=1 + workers, rank=0 if is_sender else 1
    )
    versioned = _Versioned(client)
    device = next(model.parameters()).device
    engine = WeightTransferTrainerFactory.trainer_init(info, client=versioned, source=ReasonerSource(model, device))
    return NcclSender(engine, versioned)
