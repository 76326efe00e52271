"""Rollout actors by backend name (``rollout.backend``)."""

from __future__ import annotations

from thinkrl.config import RolloutConfig
from thinkrl.errors import ConfigError
from thinkrl.rollout.base import RolloutActor, ThoughtBatch


def _hf(cfg: RolloutConfig, roles, run_dir, max_model_len: int) -> RolloutActor:
    from thinkrl.rollout.hf_actor import HFRolloutActor

    return HFRolloutActor(cfg, roles.model("reasoner"), roles.sot_id, roles.eot_id, roles.tokenizer.pad_token_id)


def _vllm(cfg: RolloutConfig, roles, run_dir, max_model_len: int) -> RolloutActor:
    if cfg.vllm_mode == "server":
        from thinkrl.rollout.vllm_server import VLLMServerActor as actor_cls
    else:
        from thinkrl.rollout.vllm_actor import VLLMRolloutActor as actor_cls

    return actor_cls(
        cfg,
        roles.model("reasoner"),
        roles.tokenizer,
        roles.sot_id,
        roles.eot_id,
        roles.tokenizer.pad_token_id,
        run_dir,
        max_model_len,
    )


ACTORS = {"hf": _hf, "vllm": _vllm}


def make_actor(cfg: RolloutConfig, roles, run_dir=".", max_model_len: int = 512) -> RolloutActor:
    """The sampler named by ``rollout.backend``. ``max_model_len`` bounds context + thought (vLLM's KV cache)."""
    if cfg.backend not in ACTORS:
        raise ConfigError(f"rollout.backend={cfg.backend} is unknown; use one of {', '.join(ACTORS)}")
    return ACTORS[cfg.backend](cfg, roles, run_dir, max_model_len)


__all__ = ["ACTORS", "RolloutActor", "ThoughtBatch", "make_actor"]
