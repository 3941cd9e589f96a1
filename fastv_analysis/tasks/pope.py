"""POPE (COCO), as LLaVA-1.5 evaluates it (``scripts/v1_5/eval/pope.sh``, ``llava/eval/eval_pope.py``).

On disk (LLaVA's ``playground/data/eval/pope``)::

    llava_pope_test.jsonl           {"question_id", "image", "text", "category": adversarial|popular|random}
    coco/coco_pope_<split>.json     JSON lines {"question_id", "image", "text", "label": "yes"|"no"}
    val2014/COCO_val2014_*.jpg      (the images; ``image_root`` overrides)

**Labels are matched to questions by position within a split, in file order** - the official
script zips the split's answers (answer-file order) with the label file's lines. Here the
k-th question of a split in ``llava_pope_test.jsonl`` gets the k-th label of
``coco_pope_<split>.json`` when reading (so answers may come in any order); that equals the
official pairing when the answers follow the question file, as LLaVA's loader writes them.
A split whose two files differ in length, or whose paired lines name different images, or
whose label text does not begin the question text, is refused (the official ``zip`` would
silently truncate or misalign). Question ids are compared as well when the two files share
a numbering (the split's ids are the same set in both).
Use the POPE release LLaVA used (its ``coco_pope_random.json`` has 2,910 lines).

Parsing: the text before the first "."; commas dropped; split on spaces; "No", "not" or "no"
among the words => no, else yes. Per split: accuracy, precision, recall, F1 (positive =
yes), yes-ratio; and their mean over the splits. LLaVA-1.5's 85.9 is the mean F1.
"""

from __future__ import annotations

from pathlib import Path

from fastv_analysis.data import Question

from .base import Task, build_score, find, iter_jsonl, need, resolve

SPLITS = ("adversarial", "popular", "random")


def parse_yes_no(text: str) -> str:
    """'yes' or 'no' as the official script reads a model text."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def read(path: Path, image_root: Path | None, limit: int | None, check: bool) -> list[Question]:
    base, main = resolve(path, "llava_pope_test.jsonl")
    rows = []
    for number, obj in iter_jsonl(main):
        need(obj, ("question_id", "image", "text", "category"), f"{main}:{number}")
        rows.append((number, obj))
    labels: dict[str, tuple[Path, list[tuple[int, dict]], bool]] = {}
    for split in dict.fromkeys(str(obj["category"]) for _, obj in rows):
        label_file = find(base, [f"coco/coco_pope_{split}.json", f"coco_pope_{split}.json"],
                          f"POPE labels of split {split!r}")
        lines = list(iter_jsonl(label_file))
        questions = [obj for _, obj in rows if str(obj["category"]) == split]
        if len(questions) != len(lines):
            raise ValueError(f"{label_file}: {len(lines)} labels for {len(questions)} {split!r} questions "
                             f"in {main} (labels are matched by position within a split)")
        same_ids = {str(o["question_id"]) for o in questions} == {str(o.get("question_id")) for _, o in lines}
        labels[split] = (label_file, lines, same_ids)
    root = image_root or base / "val2014"
    position = dict.fromkeys(labels, 0)
    out = []
    for number, obj in rows:
        split = str(obj["category"])
        label_file, lines, same_ids = labels[split]
        label_number, label = lines[position[split]]
        position[split] += 1
        where = f"{main}:{number} and {label_file}:{label_number}"
        if label.get("label") not in ("yes", "no"):
            raise ValueError(f"{where}: label must be 'yes' or 'no', got {label.get('label')!r}")
        if "image" in label and Path(str(label["image"])).name != Path(str(obj["image"])).name:
            raise ValueError(f"{where}: labels out of step: images {label['image']} and {obj['image']} differ")
        if "text" in label and not str(obj["text"]).strip().startswith(str(label["text"]).strip()):
            raise ValueError(f"{where}: labels out of step: questions {label['text']!r} and {obj['text']!r} differ")
        if same_ids and "question_id" in label and str(label["question_id"]) != str(obj["question_id"]):
            raise ValueError(f"{where}: labels out of step: question ids {label['question_id']} "
                             f"and {obj['question_id']} differ")
        out.append(Question(question_id=str(obj["question_id"]), image=root / str(obj["image"]),
                            text=str(obj["text"]), answer=label["label"], category=split,
                            meta={"llava_question_id": obj["question_id"]}))
        if limit is not None and len(out) >= limit:
            break
    return out


def order_note(questions: list[Question], answer_ids: list[str]) -> str | None:
    """One line when LLaVA's ``eval_pope.py`` would pair some answer with another label: it
    zips a split's answers, in answers-file order, with the split's label lines."""
    by_id = {q.question_id: q for q in questions}
    in_split: dict[str, list[Question]] = {}
    for q in questions:
        in_split.setdefault(q.category, []).append(q)
    seen: dict[str, int] = {}
    for line, qid in enumerate(answer_ids, start=1):
        q = by_id[qid]
        k = seen[q.category] = seen.get(q.category, -1) + 1
        if in_split[q.category][k].answer != q.answer:
            return (f"note: answer {line} (question {qid}) is not where llava_pope_test.jsonl has it within split "
                    f"{q.category!r}; LLaVA's eval_pope.py pairs answers with labels by position and would give "
                    f"another number (this score pairs them by question id)")
    return None


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0  # sklearn's zero_division=0; the official script would divide by zero


def score(questions: list[Question], answers: dict[str, str]):
    rows = []
    for q in questions:
        parsed = parse_yes_no(answers[q.question_id])
        rows.append({"question_id": q.question_id, "category": q.category, "score": float(parsed == q.answer),
                     "correct": parsed == q.answer, "parsed": parsed, "label": q.answer})
    metrics, per_split = [], []
    for split in dict.fromkeys(r["category"] for r in rows):
        group = [r for r in rows if r["category"] == split]
        tp = sum(r["parsed"] == "yes" and r["label"] == "yes" for r in group)
        fp = sum(r["parsed"] == "yes" and r["label"] == "no" for r in group)
        tn = sum(r["parsed"] == "no" and r["label"] == "no" for r in group)
        fn = sum(r["parsed"] == "no" and r["label"] == "yes" for r in group)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        values = {"f1": 100 * _ratio(2 * precision * recall, precision + recall),
                  "accuracy": 100 * (tp + tn) / len(group), "precision": 100 * precision, "recall": 100 * recall,
                  "yes_ratio": 100 * (tp + fp) / len(group)}
        per_split.append(values)
        metrics += [(m, split, v) for m, v in values.items()]
        metrics += [("tp", split, tp), ("fp", split, fp), ("tn", split, tn), ("fn", split, fn),
                    ("n", split, len(group))]
    metrics = [(m, "mean", sum(s[m] for s in per_split) / len(per_split)) for m in per_split[0]] + metrics
    return build_score("pope", rows, metrics, "mean/f1")


TASK = Task("pope", "POPE (COCO: adversarial, popular, random)", "mean/f1", read, score,
            markers=("llava_pope_test.jsonl",), order_note=order_note)
