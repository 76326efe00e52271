"""HF backend of the rollout actor: a hand-rolled KV-cached sampling loop on the learner's own reasoner.

Why not ``generate(num_return_sequences=K)``: it copies each context K times *before* the prefill, so the
context is computed K times. Here the context (plus the start marker) is prefilled once per position and
its cache is repeated K times; then all N*K thoughts decode together, one token per step. The sampler is
the learner's model object, so its weights are never stale.
"""

from __future__ import annotations

import torch

from thinkrl.models.shared_prefix import decode_step, prefill
from thinkrl.rollout.base import RolloutActor, ThoughtBatch, empty_thoughts
from thinkrl.rollout.policy import policy_logits, sample_tokens


class HFRolloutActor(RolloutActor):
    def __init__(self, cfg, model, sot_id: int, eot_id: int, pad_id: int):
        super().__init__(cfg, sot_id, eot_id, pad_id)
        self.model = model

    @torch.no_grad()
    def sample(self, contexts, num_thoughts, seeds) -> ThoughtBatch:
        if num_thoughts == 0:
            return empty_thoughts(len(contexts), self.model.device)
        was_training = self.model.training
        self.model.eval()
        try:
            step = self.cfg.batch_positions
            parts = [
                self._sample_chunk(contexts[i : i + step], num_thoughts, seeds[i : i + step])
                for i in range(0, len(contexts), step)
            ]
        finally:
            self.model.train(was_training)
        width = max(p.thought_ids.shape[-1] for p in parts)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=v)  # noqa: E731
        return ThoughtBatch(
            torch.cat([pad(p.thought_ids, self.pad_id) for p in parts]),
            torch.cat([pad(p.thought_mask, False) for p in parts]),
            torch.cat([pad(p.sampler_logps, 0.0) for p in parts]),
            torch.cat([p.finished for p in parts]),
            torch.cat([p.lengths for p in parts]),
        )

    def _sample_chunk(self, contexts, k: int, seeds: list[int]) -> ThoughtBatch:
        fixed = self.cfg.length_mode == "fixed"
        max_len, temp = self.cfg.max_thought_len, self.cfg.temperature
        cache, mask, prefix_len, logits = prefill(self.model, [c + [self.sot_id] for c in contexts], self.pad_id)
        cache.batch_repeat_interleave(k)
        mask, prefix_len, logits = (t.repeat_interleave(k, 0) for t in (mask, prefix_len, logits))
        rows, device = len(contexts) * k, logits.device
        ids = torch.full((rows, max_len), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((rows, max_len), device=device)
        acted = torch.zeros((rows, max_len), dtype=torch.bool, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        for t in range(max_len):
            noise = torch.cat([torch.rand((k, logits.shape[-1]), generator=g) for g in generators]).to(device)
            tokens, token_logps = sample_tokens(
                policy_logits(logits, temp, self.sot_id, self.eot_id, fixed), self.cfg.top_p, noise
            )
            active = ~done
            ids[active, t], logps[active, t], acted[active, t] = tokens[active], token_logps[active], True
            stopped = active & (tokens == self.eot_id)
            lengths += (active & ~stopped).long()
            done |= stopped
            if done.all() or t == max_len - 1:
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            feed = torch.where(active, tokens, torch.full_like(tokens, self.pad_id))[:, None]
            logits = decode_step(self.model, cache, mask, (prefix_len + t)[:, None], feed).logits[:, -1]
        finished = done if not fixed else torch.ones_like(done)
        width = int(acted.sum(-1).max())
        shape = (len(contexts), k, -1)
        return ThoughtBatch(
            ids[:, :width].reshape(shape),
            acted[:, :width].reshape(shape),
            logps[:, :width].reshape(shape),
            finished.reshape(len(contexts), k),
            lengths.reshape(len(contexts), k),
        )
