"""Answer extraction on tricky generations: markers, formatting, signs, units, articles."""

from __future__ import annotations

import pytest

from thinkrl.eval.answers import extract_choice, extract_number, numbers_equal

NUMBER_CASES = [
    # "####" wins over everything, even a later "The answer is".
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 5\nThe answer is 7", "5"),
    ("first #### 3 then #### 4", "4"),
    ("#### 1,000,000", "1000000"),
    ("####-3", "-3"),
    ("#### $ 42.", "42"),
    ("####\nso the total is 18", "18"),  # empty "####": fall back to the last number
    # "The answer is" / "Answer:" markers.
    ("He has 3 apples. The answer is 5.", "5"),
    ("The answer is $1,234.50.", "1234.5"),
    ("the answer is: 12 apples, not 13", "12"),
    ("So 4 + 4 = 8. Answer: 8 dollars", "8"),
    ("The answer is 3. Wait, the ANSWER IS 4 because 2*2 = 4", "4"),
    ("The answer is:\n\n  **18**", "18"),
    ("The answer is 5.00.", "5"),
    ("The answer is - as computed - 10 then 1", "10"),
    ("The answer is unclear. Overall she paid 7 dollars", "7"),  # marker without a nearby number is ignored
    # Last number in the text.
    ("She buys 3 packs of 12, so 36", "36"),
    ("It costs $ 42", "42"),
    ("The total is 42.", "42"),
    ("It weighs 42kg", "42"),
    ("Growth was 50%", "50"),
    ("x = -3", "-3"),
    ("5-3", "3"),  # a binary minus is not a sign
    ("10 - 3", "3"),
    ("The temperature fell to −4 degrees", "-4"),  # unicode minus
    ("owes -$5 now", "-5"),
    ("scored +7 points", "7"),
    ("the share is 2.5 units", "2.5"),
    ("the share is 2.50", "2.5"),
    ("3/4 of the cake", "3/4"),
    ("about .5 of it", "0.5"),
    ("version 1.2.3", "1.2"),
    ("then 007 agents", "7"),
    ("Total 12,345 people and 6 dogs", "6"),
    ("a list 1,2,3", "3"),
    ("-0 is zero", "0"),
    ("no digits here at all", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), NUMBER_CASES)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_is_idempotent_on_its_output():
    for _, expected in NUMBER_CASES:
        if expected is not None:
            assert extract_number(expected) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        ("72", "72", True),
        ("1234", "1,234", True),
        ("5", "5.00", True),
        ("$5", "5", True),
        ("0.75", "3/4", True),
        ("2.5", "2.50", True),
        ("-3", "3", False),
        ("70", "72", False),
        (None, "72", False),
        ("The answer is 72.", "72", True),  # raw text is extracted as well
        ("#### 72", "#### 72", True),
        ("1/0", "1/0", True),  # not a value: compared as strings
        ("abc", "abc", True),
        ("abc", "72", False),
    ],
)
def test_numbers_equal(pred, gold, equal):
    assert numbers_equal(pred, gold) is equal


CHOICE_CASES = [
    ("(C)", "C"),
    (" (C) store", "C"),
    ("C) store", "C"),
    ("The answer is C", "C"),
    ("the answer is: (D)", "D"),
    ("Answer: E. because it fits", "E"),
    ("(A) is wrong; the answer is B", "B"),  # an explicit statement beats a listed option
    ("The answer is A, no wait, the answer is D.", "D"),  # the last statement is the final one
    (" C", "C"),
    ("C.", "C"),
    ("B: bank", "B"),
    ("A.", "A"),
    ("A\n", "A"),
    ("(a) is my pick", "A"),
    ("A person would go to the B", "B"),  # "A" as an article is not a label
    ("A person walks in", None),
    ("E.g. a bank", None),  # an abbreviation is not a label
    ("I think it is D", "D"),
    ("choose C or D", "C"),
    ("C is right", "C"),
    ("I think it is C", "C"),
    ("Clearly the bank", None),  # a capital inside a word is not a label
    ("nothing to pick", None),
    ("F", None),  # not among the labels
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), CHOICE_CASES)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_custom_labels():
    assert extract_choice("(F)", labels="ABCDEF") == "F"
    assert extract_choice("The answer is E", labels="ABCD") is None
    assert extract_choice("I think it is C", labels="ABCDEFGHIJ") == "C"  # "I" the pronoun is not a label
