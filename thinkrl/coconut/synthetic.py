"""Chained arithmetic mod 10: the project's own multi-step task, so the whole curriculum runs on a CPU.

A problem is a start digit and ``num_ops`` operations read left to right, ``3 +4 *7 -2``; each reasoning step
writes one intermediate value (``3 +4 = 7``, ``7 *7 = 9``, ``9 -2 = 7``) and the answer is the last one.
Every operation is a bijection mod 10 (+/- any of 1..9, * one of 3, 7, 9), so the answer is uniform over 0-9 and
cannot be guessed from one operation: without the steps a model must compose all of them in one forward pass
(chance: 10%), with them each step is a single table lookup. Tokens are whole words: one per digit, one per
operation (``+4`` is one token), ``=``, ``###`` and newline, so the published text format survives unchanged.
One token per operation puts operation k at the same distance from the k-th latent (c_thought=1) for every k,
so the one learned "apply the next operation" step serves every latent of the chain.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from thinkrl.coconut.config import SyntheticChainConfig

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
OPERANDS = {"+": list(range(1, 10)), "-": list(range(1, 10)), "*": [3, 7, 9]}
OPERATIONS = [f"{op}{x}" for op, xs in OPERANDS.items() for x in xs]  # "+4": one token each
WORDS = [str(d) for d in range(10)] + OPERATIONS + ["=", "###", "\n"]


def chain_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer built in memory: spaces separate words, a newline is a word of its own, bos first."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split(Regex("\n"), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def _apply(value: int, op: str, operand: int) -> int:
    return {"+": value + operand, "-": value - operand, "*": value * operand}[op] % 10


def chain_problems(cfg: SyntheticChainConfig, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` problems {question, steps, answer}; the same seed gives the same problems; questions in ``exclude``
    (e.g. the training set's) are skipped."""
    rng = np.random.default_rng(seed)
    problems, seen = [], set(exclude)
    ops = list(OPERANDS)
    while len(problems) < n:
        value = int(rng.integers(0, 10))
        question, steps = [str(value)], []
        for _ in range(cfg.num_ops):
            op = ops[int(rng.integers(0, len(ops)))]
            operand = OPERANDS[op][int(rng.integers(0, len(OPERANDS[op])))]
            new = _apply(value, op, operand)
            question.append(f"{op}{operand}")
            steps.append(f"{value} {op}{operand} = {new}")
            value = new
        text = " ".join(question)
        if text in seen:
            continue
        seen.add(text)
        problems.append({"question": text, "steps": steps, "answer": str(value)})
    return problems


def chain_splits(cfg: SyntheticChainConfig, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train / valid / test problems. The task (not the training seed) fixes them, so runs with different
    trainer seeds are compared on the same problems."""
    train = chain_problems(cfg, cfg.train_size, seed)
    valid = chain_problems(cfg, cfg.eval_size, seed + 1, {p["question"] for p in train})
    test = chain_problems(cfg, cfg.test_size, seed + 2, {p["question"] for p in train + valid})
    return {"train": train, "valid": valid, "test": test}
