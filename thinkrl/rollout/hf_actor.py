"""HF backend of the rollout actor: hand-rolled KV-cached sampling on the learner's own reasoner.

Why not ``generate(num_return_sequences=K)``: it copies each context K times *before* the prefill, so the
context is computed K times. Here the context (plus the start marker) is prefilled once per position and
its cache is repeated K times; then all N*K thoughts decode together, one token per step. The sampler is
the learner's model object, so its weights are never stale.

Many positions of one text (``sample_windows``): the window is read once and every slot's K thoughts grow together,
one token per pass, attending to the shared window keys and their own earlier tokens (``parallel_passes``).
Both ways draw the same noise from each position's seed, so they sample the same thoughts (tested).
"""

from __future__ import annotations

import torch

from thinkrl.data.windows import WindowBatch
from thinkrl.models.parallel_passes import read_window, run_passes
from thinkrl.models.shared_prefix import decode_step, prefill
from thinkrl.rollout.base import RolloutActor, ThoughtBatch, empty_thoughts
from thinkrl.rollout.thought_recorder import ThoughtRecorder


def _concat(parts: list[ThoughtBatch], pad_id: int) -> ThoughtBatch:
    width = max(p.thought_ids.shape[-1] for p in parts)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=v)  # noqa: E731
    return ThoughtBatch(
        torch.cat([pad(p.thought_ids, pad_id) for p in parts]),
        torch.cat([pad(p.thought_mask, False) for p in parts]),
        torch.cat([pad(p.sampler_logps, 0.0) for p in parts]),
        torch.cat([p.finished for p in parts]),
        torch.cat([p.lengths for p in parts]),
    )


class HFRolloutActor(RolloutActor):
    def __init__(self, cfg, model, sot_id: int, eot_id: int, pad_id: int):
        super().__init__(cfg, sot_id, eot_id, pad_id)
        self.model = model

    def _in_eval_mode(self, fn, *args):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return fn(*args)
        finally:
            self.model.train(was_training)

    def sample(self, contexts, num_thoughts, seeds) -> ThoughtBatch:
        if num_thoughts == 0:
            return empty_thoughts(len(contexts), self.model.device)
        step = self.cfg.batch_positions
        parts = [
            self._in_eval_mode(self._sample_chunk, contexts[i : i + step], num_thoughts, seeds[i : i + step])
            for i in range(0, len(contexts), step)
        ]
        return _concat(parts, self.pad_id)

    def _sample_chunk(self, contexts, k: int, seeds: list[int]) -> ThoughtBatch:
        max_len = self.cfg.max_thought_len
        cache, mask, prefix_len, logits = prefill(self.model, [c + [self.sot_id] for c in contexts], self.pad_id)
        cache.batch_repeat_interleave(k)
        mask, prefix_len, logits = (t.repeat_interleave(k, 0) for t in (mask, prefix_len, logits))
        rec = ThoughtRecorder(len(contexts), k, max_len, self.pad_id, logits.device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        for t in range(max_len):
            feed = rec.step(t, logits, generators, self.cfg, self.sot_id, self.eot_id)
            if rec.all_done or t == max_len - 1:
                break
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)], dim=1)
            logits = decode_step(self.model, cache, mask, (prefix_len + t)[:, None], feed[:, None]).logits[:, -1]
        return rec.result(self.cfg.length_mode == "fixed")

    def sample_windows(self, batch: WindowBatch, num_thoughts: int, seeds: list[int]) -> ThoughtBatch:
        if num_thoughts == 0:
            return empty_thoughts(batch.num_positions, self.model.device)
        return self._in_eval_mode(self._sample_passes, batch, num_thoughts, seeds)

    def _sample_passes(self, batch: WindowBatch, k: int, seeds: list[int]) -> ThoughtBatch:
        """Pass t feeds token t of every thought (the start marker first) at every slot of every window."""
        b, p = batch.slot_len.shape
        window = read_window(self.model, batch.ids)
        valid = batch.valid.flatten()
        rec = ThoughtRecorder(batch.num_positions, k, self.cfg.max_thought_len, self.pad_id, batch.ids.device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        feed = torch.full((b, k, p, 1), self.sot_id, dtype=torch.long, device=batch.ids.device)
        history: dict = {}
        for t in range(self.cfg.max_thought_len):
            _, logits = run_passes(self.model, window, feed, batch.slot_len, t, history, need_logits=True)
            # (B, K, P, V) → rows of valid slots, position-major: (N*K, V)
            rows = logits[:, :, :, 0].permute(0, 2, 1, 3).reshape(b * p, k, -1)[valid].reshape(-1, logits.shape[-1])
            tokens = rec.step(t, rows, generators, self.cfg, self.sot_id, self.eot_id)
            if rec.all_done or t == self.cfg.max_thought_len - 1:
                break
            grid = torch.full((b * p, k), self.pad_id, dtype=torch.long, device=tokens.device)
            grid[valid] = tokens.reshape(-1, k)
            feed = grid.reshape(b, p, k).permute(0, 2, 1)[..., None].contiguous()
        return rec.result(self.cfg.length_mode == "fixed")
