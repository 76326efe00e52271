"""Activation (gradient) checkpointing of decoder layers that works with KV caches (``gradient_checkpointing``).

Each decoder layer's forward runs inside a non-reentrant ``torch.utils.checkpoint`` whenever autograd records: the
forward keeps only the layer's inputs, and the backward pass runs the layer again to rebuild what its gradient needs.

Why not transformers' ``gradient_checkpointing_enable``:
  * it checkpoints only in train mode, and pretrained models load in eval mode (the trainer never switches them),
    so it would silently do nothing for them;
  * under it every layer drops its ``past_key_values`` (the recompute would write the cache a second time), so a
    continuation on a prefix cache (``shared_prefix.forward_shared_prefix``: context once, K thoughts after it)
    would stop attending to the context — different values, no error.
Here the recompute sees the cache exactly as the layer's forward saw it: the layer's cache entry (transformers
``Cache.layers[layer_idx]``, whose updates replace tensors rather than write into them) is copied before the forward,
a copy of that is put in for the recompute, and the live one restored after it; the layer's writes during the
recompute land in the throwaway copy. What the recompute needs of the cache is its state *before* the layer wrote
to it (e.g. the shared prefix's keys/values), so a caller done with a cache may drop its contents
(``shared_prefix.forward_shared_prefix`` does): the continuation's keys/values then need not outlive the forward.
The attention implementation in force during the forward is restored for the recompute too (parallel passes switch
it for one forward only; see ``parallel_attention``).

Under ``torch.no_grad`` (sampling, evaluation) layers run as before. FSDP2 sharding wraps the layer modules from
outside; the recompute runs inside their backward, where FSDP2 has gathered the weights.
"""

from __future__ import annotations

import copy
import functools
import types
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from thinkrl.errors import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (every transformers model marks them ``GradientCheckpointingLayer``)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer of ``model`` (in place); returns how many."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no decoder layers transformers marks as checkpointable; "
            "set gradient_checkpointing=false for its model"
        )
    for layer in layers:
        # A method bound to the layer (not a closure over it), so that a deep copy of the model rebinds to the copy.
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return len(layers)


def is_checkpointed(model: nn.Module) -> bool:
    return any(getattr(layer.forward, "__func__", None) is _checkpointed_forward for layer in decoder_layers(model))


def _attention_configs(layer: nn.Module) -> list:
    """The configs the layer's modules read their attention implementation from (usually the model's one)."""
    found = {}
    for module in layer.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found[id(config)] = config
    return list(found.values())


def _cache_index(layer: nn.Module) -> int | None:
    """The cache entry the layer reads and writes (its attention's ``layer_idx``), or None if it does not say."""
    for module in layer.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    return None


def _cache_snapshot(layer: nn.Module, cache) -> dict[int, object] | None:
    """Copies of the cache entries the layer may touch, as they are now: its own entry when it names it (holding on to
    the others would keep every later layer's keys/values alive until the backward), else all of them. An entry that
    does not exist yet is recorded as None (the recompute then must not see it either)."""
    if cache is None:
        return None
    index = _cache_index(layer)
    indices = range(len(cache.layers)) if index is None else [index]
    return {i: copy.copy(cache.layers[i]) if i < len(cache.layers) else None for i in indices}


@contextmanager
def _as_in_forward(cache, snapshot: dict | None, configs: list, attn: list):
    """For the recompute: the cache entries as the forward saw them (copies, so that its writes go nowhere), and the
    attention implementation it ran with (``parallel_attention`` switches it for one forward only, and the backward
    comes later)."""
    live_layers = cache.layers if cache is not None else None
    live_attn = [c._attn_implementation for c in configs]
    if cache is not None:
        layers = list(live_layers)
        for i, entry in sorted(snapshot.items()):
            if entry is None:  # created by this very forward: the recompute starts without it again
                del layers[i:]
                break
            layers[i] = copy.copy(entry)
        cache.layers = layers
    for config, name in zip(configs, attn):
        config._attn_implementation = name
    try:
        yield
    finally:
        if cache is not None:
            cache.layers = live_layers
        for config, name in zip(configs, live_attn):
            config._attn_implementation = name


def _checkpointed_forward(layer: nn.Module, *args, **kwargs):
    """The layer's own forward, under a non-reentrant checkpoint whose recompute runs as the forward did."""
    forward = functools.partial(type(layer).forward, layer)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    cache = next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)
    snapshot = _cache_snapshot(layer, cache)  # the same tensors, in objects the forward won't touch
    configs = _attention_configs(layer)
    attn = [c._attn_implementation for c in configs]
    calls = []

    def replayable(*args_, **kwargs_):
        if not calls:  # the forward: updates the live cache as usual
            calls.append(True)
            return forward(*args_, **kwargs_)
        with _as_in_forward(cache, snapshot, configs, attn):
            return forward(*args_, **kwargs_)

    return checkpoint(replayable, *args, use_reentrant=False, **kwargs)
