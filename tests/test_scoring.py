"""Answer scoring: exact match after normalisation, option letters, yes/no."""

import json

import pytest

from fastv_analysis.data import load_questions
from fastv_analysis.scoring import is_correct, normalize, prediction_options, reference_options


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
    ("b)", "B", True),
    ("B.", 1, True),
    ("E", "B", False),         # no option E
    ("B", "1", False),         # a string is a letter or an option text, never an index
])
def test_multiple_choice(pred, answer, ok):
    assert is_correct(pred, answer, ["a dog", "a cat", "a bird"]) is ok


def test_normalize_and_prediction_parsing():
    assert normalize("The  Big, red ball!") == "big red ball"
    assert prediction_options("c) bird", ["x", "y", "z"]) == {2}
    assert prediction_options("(B) y", ["x", "y", "z"]) == {1}
    assert prediction_options("nothing", ["x"]) == set()
    assert prediction_options("C. z", ["x", "y"]) == set()      # no option C


def test_numeric_option_texts_are_texts_not_indices():
    assert is_correct("B", "3", ["2", "3", "4"])
    assert is_correct("3", "3", ["2", "3", "4"])
    assert not is_correct("A", "3", ["2", "3", "4"])
    assert not is_correct("C", "2", ["x", "y", "z"])  # "2" is neither a letter nor an option text


def test_string_zero_answer_is_the_text_of_option_b():
    assert reference_options("0", ["1", "0"]) == {1}
    assert is_correct("B", "0", ["1", "0"])
    assert not is_correct("A", "0", ["1", "0"])


def test_letter_answer_is_read_as_a_letter_before_option_text():
    assert reference_options("B", ["B", "A"]) == {1}
    assert reference_options("(A)", ["B", "A"]) == {0}
    assert is_correct("B", "B", ["B", "A"])
    assert not is_correct("A", "B", ["B", "A"])


def test_int_answer_from_a_question_file_is_an_option_index(tmp_path):
    f = tmp_path / "q.jsonl"
    row = {"image": "a.png", "question": "1 - 1 = ?", "answer": 0, "choices": ["1", "0"]}
    f.write_text(json.dumps(row) + "\n")
    (q,) = load_questions(f)
    assert q.answer == 0 and reference_options(q.answer, q.choices) == {0}
    assert is_correct("A", q.answer, q.choices)
    assert not is_correct("B", q.answer, q.choices)
    assert is_correct("1", q.answer, q.choices)      # the text of option A
    assert not is_correct("0", q.answer, q.choices)  # the text of option B


def test_duplicated_option_texts_accept_the_text_but_only_the_right_letter():
    choices = ["cat", "cat", "dog"]
    assert prediction_options("Cat.", choices) == {0, 1}
    assert is_correct("cat", 1, choices)
    assert is_correct("B", 1, choices)
    assert not is_correct("A", 1, choices)
    assert not is_correct("dog", 1, choices)
    assert reference_options("cat", choices) == {0, 1}
    assert is_correct("A", "cat", choices) and is_correct("B", "cat", choices)
    assert not is_correct("C", "cat", choices)


def test_bool_and_out_of_range_answers_are_not_option_indices():
    assert reference_options(True, ["a dog", "a cat"]) == set()
    assert not is_correct("B", True, ["a dog", "a cat"])
    assert reference_options(5, ["a dog", "a cat"]) == set()
    assert not is_correct("A", -1, ["a dog", "a cat"])
