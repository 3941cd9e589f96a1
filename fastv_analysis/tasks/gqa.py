"""GQA test-dev balanced, as LLaVA-1.5 evaluates it (``scripts/v1_5/eval/gqa.sh``:
``scripts/convert_gqa_for_eval.py``, then GQA's own ``eval.py --tier testdev_balanced``).

On disk (LLaVA's ``playground/data/eval/gqa``)::

    llava_gqa_testdev_balanced.jsonl    {"question_id", "image", "text", ...}
    data/testdev_balanced_questions.json {question_id: {"answer", "types": {"structural", "semantic"}, ...}}
                                         (also looked for next to the .jsonl and in questions1.2/)
    data/images/<imageId>.jpg

Scoring: the prediction is ``text.rstrip('.').lower()`` (LLaVA's converter) and is right iff
it equals the reference answer exactly (``eval.py``). Besides accuracy, as ``eval.py``
prints them: binary / open (open = structural type "query"), and accuracy per structural
and per semantic type. (Consistency, validity, plausibility and distribution need GQA's
choices / scene-graph files and are not computed.)
"""

from __future__ import annotations

from pathlib import Path

from fastv_analysis.data import Question

from .base import Task, build_score, find, grouped_accuracy, iter_jsonl, load_json, need, percent, resolve

QUESTIONS = "testdev_balanced_questions.json"


def read(path: Path, image_root: Path | None, limit: int | None, check: bool) -> list[Question]:
    base, main = resolve(path, "llava_gqa_testdev_balanced.jsonl")
    refs = load_json(find(base, [QUESTIONS, f"data/{QUESTIONS}", f"data/questions1.2/{QUESTIONS}",
                                 f"questions1.2/{QUESTIONS}"], "GQA questions"))
    root = image_root or next((base / c for c in ("data/images", "images") if (base / c).is_dir()),
                              base / "data/images")
    out = []
    for number, obj in iter_jsonl(main):
        where = f"{main}:{number}"
        need(obj, ("question_id", "image", "text"), where)
        qid = str(obj["question_id"])
        if qid not in refs:
            raise ValueError(f"{where}: question_id {qid} is not in {QUESTIONS}")
        ref = refs[qid]
        types = ref.get("types") or {}
        out.append(Question(question_id=qid, image=root / str(obj["image"]), text=str(obj["text"]),
                            answer=str(ref["answer"]), category=str(types.get("structural") or ""),
                            meta={"semantic": str(types.get("semantic") or ""),
                                  "llava_question_id": obj["question_id"]}))
        if limit is not None and len(out) >= limit:
            break
    return out


def score(questions: list[Question], answers: dict[str, str]):
    rows = []
    for q in questions:
        parsed = answers[q.question_id].rstrip(".").lower()
        right = parsed == q.answer
        rows.append({"question_id": q.question_id, "category": q.category, "score": float(right),
                     "correct": right, "parsed": parsed, "semantic": q.meta.get("semantic", "")})
    metrics = [("accuracy", "", percent([r["score"] for r in rows])), ("n", "", len(rows))]
    metrics += grouped_accuracy(rows, lambda r: "open" if r["category"] == "query" else "binary")
    metrics += grouped_accuracy(rows, lambda r: f"structural:{r['category']}")
    metrics += grouped_accuracy(rows, lambda r: f"semantic:{r['semantic']}")
    return build_score("gqa", rows, metrics, "accuracy")


TASK = Task("gqa", "GQA test-dev balanced", "accuracy", read, score,
            markers=("llava_gqa_testdev_balanced.jsonl",))
