"""Question files: the LLaVA / lmms convention, one JSON object a line.

Keys (first one found wins): ``question_id`` | ``id`` | ``qid``; ``image``; ``text`` |
``question`` | ``prompt``; ``answer`` | ``label`` | ``gt_answer``; optional ``category``
and ``choices`` (list of option texts, for multiple choice). With ``choices``, a JSON
integer answer is the option's index (0 = A) and stays an ``int``; every other answer is a
string (see ``scoring``). Optional ``objects``: ground-truth object boxes
``[[x0, y0, x1, y1], ...]`` in original-image pixels (x1, y1 exclusive), from which select
measures how much of each kept set lies on objects. Image paths are relative to the
question file. The shipped toy set and ScienceQA-IMG / POPE / GQA exports read alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ID_KEYS = ("question_id", "id", "qid")
TEXT_KEYS = ("text", "question", "prompt")
ANSWER_KEYS = ("answer", "label", "gt_answer")


@dataclass(frozen=True)
class Question:
    question_id: str
    image: Path
    text: str
    answer: str | int  # int: an option index, only with choices
    category: str = ""
    choices: list[str] | None = field(default=None)
    objects: list[list[float]] | None = field(default=None)  # ground-truth boxes (x0, y0, x1, y1), pixels
    meta: dict = field(default_factory=dict)  # per-benchmark data scoring needs (fastv_analysis.tasks)


def sample_name(question_id, sample_id: int | None = None) -> str:
    """How every message names a sample: its question id as the question file spells it, and
    its sample_id (position in the run) where known, e.g. ``question toy-0001-0 (sample_id 2)``."""
    return f"question {question_id}" + (f" (sample_id {sample_id})" if sample_id is not None else "")


def _first(obj: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    return None


def parse_line(obj: dict, base: Path, where: str) -> Question:
    """One question from one decoded JSON line; ``where`` names file and line in errors."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [name for name, keys in (("image", ("image",)), ("text/question", TEXT_KEYS),
                                       ("answer/label", ANSWER_KEYS)) if _first(obj, keys) is None]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    choices = obj.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: choices must be a list of strings")
    answer = _first(obj, ANSWER_KEYS)
    if choices is not None and isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer {answer} is not an option index ({len(choices)} choices)")
    else:
        answer = str(answer)
    objects = obj.get("objects")
    if objects is not None:
        ok = isinstance(objects, list) and all(
            isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in b) and b[2] > b[0] and b[3] > b[1] for b in objects)
        if not ok:
            raise ValueError(f"{where}: objects must be a list of [x0, y0, x1, y1] pixel boxes with x1 > x0, y1 > y0")
        objects = [[float(v) for v in b] for b in objects]
    qid = _first(obj, ID_KEYS)
    image = Path(obj["image"])
    return Question(
        question_id=str(qid if qid is not None else where.rsplit(":", 1)[-1]),
        image=image if image.is_absolute() else (base / image),
        text=str(_first(obj, TEXT_KEYS)),
        answer=answer,
        category=str(obj.get("category") or ""),
        choices=choices,
        objects=objects,
    )


def load_questions(path: str | Path, errors: list[dict] | None = None) -> list[Question]:
    """All questions of a .jsonl file; a malformed line raises ValueError naming file and line.

    With ``errors`` (a list), malformed lines are appended to it as
    ``{"file", "line", "error"}`` and skipped instead (capture's ``--skip-bad``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"question file {path} does not exist")
    out = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: malformed JSON, column {err.colno}: {err.msg}") from None
                question = parse_line(obj, path.parent, where)
                if question.question_id in first_line:  # answers, runs and scores are keyed by it
                    raise ValueError(f"{where}: question id {question.question_id} repeats line "
                                     f"{first_line[question.question_id]}; ids must be unique")
                first_line[question.question_id] = number
                out.append(question)
            except ValueError as err:
                if errors is None:
                    raise
                errors.append({"file": str(path), "line": number, "error": str(err)})
    if not out:
        raise ValueError(f"{path}: no questions")
    return out
