"""The learner's log-probs of sampled thoughts (``rollout.policy.thought_logps``): what a sampler's must equal."""

from __future__ import annotations

import torch

from thinkrl.rollout.policy import thought_logps


def hf_logps(cfg, roles, thoughts, contexts) -> torch.Tensor:
    """(N, K, M) log pi(action) under the HF reasoner, zero off the thought mask."""
    with torch.no_grad():
        logps, _ = thought_logps(
            roles.model("reasoner"),
            contexts,
            thoughts,
            roles.sot_id,
            roles.eot_id,
            roles.tokenizer.pad_token_id,
            cfg.rollout.temperature,
            cfg.rollout.length_mode == "fixed",
        )
    return logps
