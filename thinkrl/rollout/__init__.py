"""Rollout actors by backend name (``rollout.backend``)."""

from __future__ import annotations

from thinkrl.config import RolloutConfig
from thinkrl.errors import ConfigError
from thinkrl.rollout.base import RolloutActor, ThoughtBatch


def _hf(cfg: RolloutConfig, roles) -> RolloutActor:
    from thinkrl.rollout.hf_actor import HFRolloutActor

    return HFRolloutActor(cfg, roles.model("reasoner"), roles.sot_id, roles.eot_id, roles.tokenizer.pad_token_id)


ACTORS = {"hf": _hf}


def make_actor(cfg: RolloutConfig, roles) -> RolloutActor:
    if cfg.backend not in ACTORS:
        raise ConfigError(f"rollout.backend={cfg.backend} is not available in this version; use rollout.backend=hf")
    return ACTORS[cfg.backend](cfg, roles)


__all__ = ["ACTORS", "RolloutActor", "ThoughtBatch", "make_actor"]
