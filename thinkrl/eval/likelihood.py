"""Pure maths of the likelihood scores (no I/O, no models).

Quiet-STaR reports a *likelihood score*, not generation accuracy: the teacher-forced probability of the gold
answer with each answer token's distribution renormalised over the tokens an answer can use (digits for
GSM8K, the letters for CommonsenseQA). A target token outside that set (e.g. a lone leading space) keeps its
plain probability.
"""

from __future__ import annotations

import torch


def answer_token_ids(tokenizer, kind: str, labels: str = "ABCDE") -> torch.Tensor:
    """Vocabulary ids whose text (leading space dropped) is all digits (``kind='digits'``) or one label letter."""

    def keep(text: str) -> bool:
        text = text.lstrip(" ").replace("Ġ", "").replace("▁", "")
        return text.isdigit() and text.isascii() if kind == "digits" else text in labels and len(text) == 1

    ids = [i for i in range(len(tokenizer)) if keep(tokenizer.decode([i]))]
    return torch.tensor(ids, dtype=torch.long)


def renormalised_logp(logp: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, allowed: torch.Tensor):
    """Σ_j log p̃(y_j) over the unmasked target tokens, p̃ = p renormalised over ``allowed`` when y_j ∈ allowed.

    logp (..., n, V) log-probabilities; targets, mask (..., n). Returns (...)."""
    picked = logp.gather(-1, targets[..., None]).squeeze(-1)
    mass = torch.logsumexp(logp.index_select(-1, allowed.to(logp.device)), dim=-1)
    inside = torch.isin(targets, allowed.to(targets.device))
    per_token = torch.where(inside, picked - mass, picked)
    return (per_token * mask).sum(-1)
