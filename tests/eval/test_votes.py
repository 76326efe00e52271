"""maj@K, best-of-K and the rates over thoughts, on hand-made records whose answers are known."""

from __future__ import annotations

import pytest

from thinkrl.eval.metrics import csqa_metrics, gsm8k_metrics, majority


def test_majority_ignores_missing_answers_and_breaks_ties_by_the_earliest_thought():
    assert majority(["7", "8", "7", None]) == "7"
    assert majority([None, "8", "7"]) == "8"  # 1 vote each: the earlier thought's answer
    assert majority(["3", "5", "5", "3"]) == "3"
    assert majority([None, None]) is None
    assert majority([2, 0, 0]) == 0


def _gsm8k(item, correct, rewards, maj_correct):
    thoughts = [{"reward": r, "length": 3, "finished": True} for r in rewards]
    k = len(correct)
    return {
        "id": item,
        "answer_tokens": 2,
        "thoughts": thoughts,
        "none": {"answer_logp": -2.0, "likelihood": 0.1, "correct": False},
        "null": {"answer_logp": -2.0, "likelihood": 0.1, "correct": False},
        "sampled": {
            "answer_logp": [-2.0 + r for r in rewards],
            "likelihood": [0.1] * k,
            "correct": correct,
            "maj_correct": maj_correct,
        },
    }


def _means(collector):
    return {k: sum(v) / len(v) for k, v in collector.values.items()}


def test_gsm8k_accuracy_maj_best_and_null_rate_by_hand():
    records = [
        _gsm8k(0, [True, True, False], [0.5, -0.1, 0.2], True),  # best thought 0: correct; majority right
        _gsm8k(1, [False, True, False], [-0.3, -0.2, -0.4], False),  # no thought beats null; best (1) correct
        _gsm8k(2, [False, False, True], [0.1, 0.0, 0.9], False),  # best (2) correct, majority wrong
        _gsm8k(3, [False, False, False], [0.0, 0.0, 0.0], False),  # a tie at 0 does not beat the null thought
    ]
    m = _means(gsm8k_metrics(records, ["none", "null", "sampled:3"]))
    assert m["sampled:3/accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 0) / 4)
    assert m["sampled:3/accuracy_maj"] == pytest.approx(1 / 4)
    assert m["sampled:3/accuracy_best"] == pytest.approx(3 / 4)
    assert m["sampled:3/null_rate"] == pytest.approx(2 / 4)
    assert m["sampled:3/reward_mean"] == pytest.approx((0.6 / 3 - 0.9 / 3 + 1.0 / 3 + 0) / 4)
    # best-of-K NLL: the highest answer log-prob per item, per token (2 answer tokens)
    assert m["sampled:3/nll_best"] == pytest.approx(-((-1.5) + (-2.2) + (-1.1) + (-2.0)) / 2 / 4)


def test_csqa_letter_accuracy_maj_and_best_by_hand():
    def rec(item, letters, rewards, gold="B"):
        return {
            "id": item,
            "gold": gold,
            "labels": ["A", "B", "C"],
            "answer_tokens": 1,
            "thoughts": [{"reward": r, "length": 2, "finished": False} for r in rewards],
            "null": {
                "letter_logp": [-1, -1, -1],
                "text_logp": [-1, -1, -1],
                "text_norm_logp": [-1, -1, -1],
                "gold_logp": -1.0,
            },
            "sampled": {
                "letter_logp": letters,
                "text_logp": letters,
                "text_norm_logp": letters,
                "gold_logp": [row[1] for row in letters],
            },
        }

    picks_b, picks_a, picks_c = [-2, -0.1, -3], [-0.1, -2, -3], [-3, -2, -0.1]
    records = [
        rec(0, [picks_b, picks_b, picks_a], [0.0, 0.3, 0.1]),  # vote B (right), best thought 1 picks B
        rec(1, [picks_a, picks_c, picks_b], [0.0, 0.1, 0.5]),  # one vote each: the first thought's A; best picks B
        rec(2, [picks_c, picks_c, picks_b], [0.9, 0.1, 0.2]),  # vote C, best picks C
    ]
    m = _means(csqa_metrics(records, ["null", "sampled:3"]))
    assert m["sampled:3/letter_accuracy_maj"] == pytest.approx(1 / 3)
    assert m["sampled:3/letter_accuracy_best"] == pytest.approx(2 / 3)
    assert m["sampled:3/letter_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert m["sampled:3/null_rate"] == 0.0
