"""VQAv2 val2014, scored offline (LLaVA-1.5 reports test-dev through the EvalAI server, which
offline is not available; val has public annotations).

On disk (the VQA release)::

    v2_OpenEnded_mscoco_val2014_questions.json  {"questions": [{"question_id", "image_id", "question"}]}
    v2_mscoco_val2014_annotations.json          {"annotations": [{"question_id", "answer_type",
                                                  "multiple_choice_answer", "answers": [{"answer"}] x 10}]}
    val2014/COCO_val2014_<image_id:012d>.jpg

Prompt: the question + "\\n" + "Answer the question using a single word or phrase." (LLaVA's
short-answer convention, as in its ``llava_vqav2_mscoco_test-dev2015.jsonl``). Metric: the
official pipeline's VQA accuracy (:func:`.vqa_accuracy.vqav2_accuracy`): LLaVA's
``convert_vqav2_for_submission.py`` applies the EvalAI processor to the prediction only, and
GT-Vision-Lab/VQA's ``vqaEval.py`` compares it with the ten human answers - raw when all ten
are identical, else after its punctuation and digit/article steps. Overall and per answer
type (yes/no, number, other), as vqaEval prints them (it rounds to 2 decimals; this does not).
"""

from __future__ import annotations

from pathlib import Path

from fastv_analysis.data import Question

from .base import SHORT_ANSWER, Task, find, load_json
from .textvqa import score_vqa
from .vqa_accuracy import vqav2_accuracy

QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


def read(path: Path, image_root: Path | None, limit: int | None, check: bool) -> list[Question]:
    base = path if path.is_dir() else path.parent
    if not path.exists():
        raise FileNotFoundError(f"benchmark data {path} does not exist")
    q_file, a_file = find(base, [QUESTIONS], "VQAv2 questions"), find(base, [ANNOTATIONS], "VQAv2 annotations")
    questions, annotations = load_json(q_file), load_json(a_file)
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"{q_file}: expected an object with a 'questions' list")
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise ValueError(f"{a_file}: expected an object with an 'annotations' list")
    by_id = {str(a["question_id"]): a for a in annotations["annotations"]}
    root = image_root or base / "val2014"
    out = []
    for i, q in enumerate(questions["questions"]):
        qid = str(q.get("question_id"))
        if qid not in by_id:
            raise ValueError(f"{q_file}: question {qid} (entry {i + 1} of 'questions') has no "
                             f"annotation in {a_file}")
        ann = by_id[qid]
        human = [str(a["answer"]) for a in ann.get("answers", [])]
        if len(human) != 10:
            raise ValueError(f"{a_file}: question {qid} has {len(human)} answers, not 10")
        out.append(Question(question_id=qid, image=root / f"COCO_val2014_{int(q['image_id']):012d}.jpg",
                            text=f"{q['question']}\n{SHORT_ANSWER}", answer=str(ann.get("multiple_choice_answer", "")),
                            category=str(ann.get("answer_type", "")),
                            meta={"answers": human, "question_type": str(ann.get("question_type", "")),
                                  "llava_question_id": q.get("question_id")}))
        if limit is not None and len(out) >= limit:
            break
    return out


def score(questions: list[Question], answers: dict[str, str]):
    return score_vqa("vqav2", questions, answers, vqav2_accuracy)


TASK = Task("vqav2", "VQAv2 val2014 (offline)", "accuracy", read, score, markers=(QUESTIONS, ANNOTATIONS))
