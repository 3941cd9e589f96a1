"""TextVQA val, as LLaVA-1.5 evaluates it (``scripts/v1_5/eval/textvqa.sh``, ``llava/eval/eval_textvqa.py``).

On disk (LLaVA's ``playground/data/eval/textvqa``)::

    llava_textvqa_val_v051_ocr.jsonl   {"question_id": <image id>, "image", "text"}; the text is
                                       "question\\nReference OCR token: ...\\nAnswer the question using
                                       a single word or phrase." (LLaVA-1.5 used the OCR tokens)
    TextVQA_0.5.1_val.json             {"data": [{"question_id", "image_id", "question", "answers": [10]}]}
    train_images/<image id>.jpg

A line finds its annotation by (image id, lower-cased question) as LLaVA's script does, the
question taken from the prompt as its ``prompt_processor`` does ("OCR tokens: ... Question:
X Short answer:"; three lines with a "Reference OCR token: " line -> the other first line;
two lines -> the first). Question ids here are the annotation's own ``question_id`` (LLaVA's
is the image id, shared by an image's questions; answers are mapped back by their prompt).
Metric: the VQA soft accuracy with the EvalAI normalisation (:mod:`.vqa_accuracy`).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from fastv_analysis.data import Question

from .base import Task, build_score, find, iter_jsonl, load_json, need, percent, resolve
from .vqa_accuracy import normalize_answer, soft_accuracy

ANNOTATIONS = "TextVQA_0.5.1_val.json"
_OCR_PROMPT = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def prompt_question(prompt: str) -> str | None:
    """The question inside a LLaVA TextVQA prompt, lower-cased (None: a form LLaVA's script rejects)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_PROMPT.search(prompt)
        return match.group(1).lower() if match else None
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower() if len(lines) == 2 else None


def read(path: Path, image_root: Path | None, limit: int | None, check: bool) -> list[Question]:
    base, main = resolve(path, "llava_textvqa_val_v051_ocr.jsonl")
    ann_file = find(base, [ANNOTATIONS], "TextVQA annotations")
    data = load_json(ann_file)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{ann_file}: expected an object with a 'data' list")
    by_key = {(str(a["image_id"]), str(a["question"]).lower()): a for a in data["data"]}
    root = image_root or next((base / c for c in ("train_images", "train_val_images/train_images")
                               if (base / c).is_dir()), base / "train_images")
    out = []
    for number, obj in iter_jsonl(main):
        where = f"{main}:{number}"
        need(obj, ("question_id", "image", "text"), where)
        question = prompt_question(str(obj["text"]))
        if question is None:
            raise ValueError(f"{where}: the prompt is in none of the forms LLaVA's TextVQA script reads")
        key = (str(obj["question_id"]), question)
        if key not in by_key:
            raise ValueError(f"{where}: no annotation in {ann_file} for image {key[0]} and question {question!r}")
        ann = by_key[key]
        human = [str(a) for a in ann.get("answers", [])]
        if len(human) != 10:
            raise ValueError(f"{ann_file}: question {ann.get('question_id')} has {len(human)} answers, not 10")
        out.append(Question(question_id=str(ann["question_id"]), image=root / str(obj["image"]),
                            text=str(obj["text"]), answer=Counter(human).most_common(1)[0][0],
                            meta={"llava_question_id": obj["question_id"], "answers": human}))
        if limit is not None and len(out) >= limit:
            break
    return out


def score_vqa(task: str, questions: list[Question], answers: dict[str, str], accuracy=soft_accuracy):
    """Soft VQA accuracy per question by ``accuracy(prediction, ten human answers)``, overall
    and per category (shared with VQAv2, which passes its own official rule).

    ``correct`` is the VQA paper's "counted right": at least 3 of the 10 humans gave the
    answer (score >= 0.9); ``score`` keeps the soft value."""
    rows = []
    for q in questions:
        value = accuracy(answers[q.question_id], q.meta["answers"])
        rows.append({"question_id": q.question_id, "category": q.category, "score": value,
                     "correct": value >= 0.9 - 1e-9, "parsed": normalize_answer(answers[q.question_id])})
    metrics = [("accuracy", "", percent([r["score"] for r in rows])), ("n", "", len(rows))]
    groups = dict.fromkeys(r["category"] for r in rows if r["category"])
    metrics += [("accuracy", g, percent([r["score"] for r in rows if r["category"] == g])) for g in groups]
    return build_score(task, rows, metrics, "accuracy")


def score(questions: list[Question], answers: dict[str, str]):
    return score_vqa("textvqa", questions, answers)


TASK = Task("textvqa", "TextVQA val (with LLaVA's OCR-token prompts)", "accuracy", read, score,
            markers=("llava_textvqa_val_v051_ocr.jsonl",))
