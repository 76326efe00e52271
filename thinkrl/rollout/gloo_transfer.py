"""A gloo backend for vLLM's weight-transfer API: the learner's tensors reach a vLLM engine over TCP, never the disk.

vLLM ships weight-transfer engines for NCCL and CUDA IPC, which need CUDA. This one carries the same protocol
(``init_weight_transfer_engine`` → ``start_weight_update`` → ``update_weights`` → ``finish_weight_update``) over a
gloo process group of its own, so colocated engines and ``vllm serve`` servers take in-memory syncs on CPU machines
too. It registers with vLLM's ``WeightTransferEngineFactory`` (worker side) and ``WeightTransferTrainerFactory``
(learner side) through the ``vllm.general_plugins`` entry point in pyproject.toml, which every vLLM process loads.

Wire format: the learner announces every tensor's name, dtype and shape in the ``update_weights`` request, grouped
by decoder layer (vLLM's ``layerwise_groups``); then it sends one flat byte buffer per group. The worker cuts
each buffer back into tensors and hands them to ``model.load_weights`` inside vLLM's layerwise reload, which
re-packs the CPU backend's kernels as a checkpoint load does. At most one layer is ever full on either side.

The buffers travel one of two ways. Over the gloo group (TCP), which works across machines. Or, for an engine on
the learner's machine (colocated), through one shared-memory slot the size of the largest group, mapped by both
sides (the CPU counterpart of the CUDA IPC handles other frameworks use): the learner writes a group into it, a
barrier says it is ready, the worker copies it out, a second barrier frees the slot. The slot's file in /dev/shm
is unlinked once both sides have mapped it, so a killed run leaves nothing behind. Loopback TCP costs more than
vLLM's reload itself on a busy CPU (docs/benchmarks.md#weight-sync).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "thinkrl_gloo"


def _group(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo group of its own (not the default one: the learner may run under accelerate's, the worker under
    vLLM's). Rank 0, the learner, hosts the rendezvous store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(dist.PrefixStore("thinkrl-weights", store), rank, world_size, timeout), store


def _broadcast(group, buffer: torch.Tensor):
    """Rank 0's ``buffer`` to every rank; returns the pending work."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([buffer], opts)


def _barrier(group):
    return group.barrier(dist.BarrierOptions())


def _wait_unless_failed(work, received, timeout_s: float) -> None:
    """The learner's side of a collective with the workers: done, or the workers' ``update_weights`` call failed
    (a worker that refused the update never joins, and the collective would wait out its whole timeout)."""
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if received.done():
            received.result()  # raises the workers' error
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine's workers did not take the weights within {timeout_s:.0f} s")
        time.sleep(0.002)
    work.wait()


SHM_DIR = "/dev/shm"
logger = logging.getLogger(__name__)


def _shared_slot(nbytes: int) -> tuple[torch.Tensor, str] | None:
    """A fresh shared-memory file of ``nbytes`` mapped here, or None where /dev/shm is missing or too small (Docker's
    default is 64 MB): the buffers then go over the gloo group."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    if stat.f_bavail * stat.f_frsize < 2 * nbytes:
        logger.info("weight sync over TCP: %s has less than %.0f MB free", SHM_DIR, 2 * nbytes / 2**20)
        return None
    path = os.path.join(SHM_DIR, f"thinkrl-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    return torch.from_file(path, shared=True, size=max(nbytes, 32), dtype=torch.uint8), path


def _map_learners_slot(path: str, nbytes: int, token: str) -> torch.Tensor:
    """The worker's view of the learner's slot. torch.from_file would create a missing file, so a worker that does
    not see the learner's /dev/shm (another machine or container) must fail here, not load zeros."""
    if not os.path.isfile(path):
        raise RuntimeError(f"weight-transfer slot {path} is not visible to this engine: it runs on another machine")
    slot = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    if bytes(slot[: len(token)].tolist()) != token.encode():
        raise RuntimeError(f"weight-transfer slot {path} holds another learner's data")
    return slot


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    timeout_s: float = 300.0
    shm_path: str = ""  # the shared-memory slot of an engine on the learner's machine ("" = over the group)
    shm_bytes: int = 0
    shm_token: str = ""  # written at the slot's start by the learner: proves both sides map the same memory
    embedding_shape: list[int] = field(default_factory=list)  # the learner's (vocab, width): checked before joining


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    group_sizes: list[int]  # tensors per broadcast buffer, in order

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes) == sum(self.group_sizes):
            raise ValueError("names, dtype_names, shapes and group_sizes disagree in length")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Worker side: receives the learner's buffers and loads them through vLLM's layerwise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group, self._store, self.slot = None, None, None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self._check_model(init_info.embedding_shape)
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        if init_info.shm_path:  # mapped before joining: the learner unlinks the file once everyone has joined
            self.slot = _map_learners_slot(init_info.shm_path, init_info.shm_bytes, init_info.shm_token)
        self.group, self._store = _group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def _check_model(self, embedding_shape: list[int]) -> None:
        """Refuse a learner of another vocabulary or width when it joins: a weight update that fails after
        ``start_weight_update`` leaves vLLM's model half reloaded (meta tensors), and the engine dies on its next
        request."""
        vocab, hidden = self.model_config.get_vocab_size(), self.model_config.get_hidden_size()
        if embedding_shape and tuple(embedding_shape) != (vocab, hidden):
            raise ValueError(
                f"the learner's embedding is {tuple(embedding_shape)} but this engine's model is {vocab} tokens x "
                f"{hidden} wide: it serves another model or vocabulary"
            )

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialised: call init_weight_transfer_engine first")
        _barrier(self.group).wait()  # ready: the learner starts sending only now
        start = 0
        for size in update_info.group_sizes:
            names = update_info.names[start : start + size]
            dtypes = [getattr(torch, d) for d in update_info.dtype_names[start : start + size]]
            shapes = update_info.shapes[start : start + size]
            start += size
            nbytes = [torch.Size(s).numel() * d.itemsize for s, d in zip(shapes, dtypes)]
            if self.slot is not None:
                _barrier(self.group).wait()  # the learner has written this group
                buffer = self.slot[: sum(nbytes)].clone()  # the reload may keep references until a layer is whole
                _barrier(self.group).wait()  # the slot is free for the next group
            else:
                buffer = torch.empty(sum(nbytes), dtype=torch.uint8)
                _broadcast(self.group, buffer).wait()
            tensors = [
                part.view(d).view(s) for part, d, s in zip(torch.split(buffer, nbytes), dtypes, shapes, strict=True)
            ]
            self.model.load_weights(list(zip(names, tensors)))

    def shutdown(self) -> None:
        self.group, self._store, self.slot = None, None, None


def _host_group(join, init_info):
    """Host the group (rank 0) while ``join()`` makes the workers join it. A worker that refuses to join (another
    model) fails ``join`` at once, while hosting would wait out the whole timeout: so the hosting waits in a daemon
    thread, abandoned when ``join`` fails."""
    hosted: dict = {}

    def host():
        try:
            hosted["group"] = _group(
                init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
            )
        except BaseException as exc:  # re-raised below
            hosted["error"] = exc

    thread = threading.Thread(target=host, daemon=True, name="thinkrl-weights-host")
    thread.start()
    with ThreadPoolExecutor(max_workers=1) as pool:
        joined = pool.submit(join)
        while thread.is_alive():
            thread.join(0.05)
            if joined.done() and joined.exception() is not None:
                raise joined.exception()
        joined.result()
    if "error" in hosted:
        raise hosted["error"]
    return hosted["group"]


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    master_address: str = "127.0.0.1"
    master_port: int = 0
    world_size: int = 2  # the learner plus every worker of every engine it feeds
    timeout_s: float = field(default=300.0)
    shared_memory: bool = False  # every engine runs on the learner's machine: buffers through a shared slot


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Learner side: every rank iterates the source (a gather is collective under FSDP2); the sender broadcasts."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True, timeout_s: float = 300.0):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.timeout_s = timeout_s
        self.group, self._store, self.slot = None, None, None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, timeout_s=init_info.timeout_s)
        if not engine.is_sender:
            return engine
        worker_info = GlooInitInfo(
            init_info.master_address, init_info.master_port, init_info.world_size, 1, init_info.timeout_s
        )
        worker_info.embedding_shape = engine._embedding_shape()
        shared = _shared_slot(engine._largest_group()) if init_info.shared_memory else None
        if shared is not None:
            engine.slot, worker_info.shm_path = shared
            worker_info.shm_bytes, worker_info.shm_token = engine.slot.numel(), uuid.uuid4().hex
            engine.slot[:32].copy_(torch.tensor(list(worker_info.shm_token.encode()), dtype=torch.uint8))
        try:
            engine.group, engine._store = _host_group(
                lambda: client.init_weight_transfer_engine(asdict(worker_info)), init_info
            )
        finally:
            if shared is not None:
                os.unlink(worker_info.shm_path)  # both sides hold the mapping; nothing is left if a run is killed
        return engine

    def _embedding_shape(self) -> list[int]:
        return next((list(m.shape) for m in self.source.metadata() if m.name.endswith("embed_tokens.weight")), [])

    def _largest_group(self) -> int:
        meta = {m.name: m for m in self.source.metadata()}
        return max(
            sum(torch.Size(meta[n].shape).numel() * meta[n].dtype.itemsize for n in g) for g in self.source.groups()
        )

    def send_weights(self, weight_version: str | None = None) -> None:
        if not self.is_sender:  # still gather in step with the sender (a collective under FSDP2)
            for _ in self.source.iter_groups():
                pass
            return
        meta = self.source.metadata()
        sizes = [len(names) for names in self.source.groups()]
        info = GlooUpdateInfo(
            [m.name for m in meta],
            [str(m.dtype).removeprefix("torch.") for m in meta],
            [list(m.shape) for m in meta],
            sizes,
        )
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)  # the workers receive while we send
        received = pool.submit(self.client.update_weights, asdict(info))
        wait = lambda work: _wait_unless_failed(work, received, self.timeout_s)  # noqa: E731
        try:
            wait(_barrier(self.group))  # every worker is in its receive call
            for _names, tensors in self.source.iter_groups():  # one layer gathered at a time
                flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
                if self.slot is not None:
                    offset = 0
                    for part in flat:
                        self.slot[offset : offset + part.numel()].copy_(part)
                        offset += part.numel()
                    wait(_barrier(self.group))  # written
                    wait(_barrier(self.group))  # copied out by every worker
                else:
                    wait(_broadcast(self.group, torch.cat(flat) if len(flat) > 1 else flat[0].clone()))
            received.result()
        finally:
            pool.shutdown(wait=False)  # a failed transfer's call is abandoned, not waited for
        self.client.finish_weight_update(weight_version)

    def shutdown(self) -> None:
        self.group, self._store, self.slot = None, None, None


class _RotaryCacheNotice(logging.Filter):
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights" on every sync: a rotary layer's only
    tensor is its ``cos_sin_cache`` buffer, computed from the config and absent from every checkpoint, so the reload
    puts the engine's own cache back. No learned weight is involved (tests/rollout/test_vllm_server.py checks the
    engine's log-probs against the learner's after each sync), so the notice is dropped; any other layer's stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def register() -> None:
    """vLLM plugin hook (``vllm.general_plugins``): make ``thinkrl_gloo`` a weight-transfer backend."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryCacheNotice) for f in reload_log.filters):
        reload_log.addFilter(_RotaryCacheNotice())

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, __name__, "GlooTrainerWeightTransferEngine")
