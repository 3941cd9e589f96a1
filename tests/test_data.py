"""Question-file loader: the shipped toy split and LLaVA / lmms-style files read alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastv_analysis.data import Question, load_questions

TOY_VQA = Path(__file__).resolve().parents[1] / "data" / "toy-vqa" / "questions.jsonl"


def test_reads_the_shipped_toy_split_with_absolute_existing_images():
    qs = load_questions(TOY_VQA)
    assert len(qs) >= 400 and len({q.image for q in qs}) >= 200
    assert all(isinstance(q, Question) and q.image.is_absolute() and q.image.exists() for q in qs[:50])
    assert qs[0].question_id == "toy-0000-0" and qs[0].category and qs[0].answer


def test_reads_an_lmms_style_file_with_question_label_and_choices(tmp_path):
    rows = [
        {"id": 7, "image": "a.png", "question": "Which animal?", "label": "B", "choices": ["cat", "dog"]},
        {"question_id": "x1", "image": "sub/b.jpg", "text": "Is there a car?", "answer": "no"},
    ]
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b = load_questions(f)
    assert (a.question_id, a.text, a.answer, a.choices) == ("7", "Which animal?", "B", ["cat", "dog"])
    assert a.image == tmp_path / "a.png"
    assert (b.question_id, b.text, b.answer, b.choices) == ("x1", "Is there a car?", "no", None)
    assert b.image == tmp_path / "sub" / "b.jpg"


def test_malformed_line_is_rejected_with_file_and_line_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"image": "a.png", "text": "q", "answer": "a"})
    f.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3") as err:
        load_questions(f)
    assert "\n" not in str(err.value)


def test_line_missing_a_required_key_names_the_key_and_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"image": "a.png", "text": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1.*answer"):
        load_questions(f)


def _one_line(tmp_path, **row):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"image": "a.png", "text": "q", **row}) + "\n")
    return f


def test_int_answer_with_choices_is_kept_as_an_option_index(tmp_path):
    (q,) = load_questions(_one_line(tmp_path, answer=0, choices=["1", "0"]))
    assert q.answer == 0 and type(q.answer) is int and q.choices == ["1", "0"]


def test_answers_without_choices_stay_strings(tmp_path):
    (q,) = load_questions(_one_line(tmp_path, answer=3))
    assert q.answer == "3"
    (q,) = load_questions(_one_line(tmp_path, answer="0", choices=["1", "0"]))
    assert q.answer == "0"


@pytest.mark.parametrize("answer", [2, -1])
def test_out_of_range_int_answer_names_file_and_line(tmp_path, answer):
    f = tmp_path / "q.jsonl"
    good = json.dumps({"image": "a.png", "text": "q", "answer": 1, "choices": ["x", "y"]})
    bad = json.dumps({"image": "a.png", "text": "q", "answer": answer, "choices": ["x", "y"]})
    f.write_text(f"{good}\n{bad}\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2.*answer") as err:
        load_questions(f)
    assert "\n" not in str(err.value)
    errors = []
    assert len(load_questions(f, errors=errors)) == 1 and errors[0]["line"] == 2


def test_bool_answer_with_choices_is_not_an_option_index(tmp_path):
    (q,) = load_questions(_one_line(tmp_path, answer=True, choices=["x", "y"]))
    assert q.answer == "True"


def test_a_repeated_question_id_is_refused_naming_file_line_and_id(tmp_path):
    rows = [{"question_id": "a", "image": "x.png", "text": "q", "answer": "1"},
            {"question_id": "b", "image": "x.png", "text": "q", "answer": "2"},
            {"question_id": "a", "image": "y.png", "text": "q", "answer": "3"}]
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:3: question id a repeats line 1") as info:
        load_questions(f)
    assert len(str(info.value).splitlines()) == 1
    errors: list = []  # capture --skip-bad: the second one is logged and skipped
    assert [q.answer for q in load_questions(f, errors)] == ["1", "2"]
    assert errors[0]["line"] == 3 and "repeats line 1" in errors[0]["error"]
