"""Answer scoring: exact match after normalisation, option letters, yes/no."""

import pytest

from fastv_analysis.scoring import is_correct, normalize, option_letter


@pytest.mark.parametrize("pred, answer, ok", [
    ("Red", "red", True),
    ("red.", "red", True),
    ("the red", "red", True),
    ("  RED  ", "red", True),
    ("reddish", "red", False),
    ("blue", "red", False),
    ("Yes, there is.", "yes", True),
    ("no", "yes", False),
    ("There is no", "no", True),
    ("", "red", False),
])
def test_short_answers(pred, answer, ok):
    assert is_correct(pred, answer) is ok


@pytest.mark.parametrize("pred, answer, ok", [
    ("B", "B", True),
    ("(B)", "B", True),
    ("B. a cat", "B", True),
    ("a cat", "B", True),      # the text of option B
    ("A", "B", False),
    ("B", 1, True),            # index answers (ScienceQA exports)
    ("B", "1", True),
    ("E", "B", False),         # no option E
])
def test_multiple_choice(pred, answer, ok):
    assert is_correct(pred, answer, ["a dog", "a cat", "a bird"]) is ok


def test_normalize_and_letter():
    assert normalize("The  Big, red ball!") == "big red ball"
    assert option_letter("c) bird", ["x", "y", "z"]) == "C"
    assert option_letter("nothing", ["x"]) is None


def test_numeric_options_are_read_as_text_first():
    assert is_correct("B", "3", ["2", "3", "4"])
    assert is_correct("3", "3", ["2", "3", "4"])
    assert not is_correct("A", "3", ["2", "3", "4"])
    assert is_correct("C", "2", ["x", "y", "z"])  # an index where no option reads "2"
