"""ScienceQA-IMG, as LLaVA-1.5 evaluates it (``scripts/v1_5/eval/sqa.sh``).

On disk (LLaVA's ``playground/data/eval/scienceqa``)::

    llava_test_CQM-A.json   JSON list: {"id", "image" (only with an image: "<id>/image.png"),
                            "conversations": [{"from": "human", "value": "...<image>..."}, ...]}
    problems.json           {id: {"choices": [...], "answer": <index into choices>, "subject", ...}}
    pid_splits.json         {"test": [ids], ...} (optional; when present the ids must be in "test")
    images/test/<id>/image.png

Only questions with an image are read: IMG accuracy is the official script's accuracy over
the questions whose prompt has ``<image>``. Prompt (``model_vqa_science.py
--single-pred-prompt``): the human turn without ``<image>``, stripped, + "\\n" + "Answer with
the option's letter from the given choices directly."

Answer parsing (``llava/eval/eval_science_qa.py``): the text is exactly one of A-E; or it
starts with "X. "; or ``The answer is ([A-Z]).`` (the "." there matches any character)
occurs exactly once; else it FAILED (wrong). A letter beyond the question's choices is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastv_analysis.data import Question

from .base import LETTER_ANSWER, Task, build_score, find, grouped_accuracy, load_json, percent

OPTIONS = ["A", "B", "C", "D", "E"]  # the official script's --options default
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str) -> str:
    """The letter LLaVA's ScienceQA scorer reads from a model text, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def read(path: Path, image_root: Path | None, limit: int | None, check: bool) -> list[Question]:
    if path.is_dir():
        base, main = path, find(path, ["llava_test_CQM-A.json"], "ScienceQA question file")
    else:
        base, main = path.parent, path
    entries = load_json(main)
    if not isinstance(entries, list):
        raise ValueError(f"{main}: expected a JSON list of questions")
    problems = load_json(base / "problems.json")
    split = None
    if (base / "pid_splits.json").exists():
        split = set(load_json(base / "pid_splits.json").get("test", []))
    root = image_root or base / "images" / "test"
    # LLaVA's answers file also answers the text-only questions: read_answers passes over them
    text_only = frozenset(str(e.get("id")) for e in entries if isinstance(e, dict) and not e.get("image"))
    out = []
    for i, entry in enumerate(entries):
        where = f"{main}: entry {i}"
        if not isinstance(entry, dict) or "id" not in entry or not entry.get("conversations"):
            raise ValueError(f"{where}: expected an object with id and conversations")
        if not entry.get("image"):
            continue  # a text-only question: not part of ScienceQA-IMG
        pid = str(entry["id"])
        if pid not in problems:
            raise ValueError(f"{where}: id {pid} is not in {base / 'problems.json'}")
        if split is not None and pid not in split:
            raise ValueError(f"{where}: id {pid} is not in the test split of {base / 'pid_splits.json'}")
        prob = problems[pid]
        choices = [str(c) for c in prob["choices"]]
        if not isinstance(prob.get("answer"), int) or not 0 <= prob["answer"] < len(choices):
            raise ValueError(f"{base / 'problems.json'}: problem {pid}: answer is not an index into its choices")
        text = str(entry["conversations"][0]["value"]).replace("<image>", "").strip()
        if not text.endswith(LETTER_ANSWER):  # LLaVA-1.5's suffix, once (some files already end with it)
            text += "\n" + LETTER_ANSWER
        out.append(Question(question_id=pid, image=root / entry["image"], text=text, answer=prob["answer"],
                            category=str(prob.get("subject") or ""), choices=choices,
                            meta={"skip_answer_ids": text_only, "llava_question_id": entry["id"],
                                  "llava_prompt": f"<image>\n{text}"}))
        if limit is not None and len(out) >= limit:
            break
    return out


def score(questions: list[Question], answers: dict[str, str]):
    rows = []
    for q in questions:
        letter = parse_letter(answers[q.question_id])
        index = OPTIONS.index(letter) if letter in OPTIONS[:len(q.choices)] else -1
        right = index == q.answer
        rows.append({"question_id": q.question_id, "category": q.category, "score": float(right),
                     "correct": right, "parsed": letter})
    metrics = [("img_accuracy", "", percent([r["score"] for r in rows])), ("n", "", len(rows)),
               ("n_failed", "", sum(r["parsed"] == "FAILED" for r in rows))]
    metrics += grouped_accuracy(rows, lambda r: r["category"])
    return build_score("scienceqa_img", rows, metrics, "img_accuracy")


TASK = Task("scienceqa_img", "ScienceQA-IMG (test, questions with an image)", "img_accuracy", read, score,
            markers=("llava_test_CQM-A.json",))
