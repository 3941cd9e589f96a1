"""lmms-eval's scoring rules for the seven benchmarks: ``fastv-analyze score --rules lmms-eval``.

Many papers (FastV's README among them) quote numbers from lmms-eval
(EvolvingLMMs-Lab/lmms-eval, v0.7.2 = cb45ac4d; the task files read here are unchanged at
75571cfe), whose task utils score the same answers differently from the official scripts
the default rules follow. Each function here reimplements one task's ``process_results`` and
aggregation (``lmms_eval/tasks/<task>/utils.py`` and YAML) as a pure function from
``(questions, answers)`` to the same :class:`~.base.TaskScore` the default rules return, on
the questions the default readers give. Percentages where lmms-eval prints fractions.

Before any task sees a model text, lmms-eval's scoring loop removes reasoning blocks
(``--reasoning_tags`` default: ``<think>...</think>``, ``<analysis>...</analysis>``; a lone
closing tag keeps what follows it) and strips whitespace (:func:`prediction`).

Per benchmark (task name in lmms-eval):

- ``scienceqa_img``: right iff the prediction lower-cased equals the answer letter, or it
  starts with an upper-case letter followed by "." and that letter is the answer.
- ``pope`` (+ ``pope_adv`` / ``pope_pop`` / ``pope_random``): the prediction lower-cased must be
  exactly "yes" or "no"; precision and recall count only those two (another text is wrong
  for accuracy and counted in neither), yes-ratio is the share of *labels* that are yes.
  Headline: F1 over all questions pooled (the ``pope`` task); per split too.
- ``mme``: lower-case, strip, drop every "."; "yes"/"no"; a lone "y"/"n"; else "yes" or "no"
  within the first four characters; else other. Scored in pairs by LLaVA question id (the
  image); a subtask scores mean over images of 100 * acc + 100 * acc+; a subtask outside
  the ten perception ones counts to cognition.
- ``gqa``: exact match after lower-casing and deleting every ``string.punctuation``
  character on both sides (the built-in ``exact_match`` with ignore_case/ignore_punctuation).
- ``textvqa_val``: EvalAI's full answer processor on both sides, leave-one-out soft accuracy
  (the default rule; lmms-eval differs only in removing reasoning blocks).
- ``vqav2_val``: ``process_punctuation`` + ``process_digit_article`` (no "'s" split, commas kept
  for the punctuation rule) on the prediction and on all ten human answers, leave-one-out
  soft accuracy.
- ``mmbench_en_dev_static`` (the offline config; ``mmbench_en_dev`` asks a GPT judge where the
  rules below find no letter): per row, ``can_infer_option`` (a letter of A-E standing alone,
  or one of the forms "A." "A," "A:" "A)" "A)." "(A)" "(A)." ":A" ":A," ":A." ":A)" ":A).",
  not the quantifier "A" in a text of more than three words), else ``can_infer_text`` (exactly
  one option text inside the lower-cased prediction), else ``extract_mcq_answer`` (ranked
  forms: leading letter, trailing letter, after an answer phrase, "(A)", "A.", "A:", "A)",
  "A ", any occurrence). Circular: a question counts iff every row of its group is right;
  questions are the rows with index < 1e6.
"""

from __future__ import annotations

import dataclasses
import string
from collections import defaultdict
from typing import Callable

from fastv_analysis.data import Question

from .base import Task, TaskScore, build_score, grouped_accuracy, percent
from .mme import PERCEPTION
from .mmbench import ROTATION
from .vqa_accuracy import _digits_articles, _punctuation, normalize_answer

RULES = ("official", "lmms-eval")
REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))  # lmms-eval's CLI default


def prediction(text: str) -> str:
    """A model text as lmms-eval hands it to a task: reasoning blocks removed, stripped."""
    for start, end in REASONING_TAGS:
        while start in text and end in text:
            i = text.find(start)
            j = text.find(end, i)
            if j == -1:
                break
            text = text[:i] + text[j + len(end):]
        if end in text and start not in text:  # the opening tag was in the prompt
            text = text.rsplit(end, 1)[-1]
    return text.strip()


def _row(q: Question, right: bool, parsed: str, score: float | None = None, **extra) -> dict:
    return {"question_id": q.question_id, "category": q.category, "correct": right, "parsed": parsed,
            "score": float(right) if score is None else score, **extra}


# ---------------------------------------------------------------------------------------
# ScienceQA-IMG, POPE, MME, GQA
# ---------------------------------------------------------------------------------------

def score_scienceqa(questions: list[Question], answers: dict[str, str]) -> TaskScore:
    rows = []
    for q in questions:
        pred, target = prediction(answers[q.question_id]), chr(ord("a") + q.answer)
        if pred.lower() == target:
            rows.append(_row(q, True, pred))
        elif len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":  # "X. ..." reads X
            rows.append(_row(q, pred[0].lower() == target, pred[0]))
        else:
            rows.append(_row(q, False, pred))
    metrics = [("img_accuracy", "", percent([r["score"] for r in rows])), ("n", "", len(rows))]
    metrics += grouped_accuracy(rows, lambda r: r["category"])
    return build_score("scienceqa_img", rows, metrics, "img_accuracy")


def _pope_metrics(rows: list[dict], split: str) -> list[tuple[str, str, float]]:
    tp = sum(r["parsed"] == "yes" and r["label"] == "yes" for r in rows)
    fp = sum(r["parsed"] == "yes" and r["label"] == "no" for r in rows)
    fn = sum(r["parsed"] == "no" and r["label"] == "yes" for r in rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    values = {"f1": f1, "accuracy": sum(r["score"] for r in rows) / len(rows), "precision": precision,
              "recall": recall, "yes_ratio": sum(r["label"] == "yes" for r in rows) / len(rows)}
    return [(m, split, 100 * v) for m, v in values.items()] + [
        ("tp", split, tp), ("fp", split, fp), ("fn", split, fn), ("n", split, len(rows)),
        ("n_other", split, sum(r["parsed"] not in ("yes", "no") for r in rows))]


def score_pope(questions: list[Question], answers: dict[str, str]) -> TaskScore:
    rows = []
    for q in questions:
        pred = prediction(answers[q.question_id]).lower().strip()
        rows.append(_row(q, pred == q.answer, pred, label=q.answer))
    metrics = _pope_metrics(rows, "")
    for split in dict.fromkeys(r["category"] for r in rows):
        metrics += _pope_metrics([r for r in rows if r["category"] == split], split)
    return build_score("pope", rows, metrics, "f1")


def parse_mme(text: str) -> str:
    """'yes', 'no' or 'other' as lmms-eval's MME ``parse_pred_ans`` reads a model text."""
    pred = prediction(text).lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    return "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"


def score_mme(questions: list[Question], answers: dict[str, str]) -> TaskScore:
    rows, pairs = [], defaultdict(lambda: defaultdict(list))
    for q in questions:
        parsed = parse_mme(answers[q.question_id])
        right = parsed == str(q.answer).lower().strip().replace(".", "")
        rows.append(_row(q, right, parsed))
        pairs[q.category][str(q.meta.get("llava_question_id", q.question_id))].append(right)
    metrics, totals = [], {"perception": 0.0, "cognition": 0.0}
    for subtask, images in pairs.items():
        odd = next((k for k, v in images.items() if len(v) != 2), None)
        if odd is not None:
            raise ValueError(f"mme: image {odd} has {len(images[odd])} answered question(s); lmms-eval "
                             f"scores MME in pairs (both questions of an image)")
        acc = sum(100 * sum(v) / 2 for v in images.values()) / len(images)
        acc_plus = sum(100.0 * all(v) for v in images.values()) / len(images)
        totals["perception" if subtask in PERCEPTION else "cognition"] += acc + acc_plus
        group = [r for r in rows if r["category"] == subtask]
        metrics += [("score", subtask, acc + acc_plus), ("acc", subtask, acc), ("acc_plus", subtask, acc_plus),
                    ("n_other", subtask, sum(r["parsed"] == "other" for r in group))]
    head = [("perception", "", totals["perception"]), ("cognition", "", totals["cognition"]),
            ("n_subtasks", "", len(pairs))]
    return build_score("mme", rows, head + metrics, "perception")


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def gqa_normalize(text: str) -> str:
    """lmms-eval's ``exact_match`` with ignore_case and ignore_punctuation: lower, delete punctuation."""
    return text.lower().translate(_PUNCTUATION)


def score_gqa(questions: list[Question], answers: dict[str, str]) -> TaskScore:
    rows = []
    for q in questions:
        pred = gqa_normalize(prediction(answers[q.question_id]))
        rows.append(_row(q, pred == gqa_normalize(str(q.answer)), pred))
    metrics = [("accuracy", "", percent([r["score"] for r in rows])), ("n", "", len(rows))]
    return build_score("gqa", rows, metrics, "accuracy")


# ---------------------------------------------------------------------------------------
# TextVQA, VQAv2 (soft accuracy)
# ---------------------------------------------------------------------------------------

def leave_one_out(pred: str, humans: list[str]) -> float:
    """Mean over each human answer left out of min(1, matches among the others / 3)."""
    if not humans:
        raise ValueError("VQA accuracy needs human answers, got none")
    count = sum(h == pred for h in humans)
    return sum(min(1.0, (count - (h == pred)) / 3) for h in humans) / len(humans)


def vqav2_normalize(text: str) -> str:
    """lmms-eval's VQAv2 processing: whitespace, then process_punctuation and process_digit_article."""
    return _digits_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def _score_soft(task: str, normalize: Callable[[str], str], questions: list[Question],
                answers: dict[str, str]) -> TaskScore:
    rows = []
    for q in questions:
        pred = normalize(prediction(answers[q.question_id]))
        value = leave_one_out(pred, [normalize(str(a)) for a in q.meta["answers"]])
        rows.append(_row(q, value >= 0.9 - 1e-9, pred, score=value))
    metrics = [("accuracy", "", percent([r["score"] for r in rows])), ("n", "", len(rows))]
    groups = dict.fromkeys(r["category"] for r in rows if r["category"])
    metrics += [("accuracy", g, percent([r["score"] for r in rows if r["category"] == g])) for g in groups]
    return build_score(task, rows, metrics, "accuracy")


def score_textvqa(questions: list[Question], answers: dict[str, str]) -> TaskScore:
    return _score_soft("textvqa", normalize_answer, questions, answers)


def score_vqav2(questions: list[Question], answers: dict[str, str]) -> TaskScore:
    return _score_soft("vqav2", vqav2_normalize, questions, answers)


# ---------------------------------------------------------------------------------------
# MMBench (mmbench_en_dev_static: can_infer, then extract_mcq_answer; circular)
# ---------------------------------------------------------------------------------------

_INFER_LETTERS = "ABCDE"  # can_infer_option's num_choice=5, whatever the row's options
_AFFIXES = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
            (":", ","), (":", "."), (":", ")"), (":", ").")]
_PHRASES = ["the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
            "best answer is", "the correct option is", "correct option is", "the best option is",
            "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
            "i choose", "i select", "i pick", "my answer is", "my choice is",
            "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは"]
_FORMS = [("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2)]  # (form, priority)


def infer_option(answer: str) -> str | None:
    """lmms-eval's ``can_infer_option``: a letter of A-E standing alone or in a listed form."""
    if "Failed to obtain answer via API" in answer:
        return None
    words = answer.split()
    alone = [c for c in _INFER_LETTERS if c in words]
    if len(alone) == 1 and not ("A" in words and len(words) > 3):  # "A" may be the article
        return alone[0]
    for prefix, suffix in _AFFIXES:
        found = [c for c in _INFER_LETTERS if prefix + c + suffix in words]
        if len(found) == 1:
            return found[0]
    return None


def infer_text(answer: str, options: list[str]) -> str | None:
    """lmms-eval's ``can_infer_text``: exactly one option text inside the lower-cased answer."""
    found = [letter for letter, option in zip("ABCD", options) if str(option).lower() in answer.lower()]
    return found[0] if len(found) == 1 else None


def extract_letter(response: str, letters: list[str]) -> str:
    """lmms-eval's ``extract_mcq_answer``: the best-ranked letter form, the last of its kind; or ""."""
    if not response.strip():
        return ""
    text = response.strip()
    for ch in ",.!?;:'\"":
        text = text.strip(ch)
    text = f" {text} "
    found = [(priority, text.rfind(form.format(c)), c) for form, priority in _FORMS for c in letters
             if form.format(c) in text]
    lower = text.lower()
    for phrase in _PHRASES:
        at = lower.find(phrase)
        if at != -1:
            found += [(7, text.find(c, at + len(phrase)), c) for c in letters if text.find(c, at + len(phrase)) != -1]
    core = text.strip()
    found += [(10, 0, c) for c in letters if core.startswith(c) and (len(core) == 1 or not core[1].isalpha())]
    found += [(9, len(text) - 1, c) for c in letters if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha())]
    if not found:
        found = [(0, text.rfind(c), c) for c in letters if c in text]
    return max(found, key=lambda f: f[:2])[2] if found else ""


def mmbench_letter(text: str, options: list[str]) -> tuple[str, bool]:
    """The letter lmms-eval's static MMBench evaluation reads from a model text ("" for none), and
    whether ``can_infer`` missed it (``mmbench_en_dev`` would ask its GPT judge about such a row)."""
    pred = prediction(text)
    letter = infer_option(pred) or infer_text(pred, options)
    return (letter, False) if letter else (extract_letter(pred, list("ABCD"[:len(options)])), True)


def score_mmbench(questions: list[Question], answers: dict[str, str]) -> TaskScore:
    rows = []
    for q in questions:
        letter, judge = mmbench_letter(answers[q.question_id], q.choices or [])
        rows.append(_row(q, letter == q.answer, letter, group=q.meta["group"], judge=judge,
                         l2=q.meta.get("l2_category", ""), main=int(q.question_id) < ROTATION))
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    hits = [{"category": r["category"], "l2": r["l2"], "score": float(all(x["correct"] for x in groups[r["group"]]))}
            for r in rows if r["main"]]
    if not hits:
        raise ValueError("mmbench: no row with index < 1e6 was answered; lmms-eval scores only those questions")
    metrics = [("circular_accuracy", "", percent([h["score"] for h in hits])), ("n_questions", "", len(hits)),
               ("n_rows", "", len(rows)), ("n_unmatched", "", sum(r["parsed"] == "" for r in rows)),
               ("n_judge_rows", "", sum(r["judge"] for r in rows))]
    for key, prefix in (("category", ""), ("l2", "l2:")):
        for name in dict.fromkeys(h[key] for h in hits if h[key]):
            metrics.append(("circular_accuracy", prefix + name,
                            percent([h["score"] for h in hits if h[key] == name])))
    return build_score("mmbench", rows, metrics, "circular_accuracy")


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------

SCORERS: dict[str, tuple[Callable[[list[Question], dict[str, str]], TaskScore], str]] = {
    "scienceqa_img": (score_scienceqa, "img_accuracy"), "pope": (score_pope, "f1"), "mme": (score_mme, "perception"),
    "gqa": (score_gqa, "accuracy"), "textvqa": (score_textvqa, "accuracy"), "vqav2": (score_vqav2, "accuracy"),
    "mmbench": (score_mmbench, "circular_accuracy")}


def with_rules(task: Task, rules: str = "official") -> Task:
    """``task`` scoring by ``rules``: "official" (the task itself) or "lmms-eval" (same reader)."""
    if rules not in RULES:
        raise ValueError(f"unknown rules {rules!r}; supported: {', '.join(RULES)}")
    if rules == "official":
        return task
    if task.name not in SCORERS:
        raise ValueError(f"no lmms-eval rules for benchmark {task.name!r}; supported: {', '.join(SCORERS)}")
    scorer, headline = SCORERS[task.name]
    return dataclasses.replace(task, scorer=scorer, headline=headline, title=f"{task.title}; lmms-eval rules")
