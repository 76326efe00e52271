"""The EMA reference of ``reward.baseline=ema`` (RLP): r(z) = log p_θ(y | x, z) − log p_EMA(y | x).

A frozen copy of the interpreter's weight group, moved towards the live weights after every optimizer step
(``core_algos.ema_update_``), reads each position's context and predicts its targets with no thought, through the
same forwards as the no-thought LM baseline (``lm_baseline``: markers masked, window or per-position reads). Its
weights are a checkpointed object of the run, saved and restored bit for bit, so a resumed run measures rewards
against the same reference as an uninterrupted one.

Unsharded runs: the copy is a ``deepcopy`` of the interpreter model, hooks included, so its forwards count towards
that weight group's compute (forward only, under no_grad: it never takes gradients); its weights are accelerate
custom state.

Sharded runs (``trainer.sharding=fsdp2|hsdp``): the copy is made on the meta device before the models are sharded
(``meta_copy``), sharded by the same ``fully_shard`` calls on the same mesh (``sharding.shard_copy``), so each of its
parameters is a DTensor with the placements of the live parameter it follows, and given the live local shards. The
update runs on local tensors, shard by shard (no gather, no collective); the forward goes through FSDP2 like the live
model's (all-gathered per decoder layer, resharded right after). Its checkpoint is sharded too: every process writes
its shards into the checkpoint's DCP folder under ``ema.`` (``distributed.checkpoint``), which reshards on load, so a
resume works under any process count and in either mode (an unsharded checkpoint's whole EMA weights are cut into
this process's shards on load).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from thinkrl.rl import core_algos


def meta_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` with every parameter on the meta device (no storage) and its buffers real, for
    sharding: the structure of the EMA copy before its weights exist."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).requires_grad_(False)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writing it writes the parameter), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class EmaReference:
    """``model``: the live interpreter model; ``sharded_copy``: under FSDP2, its copy sharded like it
    (``meta_copy`` then ``sharding.shard_copy``), whose local shards are filled here; None: a whole deepcopy."""

    def __init__(self, model: nn.Module, decay: float, sharded_copy: nn.Module | None = None):
        self.sharded = sharded_copy is not None
        self.model = (sharded_copy if self.sharded else copy.deepcopy(model)).requires_grad_(False).eval()
        self.decay = decay
        self._live = dict(model.named_parameters())
        self._ema = dict(self.model.named_parameters())
        # Frozen weights never move; which ones are frozen is settled when the roles are built, before this copy.
        self._moving = [n for n, p in self._live.items() if p.requires_grad]
        if self.sharded:
            missing = set(self._ema) ^ set(self._live)
            if missing:
                raise ValueError(f"the sharded EMA copy does not fit its model ({sorted(missing)[0]} differs)")
            with torch.no_grad():
                live_buffers = dict(model.named_buffers())
                for name, buf in self.model.named_buffers():  # FSDP2 does not shard buffers: whole on every process
                    buf.copy_(live_buffers[name])
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """The EMA weights become the live ones (after a warm-up that trained them); sharded: local shard by shard."""
        for name, param in self._live.items():
            _local(self._ema[name]).copy_(_local(param))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the live weights (call after each optimizer step); sharded: on the local shards."""
        ema = [_local(self._ema[n]) for n in self._moving]
        core_algos.ema_update_(ema, [_local(self._live[n]).detach() for n in self._moving], self.decay)

    @torch.no_grad()
    def logps(self, target_logps) -> torch.Tensor:
        """``target_logps(model) → (log-probs, mask)`` on the EMA copy: the reference log-probs of a batch. No grad:
        the compute counter takes a forward under grad for one whose backward follows. Sharded, the weights are
        gathered by the forward (a collective: every process calls this once per micro-batch) and freed here."""
        logp, _ = target_logps(self.model)
        if self.sharded:
            from thinkrl.distributed.sharding import reshard_all

            reshard_all([self.model])
        return logp

    # accelerate custom checkpoint object
    def state_dict(self) -> dict:
        if self.sharded:  # the weights are in the checkpoint's sharded/ folder (distributed.checkpoint)
            return {"decay": self.decay, "weights": None}
        return {"decay": self.decay, "weights": {n: p.detach().cpu().clone() for n, p in self._ema.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["weights"] is None:  # a sharded checkpoint: loaded with the models (distributed.checkpoint)
            return
        missing = set(self._ema) ^ set(state["weights"])
        if missing:
            raise ValueError(f"the checkpoint's EMA weights do not fit this model ({len(missing)} names differ)")
        if self.sharded:  # an unsharded checkpoint's whole weights: each process keeps its shards of them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, state["weights"], options=options)
            return
        with torch.no_grad():
            for name, value in state["weights"].items():
                self._ema[name].copy_(value)
