"""MME, as LLaVA-1.5 evaluates it (``scripts/v1_5/eval/mme.sh``: LLaVA's
``convert_answer_to_mme.py``, then MME's ``eval_tool/calculation.py``).

On disk (LLaVA's ``playground/data/eval/MME``)::

    llava_mme.jsonl                  {"question_id": "<subtask>/<image>", "image", "text", "category"};
                                     two lines per image share the question_id
    MME_Benchmark_release_version/<subtask>/
        images/<image> + questions_answers_YN/<stem>.txt    (artwork, celebrity, landmark, posters, scene)
        <image> + <stem>.txt                                (the other nine)

Each ``<stem>.txt`` holds "question<TAB>Yes|No" lines, one per question of that image. A
line of ``llava_mme.jsonl`` finds its reference as LLaVA's converter does: subtask = the id
before "/", file = the id's last part up to its first "." + ".txt", question = the text
without "Answer the question using a single word or phrase.", stripped, + " Please answer
yes or no." when absent (else with two spaces, as some release files have it).
Question ids here are ``<llava id>#<line of the .txt file>`` (LLaVA's ids are per image);
:func:`~fastv_analysis.tasks.base.read_answers` maps LLaVA answers back by their prompt.

Scoring (``calculation.py``): answer lower-cased; "yes"/"no" as is, else "yes" in its first
four characters -> yes, else "no" there -> no, else other (wrong). Per subtask:
100 * acc + 100 * acc+ (acc+: share of images with both questions right). Perception = the
sum of 10 subtasks, cognition of 4. The official script pairs consecutive lines of the
answer file; here the two questions of an image are grouped by image (the same when the
answers follow ``llava_mme.jsonl``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fastv_analysis.data import Question

from .base import SHORT_ANSWER, Task, build_score, iter_jsonl, need, resolve

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
RELEASE = "MME_Benchmark_release_version"
_YES_NO = " Please answer yes or no."


def parse_yes_no(text: str) -> str:
    """'yes', 'no' or 'other' as MME's calculation.py reads a model text."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def _references(release: Path, subtask: str, cache: dict) -> dict:
    """``{(file name, question): (answer, line)}`` of one subtask folder."""
    if subtask not in cache:
        folder = release / subtask
        if not folder.is_dir():
            raise FileNotFoundError(f"MME subtask folder {folder} does not exist")
        qa = folder / "questions_answers_YN" if (folder / "images").is_dir() else folder
        refs = {}
        for txt in sorted(qa.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise ValueError(f"{txt}:{number}: expected 'question<TAB>answer'")
                refs[(txt.name, parts[0])] = (parts[1], number)
        cache[subtask] = refs
    return cache[subtask]


def read(path: Path, image_root: Path | None, limit: int | None, check: bool) -> list[Question]:
    if path.is_dir() and path.name == RELEASE:
        path = path.parent
    base, main = resolve(path, "llava_mme.jsonl")
    release = base / RELEASE
    if not release.is_dir():
        raise FileNotFoundError(f"MME release folder {release} does not exist")
    root = image_root or release
    cache: dict = {}
    out = []
    for number, obj in iter_jsonl(main):
        where = f"{main}:{number}"
        need(obj, ("question_id", "image", "text"), where)
        qid = str(obj["question_id"])
        subtask, file = qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"
        refs = _references(release, subtask, cache)
        question = str(obj["text"])
        if SHORT_ANSWER in question:
            question = question.replace(SHORT_ANSWER, "").strip()
        if "Please answer yes or no." not in question:
            question += _YES_NO
            if (file, question) not in refs:
                question = question.replace(_YES_NO, " " + _YES_NO)
        if (file, question) not in refs:
            raise ValueError(f"{where}: no reference for {question!r} in {file} of {release / subtask}")
        answer, line = refs[(file, question)]
        if answer.lower() not in ("yes", "no"):
            raise ValueError(f"{release / subtask}/{file}:{line}: answer must be Yes or No, got {answer!r}")
        image = root / str(obj["image"])
        if not image.exists() and (root / subtask / "images" / image.name).exists():
            image = root / subtask / "images" / image.name
        out.append(Question(question_id=f"{qid}#{line}", image=image, text=str(obj["text"]), answer=answer,
                            category=subtask,
                            meta={"llava_question_id": obj["question_id"], "image_key": f"{subtask}/{file}"}))
        if limit is not None and len(out) >= limit:
            break
    return out


def order_note(questions: list[Question], answer_ids: list[str]) -> str | None:
    """One line when MME's ``calculation.py`` would pair other lines for acc+: after LLaVA's
    converter it takes each subtask's answers two by two, in answers-file order."""
    by_id = {q.question_id: q for q in questions}
    lines: dict[str, list[str]] = {}
    for qid in answer_ids:
        lines.setdefault(by_id[qid].category, []).append(by_id[qid].meta.get("image_key", qid))
    for subtask, images in lines.items():
        pairs = [images[i:i + 2] for i in range(0, len(images), 2)]
        if any(len(p) != 2 or p[0] != p[1] for p in pairs):
            return (f"note: in subtask {subtask!r} the answers file does not hold each image's two questions on "
                    f"consecutive lines; MME's calculation.py pairs lines by position and would give another "
                    f"number (this score pairs them by image)")
    return None


def score(questions: list[Question], answers: dict[str, str]):
    rows = []
    for q in questions:
        parsed = parse_yes_no(answers[q.question_id])
        right = parsed == str(q.answer).lower()
        rows.append({"question_id": q.question_id, "category": q.category, "score": float(right),
                     "correct": right, "parsed": parsed, "image": q.meta.get("image_key", q.question_id)})
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["category"]].append(r)
    metrics, scores = [], {}
    for subtask, group in by_task.items():
        images: dict[str, list[bool]] = defaultdict(list)
        for r in group:
            images[r["image"]].append(r["correct"])
        acc = 100 * sum(r["correct"] for r in group) / len(group)
        acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
        scores[subtask] = acc + acc_plus
        metrics += [("score", subtask, acc + acc_plus), ("acc", subtask, acc), ("acc_plus", subtask, acc_plus),
                    ("n_other", subtask, sum(r["parsed"] == "other" for r in group))]
    totals = [("perception", "", sum(scores.get(t, 0.0) for t in PERCEPTION)),
              ("cognition", "", sum(scores.get(t, 0.0) for t in COGNITION)),
              ("n_subtasks", "", len(scores))]
    return build_score("mme", rows, totals + metrics, "perception")


TASK = Task("mme", "MME (perception and cognition)", "perception", read, score,
            markers=("llava_mme.jsonl", RELEASE), order_note=order_note)
