"""Coconut evaluation: batched greedy generation (any batch size) after the question and the stage's latents.

Scores as published: the answer is the generated text after the last ``#`` with commas removed, compared exactly
with the gold answer (commas removed). ``cot_match``: the generated text before the first ``#`` equals the reasoning
steps the model still writes at that stage (whitespace-normalised, since word-level tokenizers decode with spaces).
``new_tokens``: mean generated tokens per problem, eos included.
"""

from __future__ import annotations

import torch

from thinkrl.coconut.config import CurriculumConfig
from thinkrl.coconut.curriculum import plan
from thinkrl.coconut.data import SpecialIds, TokenizedProblem, prompt_ids
from thinkrl.coconut.latent_forward import generate_with_latents


def extract_answer(text: str) -> str:
    return text.split("#")[-1].replace(",", "").strip()


def _squash(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    problems: list[TokenizedProblem],
    stage: int,
    curriculum: CurriculumConfig,
    ids: SpecialIds,
    batch_size: int,
    max_new_tokens: int,
) -> tuple[dict, list[dict]]:
    """Returns (metrics {accuracy, cot_match, new_tokens, n, stage}, one record per problem)."""
    was_training = model.training
    model.eval()
    records = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        plans = [plan(stage, len(p.steps), curriculum) for p in chunk]
        prompts = [prompt_ids(p, pl, ids) for p, pl in zip(chunk, plans)]
        outputs = generate_with_latents(
            model, prompts, ids.latent, ids.pad, ids.eos, max_new_tokens, feed_latents=curriculum.mode == "coconut"
        )
        for p, pl, new in zip(chunk, plans, outputs):
            text = tokenizer.decode(new, skip_special_tokens=True)
            gold = p.raw["answer"].replace(",", "").strip()
            steps = "\n".join(p.raw["steps"][pl.steps_skipped :])
            records.append(
                {
                    "question": p.raw["question"],
                    "output": text,
                    "answer": gold,
                    "prediction": extract_answer(text),
                    "correct": extract_answer(text) == gold,
                    "cot_match": _squash(text.split("#")[0]) == _squash(steps),
                    "new_tokens": len(new),
                    "latents": pl.n_latents,
                }
            )
    model.train(was_training)
    n = max(len(records), 1)
    metrics = {
        "accuracy": sum(r["correct"] for r in records) / n,
        "cot_match": sum(r["cot_match"] for r in records) / n,
        "new_tokens": sum(r["new_tokens"] for r in records) / n,
        "n": len(records),
        "stage": stage,
    }
    return metrics, records
