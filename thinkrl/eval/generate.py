"""Greedy continuations (the answer a model writes after a context and a thought), on HF or the vLLM engine.

HF decoding reuses the same cached prefill/decode steps as thought sampling. Generation stops at an end id
(eos, the thought markers) or once a stop string appears after the leading whitespace; the text is cut there.
"""

from __future__ import annotations

import torch

from thinkrl.models.shared_prefix import decode_step, prefill
from thinkrl.models.true_tokens import mask_markers


@torch.no_grad()
def hf_greedy(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    stop_strings: list[str],
    marker_ids: list[int] = (),
) -> list[list[int]]:
    """Greedy tokens after each prompt; ``marker_ids`` are never chosen (an answer is true tokens, as the
    unmodified model would write them)."""
    pad = tokenizer.pad_token_id
    markers = torch.tensor(list(marker_ids), dtype=torch.long, device=model.device)
    cache, mask, lengths, logits = prefill(model, prompts, pad)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    positions = lengths.clone()
    for _ in range(max_new_tokens):
        nxt = mask_markers(logits.float(), markers).argmax(-1)
        for i, token in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if token in stop_ids:
                done[i] = True
                continue
            out[i].append(token)
            done[i] = any(s in tokenizer.decode(out[i]).lstrip() for s in stop_strings)
        if all(done):
            break
        nxt = torch.where(torch.tensor(done, device=nxt.device), torch.full_like(nxt, pad), nxt)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = decode_step(model, cache, mask, positions[:, None], nxt[:, None], logits_to_keep=1).logits[:, -1]
        positions = positions + 1
    return out


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """The text before the first stop string; leading whitespace never stops (a model often starts with '\\n')."""
    text = text.lstrip()
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


class Generator:
    """Greedy answers for a role's model: through the vLLM engine when it serves that model, else HF."""

    def __init__(self, roles, actor, batch_size: int):
        self.roles, self.actor, self.batch_size = roles, actor, batch_size
        tok = roles.tokenizer
        self.marker_ids = roles.marker_ids
        self.stop_ids = sorted({tok.eos_token_id, *self.marker_ids} - {None})

    def _uses_engine(self, role: str) -> bool:
        return hasattr(self.actor, "generate_greedy") and self.roles.shared(role, "reasoner")

    def __call__(self, role: str, prompts: list[list[int]], max_new_tokens: int, stop_strings: list[str]) -> list[str]:
        if not prompts:
            return []
        tok = self.roles.tokenizer
        if self._uses_engine(role):
            ids = self.actor.generate_greedy(prompts, max_new_tokens, self.stop_ids, self.marker_ids)
        else:
            model = self.roles.model(role)
            ids = []
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                ids += hf_greedy(model, tok, chunk, max_new_tokens, self.stop_ids, stop_strings, self.marker_ids)
        return [cut_at_stop(tok.decode([t for t in seq if t not in self.stop_ids]), stop_strings) for seq in ids]
