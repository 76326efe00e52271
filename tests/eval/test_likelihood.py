"""GSM8K's likelihood score by hand: the digits renormalised, the leading space before the answer not scored."""

from __future__ import annotations

import math

import pytest
import torch

from thinkrl.eval.likelihood import answer_mask, answer_token_ids, digit_likelihood_logp, renormalised_logp

# A 6-token vocabulary: 0 = " ", 1 = "1", 2 = "2", 3 = "x", 4 = " -", 5 = pad.
SPACE, ONE, TWO, X, MINUS, PAD = range(6)
DIGITS, DELIMITER = torch.tensor([ONE, TWO]), torch.tensor([SPACE])
PROBS = [  # next-token distributions at the target positions (rows sum to 1)
    [0.48, 0.10, 0.20, 0.12, 0.05, 0.05],
    [0.10, 0.30, 0.10, 0.30, 0.10, 0.10],
    [0.05, 0.25, 0.50, 0.05, 0.05, 0.10],
]


def _logp() -> torch.Tensor:
    return torch.tensor(PROBS, dtype=torch.float64).log()


def test_digit_score_drops_the_space_and_renormalises_the_digits():
    # " 12": the space (p = 0.48) is the prompt's side; "1" → 0.30 / (0.30 + 0.10), "2" → 0.50 / (0.25 + 0.50).
    targets, mask = torch.tensor([SPACE, ONE, TWO]), torch.ones(3, dtype=torch.bool)
    expected = (0.30 / 0.40) * (0.50 / 0.75)
    assert math.exp(digit_likelihood_logp(_logp(), targets, mask, DIGITS, DELIMITER)) == pytest.approx(expected)
    # The old score kept the space's plain probability: about half as large.
    old = math.exp(renormalised_logp(_logp(), targets, mask, DIGITS))
    assert old == pytest.approx(0.48 * expected)


def test_digit_score_keeps_other_answer_tokens_and_ignores_padding():
    logp = _logp()
    # " -" of a negative answer is part of the answer: plain probability (0.05), then the digits as above.
    targets = torch.tensor([[MINUS, ONE, TWO], [SPACE, TWO, PAD]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scores = digit_likelihood_logp(logp.expand(2, -1, -1), targets, mask, DIGITS, DELIMITER).exp()
    assert scores.tolist() == pytest.approx([0.05 * (0.30 / 0.40) * (0.50 / 0.75), 0.10 / 0.40])
    # Only the leading run of spaces is dropped; a space inside the answer is scored.
    inner = torch.tensor([[SPACE, SPACE, ONE], [ONE, SPACE, TWO]])
    assert answer_mask(inner, torch.ones(2, 3, dtype=torch.bool), DELIMITER).tolist() == [
        [False, False, True],
        [True, True, True],
    ]


def test_space_tokens_are_whitespace_only():
    class Tok:
        vocab = [" ", "1", "Ġ2", "\n", "a b", "", "  "]

        def __len__(self):
            return len(self.vocab)

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    assert answer_token_ids(Tok(), "space").tolist() == [0, 3, 6]
    assert answer_token_ids(Tok(), "digits").tolist() == [1, 2]
