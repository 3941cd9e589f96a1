"""MMBench dev, as LLaVA-1.5 prompts it (``llava/eval/model_vqa_mmbench.py --single-pred-prompt``)
and as MMBench scores it (VLMEvalKit's rule-based matching; single pass and circular).

On disk: ``mmbench_dev_20230712.tsv``, tab-separated with a header: index, question, hint,
A, B, C, D, answer, category, l2-category, image (base64), ... . Rows whose ``index`` is
>= 1e6 are the rotated copies of a question (same ``index % 1e6``, options shifted).

Images are decoded into ``image_root`` - a folder the caller passes (created if needed;
required unless ``check_images=False``) - as ``<index>.<ext>``, the bytes as stored (the
format from the base64 header), so capture opens them as paths; files already there are kept.

Prompt: hint (when not empty) + "\\n" + question, then "\\nA. opt" per option up to the first
empty one, then "\\nAnswer with the option's letter from the given choices directly."
Matching: VLMEvalKit's exact matching (``vlmeval/utils/matching_util.py`` ``can_infer`` at
commit aca64dbb, 2025-04-08; the same rules from 98e3733f, 2024-02-04, to 2025-08-04), in order:
an answer holding "Failed to obtain answer via API" is no option; one holding a refusal
("Cannot determine the answer", "I can't process this file.", "I'm sorry, but without the
image provided", "Sorry, I can't help with images of people yet.") is Z (wrong); else
``.()[],:;!*#{}`` become spaces and the answer is split into words: exactly one option letter
among them -> that option; none, but a standalone "Z" -> Z (wrong: "Z. cat" is not A);
otherwise (no option read, not Z) exactly one option text (lower-cased) inside the
lower-cased answer -> that option; else no match (wrong - VLMEvalKit would then ask a GPT
judge, which offline is not available; ``exact_matching`` counts it wrong). Single pass:
accuracy over the rows with index < 1e6; circular (``mcq_circular_eval``): a question counts
only if every row of its group matches its answer.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from collections import defaultdict
from pathlib import Path

from fastv_analysis.data import Question

from .base import LETTER_ANSWER, Task, build_score, percent

LETTERS = ("A", "B", "C", "D")  # LLaVA's all_options
ROTATION = 1_000_000
_HEADERS = {"iVBORw0KGgo": ".png", "/9j/": ".jpg", "R0lGOD": ".gif", "UklGR": ".webp", "Qk": ".bmp"}


def _none(value) -> bool:
    """LLaVA's is_none for a TSV cell (pandas reads an empty cell as NaN)."""
    return value is None or str(value).strip() == "" or str(value).lower() in ("nan", "none")


def _extension(b64: str) -> str:
    return next((ext for head, ext in _HEADERS.items() if b64.startswith(head)), ".jpg")


def read(path: Path, image_root: Path | None, limit: int | None, check: bool) -> list[Question]:
    if path.is_dir():
        tsvs = sorted(path.glob("mmbench*.tsv"))
        if len(tsvs) != 1:
            raise FileNotFoundError(f"{path}: expected one mmbench*.tsv, found {len(tsvs)}")
        path = tsvs[0]
    if not path.exists():
        raise FileNotFoundError(f"MMBench file {path} does not exist")
    if check and image_root is None:
        raise ValueError("mmbench: pass image_root, the folder to decode the TSV's base64 images into")
    root = image_root or path.parent / f"{path.stem}_images"
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}"
                             + (" (a test split has no answers: score it on the MMBench server)"
                                if missing == ["answer"] else ""))
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                index = int(float(row["index"]))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: index {row['index']!r} is not a number") from None
            options = []
            for letter in LETTERS:
                if _none(row.get(letter)):
                    break
                options.append(str(row[letter]))
            answer = str(row["answer"]).strip()
            if answer not in LETTERS[:len(options)]:
                raise ValueError(f"{where}: answer {answer!r} is not one of the row's option letters")
            text = str(row["question"])
            if not _none(row.get("hint")):
                text = f"{row['hint']}\n{text}"
            text += "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options))
            b64 = str(row["image"] or "").strip()
            image = root / f"{index}{_extension(b64)}"
            if check and not image.exists():
                try:
                    data = base64.b64decode(b64, validate=False)
                except (binascii.Error, ValueError):
                    raise ValueError(f"{where}: image is not valid base64") from None
                if not data:
                    raise ValueError(f"{where}: empty image")
                image.parent.mkdir(parents=True, exist_ok=True)
                tmp = image.with_name(f".{image.name}.tmp-{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, image)
            letters = list(LETTERS[:len(options)])
            out.append(Question(question_id=str(index), image=image, text=f"{text}\n{LETTER_ANSWER}", answer=answer,
                                category=str(row.get("category") or ""), choices=options,
                                meta={"group": index % ROTATION, "l2_category": str(row.get("l2-category") or ""),
                                      "llava_question_id": index, "llava_prompt": text,
                                      "llava_fields": {"round_id": 0, "options": options, "option_char": letters}}))
            if limit is not None and len(out) >= limit:
                break
    return out


REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
API_FAILURE = "Failed to obtain answer via API"


def _infer_option(text: str, letters: tuple[str, ...]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: an option letter, "Z" (refusal / standalone Z), or None."""
    if API_FAILURE in text:
        return None
    if any(refusal in text for refusal in REFUSALS):
        return "Z"
    cleaned = text
    for c in ".()[],:;!*#{}":
        cleaned = cleaned.replace(c, " ")
    words = cleaned.split()
    found = [letter for letter in letters if letter in words]
    if len(found) == 1:
        return found[0]
    return "Z" if not found and "Z" in words else None


def match_option(text: str, options: list[str]) -> str | None:
    """The letter VLMEvalKit's ``can_infer`` reads from a model text ("Z": refused, which is
    wrong), or None (module docstring)."""
    letters = LETTERS[:len(options)]
    letter = _infer_option(text, letters)
    if letter:
        return letter
    lower = text.lower()
    found = [letter for letter, option in zip(letters, options) if str(option).lower() in lower]
    return found[0] if len(found) == 1 else None


def score(questions: list[Question], answers: dict[str, str]):
    rows = []
    for q in questions:
        letter = match_option(answers[q.question_id], q.choices or [])
        right = letter == q.answer
        rows.append({"question_id": q.question_id, "category": q.category, "score": float(right), "correct": right,
                     "parsed": letter or "", "group": q.meta["group"], "l2": q.meta.get("l2_category", ""),
                     "original": int(q.question_id) < ROTATION})
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    circular = [{"category": g[0]["category"], "l2": g[0]["l2"], "score": float(all(r["correct"] for r in g))}
                for g in groups.values()]
    single = [r for r in rows if r["original"]]
    metrics = [("circular_accuracy", "", percent([c["score"] for c in circular])),
               ("accuracy", "", percent([r["score"] for r in single])),
               ("n_questions", "", len(groups)), ("n_rows", "", len(rows)),
               ("n_unmatched", "", sum(r["parsed"] == "" for r in rows)),
               ("n_refused", "", sum(r["parsed"] == "Z" for r in rows))]
    for key, prefix in (("category", ""), ("l2", "l2:")):
        for name in dict.fromkeys(c[key] for c in circular if c[key]):
            metrics.append(("circular_accuracy", prefix + name,
                            percent([c["score"] for c in circular if c[key] == name])))
            metrics.append(("accuracy", prefix + name, percent([r["score"] for r in single if r[key] == name])))
    return build_score("mmbench", rows, metrics, "circular_accuracy")


TASK = Task("mmbench", "MMBench dev (single pass and circular)", "circular_accuracy", read, score,
            markers=("mmbench_dev_20230712.tsv",))
