"""Pure maths of the likelihood scores (no I/O, no models).

Quiet-STaR reports a *likelihood score*, not generation accuracy: the teacher-forced probability of the gold
answer with each answer token's distribution renormalised over the tokens an answer can use (digits for
GSM8K, the letters for CommonsenseQA).

GSM8K's scored target is ``" " + answer``; with SmolLM2/Llama/Qwen-style tokenizers the space is a token of its
own, whose plain probability (≈0.5 for SmolLM2) would halve the score. That space is the delimiter between
prompt and answer, so it belongs to the prompt side: the score covers the answer's tokens after it (teacher-forced,
p(digits | prompt + " ") is what a prompt ending in the space would give). An answer token outside the digits (a
negative answer's " -") keeps its plain probability.
"""

from __future__ import annotations

import torch


def answer_token_ids(tokenizer, kind: str, labels: str = "ABCDE") -> torch.Tensor:
    """Vocabulary ids whose text (leading space dropped) is all digits (``kind='digits'``) or one label letter
    (``'letters'``); ``'space'``: ids whose text is whitespace only (the delimiter before an answer)."""

    def keep(text: str) -> bool:
        if kind == "space":
            return bool(text) and not text.strip()
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


def answer_mask(targets: torch.Tensor, mask: torch.Tensor, delimiter: torch.Tensor) -> torch.Tensor:
    """``mask`` without each target's leading run of ``delimiter`` tokens (the space before the answer).

    targets, mask (..., n); returns a bool mask (..., n)."""
    leading = torch.isin(targets, delimiter.to(targets.device)).long().cumprod(-1).bool()
    return mask.bool() & ~leading


def digit_likelihood_logp(
    logp: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, digits: torch.Tensor, delimiter: torch.Tensor
) -> torch.Tensor:
    """log of GSM8K's likelihood score: the answer's tokens after the leading delimiter, each digit renormalised
    over ``digits``. logp (..., n, V); targets, mask (..., n). Returns (...)."""
    return renormalised_logp(logp, targets, answer_mask(targets, mask, delimiter), digits)
