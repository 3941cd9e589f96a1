"""What every benchmark module shares: the ``Task`` and ``TaskScore`` types, file helpers
with one-line errors, and the LLaVA answers-file reader.

Metrics are percentages (0-100, as the official scripts print them and papers quote them),
except MME's scores (points: 100 * acc + 100 * acc+ per subtask) and counts (``n``...).
Per-question ``score`` is in [0, 1] (soft for TextVQA / VQAv2).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from fastv_analysis.data import Question, sample_name

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."  # its multiple-choice suffix


# ---------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------

def metric_key(metric: str, category: str = "") -> str:
    """``category/metric`` (or ``metric`` for the whole benchmark): the keys of ``TaskScore.metrics``."""
    return f"{category}/{metric}" if category else metric


@dataclass
class TaskScore:
    """A benchmark's score: per-question rows, every metric, and the headline among them."""

    task: str
    per_question: pl.DataFrame  # question_id, category, score in [0, 1], correct, parsed
    long: pl.DataFrame  # metric, category, value (one row per metric)
    headline: tuple[str, float]  # (metric key, value)

    @property
    def metrics(self) -> dict[str, float]:
        """``{category/metric: value}``, the headline first."""
        out = {self.headline[0]: self.headline[1]}
        for m, c, v in self.long.select("metric", "category", "value").iter_rows():
            out.setdefault(metric_key(m, c), v)
        return out

    def to_json(self) -> dict:
        """JSON-safe summary (NaN becomes null)."""
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v
        return {"benchmark": self.task, "headline": {"name": self.headline[0], "value": clean(self.headline[1])},
                "metrics": {k: clean(v) for k, v in self.metrics.items()}, "n_questions": self.per_question.height}


def build_score(task: str, rows: list[dict], metrics: list[tuple[str, str, float]], headline: str) -> TaskScore:
    """Assemble a TaskScore from per-question dicts and ``(metric, category, value)`` triples."""
    per_question = pl.DataFrame(
        {"question_id": [r["question_id"] for r in rows], "category": [r["category"] for r in rows],
         "score": [float(r["score"]) for r in rows], "correct": [bool(r["correct"]) for r in rows],
         "parsed": [str(r.get("parsed", "")) for r in rows]},
        schema={"question_id": pl.String, "category": pl.String, "score": pl.Float64,
                "correct": pl.Boolean, "parsed": pl.String})
    long = pl.DataFrame({"metric": [m for m, _, _ in metrics], "category": [c for _, c, _ in metrics],
                         "value": [float(v) for _, _, v in metrics]},
                        schema={"metric": pl.String, "category": pl.String, "value": pl.Float64})
    values = {metric_key(m, c): float(v) for m, c, v in metrics}
    return TaskScore(task, per_question, long, (headline, values[headline]))


def percent(values: Sequence[float]) -> float:
    """Mean of [0, 1] scores in percent; NaN for none."""
    return 100.0 * sum(values) / len(values) if values else float("nan")


def grouped_accuracy(rows: list[dict], key: Callable[[dict], str], metric: str = "accuracy") -> list[tuple]:
    """``(metric, group, percent)`` for each group of rows, in first-seen order."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r["score"])
    return [(metric, g, percent(v)) for g, v in groups.items()]


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

def find(base: Path, candidates: Sequence[str], what: str) -> Path:
    """The first candidate under ``base`` that exists; else FileNotFoundError naming them."""
    for c in candidates:
        if (base / c).exists():
            return base / c
    raise FileNotFoundError(f"{what}: none of {', '.join(str(base / c) for c in candidates)} exists")


def resolve(path: str | Path, main_file: str) -> tuple[Path, Path]:
    """``(folder, main file)`` for a path that is the benchmark folder or its main file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark data {path} does not exist")
    if path.is_dir():
        return path, find(path, [main_file], "question file")
    return path.parent, path


def load_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed JSON, column {err.colno}: {err.msg}") from None


def iter_jsonl(path: Path):
    """``(line number, object)`` for each non-empty line; malformed lines raise naming file and line."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: malformed JSON, column {err.colno}: {err.msg}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def need(obj: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if obj.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")


def require_images(questions: list[Question]) -> None:
    for q in questions:
        if not q.image.is_file():
            raise FileNotFoundError(f"image {q.image} of {sample_name(q.question_id)} does not exist")


# ---------------------------------------------------------------------------------------
# Answers (LLaVA's format: one JSON object a line with question_id and text)
# ---------------------------------------------------------------------------------------

def read_answers(path: str | Path, questions: Sequence[Question] | None = None) -> dict[str, str]:
    """``{question_id: text}`` from a LLaVA answers file (other keys ignored).

    With ``questions``: ids are checked (an answer for an unknown question is an error), and
    LLaVA ids shared by several questions (MME: one id per image; TextVQA: the image id) are
    told apart by the answer's ``prompt``, which LLaVA's ``model_vqa_loader`` writes as the
    question file's text; such ids are listed in ``Question.meta["llava_question_id"]``.
    Answers to questions a task leaves out on purpose (ScienceQA's text-only ones, listed in
    ``meta["skip_answer_ids"]``) are passed over.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"answers file {path} does not exist")
    by_id = {q.question_id: q for q in questions} if questions is not None else None
    shared: dict[str, list[Question]] = defaultdict(list)
    skips = {id(v): v for q in questions or () if (v := q.meta.get("skip_answer_ids"))}.values()
    for q in questions or ():
        alias = q.meta.get("llava_question_id")
        if alias is not None and str(alias) not in (by_id or {}):
            shared[str(alias)].append(q)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, obj in iter_jsonl(path):
        where = f"{path}:{number}"
        if obj.get("question_id") is None:
            raise ValueError(f"{where}: missing question_id")
        if not isinstance(obj.get("text"), str):
            raise ValueError(f"{where}: missing text (the model's answer, a string)")
        qid = str(obj["question_id"])
        if by_id is not None and qid not in by_id and any(qid in v for v in skips):
            continue
        if by_id is not None and qid not in by_id:
            candidates = shared.get(qid)
            if not candidates:
                raise ValueError(f"{where}: answer for unknown question_id {qid}")
            prompt = obj.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: question_id {qid} is shared by {len(candidates)} questions; "
                                 f"the answer needs its prompt to tell which")
            same = [q for q in candidates if q.text.strip() == prompt.strip()]
            if not same:
                raise ValueError(f"{where}: no question with id {qid} has this prompt")
            free = [q for q in same if q.question_id not in out]
            qid = (free or same)[0].question_id
        if qid in out:
            raise ValueError(f"{where}: second answer for question {qid} (first on line {first_line[qid]})")
        out[qid] = obj["text"]
        first_line[qid] = number
    return out


def file_name(question: Question) -> str:
    """A question as the user's files name it: the question_id its answer carries (LLaVA's
    id), and its prompt where that id is shared (MME: one id per image) or is not ours."""
    record = answer_record(question)
    name = sample_name(record["question_id"])
    if str(record["question_id"]) == question.question_id:
        return name
    prompt = " ".join(str(record["prompt"]).split())
    return f"{name} (prompt {prompt[:70] + '...' if len(prompt) > 70 else prompt!r})"


def answer_record(question: Question) -> dict:
    """``question_id`` and ``prompt`` as LLaVA's ``llava/eval/model_vqa*.py`` write them in an
    answers file, plus the benchmark's extra fields, so the official scripts read our files.

    ``question_id`` keeps the question file's own value and JSON type
    (``meta["llava_question_id"]``: POPE's and VQAv2's ints, MMBench's TSV ``index``, MME's
    and TextVQA's shared ids); ``prompt`` is ``meta["llava_prompt"]`` where the script writes
    something other than the question text (ScienceQA: "<image>\\n" first, which
    ``eval_science_qa.py`` counts; MMBench: without the answer suffix); ``meta["llava_fields"]``
    adds fields such as MMBench's ``round_id``, ``options``, ``option_char``.
    """
    meta = question.meta
    return {"question_id": meta.get("llava_question_id", question.question_id),
            "prompt": meta.get("llava_prompt", question.text), **meta.get("llava_fields", {})}


# ---------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One benchmark: how to read it as researchers have it on disk, and its official metric.

    ``reader(path, image_root, limit, check) -> list[Question]`` (``check``: whether image
    files are wanted; ``read`` then checks they exist) and
    ``scorer(questions, answers) -> TaskScore`` are the module's pure functions; ``markers``
    are the names of files (or folders) that identify the layout for :func:`detect` and
    that ``read`` accepts as ``path`` besides the benchmark folder. ``order_note(questions,
    answer ids in file order) -> str | None``: where the official script pairs answers by
    position (POPE, MME), the one line saying that this answers file's order would make it
    give another number than this module's pairing by question id.
    """

    name: str
    title: str
    headline: str
    reader: Callable[..., list[Question]]
    scorer: Callable[[list[Question], dict[str, str]], TaskScore]
    markers: tuple[str, ...] = field(default=())
    order_note: Callable[[list[Question], list[str]], str | None] | None = None

    def read(self, path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
             *, check_images: bool = True, missing_images_ok: bool = False) -> list[Question]:
        """The benchmark's questions in file order (the first ``limit``); ``image_root`` overrides
        the default image folder (MMBench: the folder its base64 images are decoded into).
        ``check_images=False`` (scoring) neither checks nor writes image files;
        ``missing_images_ok`` (capture --skip-bad) leaves a missing image to the sample."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        questions = self.reader(Path(path), None if image_root is None else Path(image_root), limit, check_images)
        if check_images and not missing_images_ok:  # MMBench's reader decodes its images first
            require_images(questions)
        if not questions:
            raise ValueError(f"{path}: no {self.name} questions")
        ids = [q.question_id for q in questions]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{path}: question id {dup} appears more than once")
        return questions

    def score(self, questions: Sequence[Question], answers: dict[str, str], *,
              missing: str = "error", skip_hint: str = "skip them with missing='skip'") -> TaskScore:
        """Score ``answers`` (``{question_id: model text}``) on ``questions`` the benchmark's way.

        ``missing="error"`` (default): every question needs an answer; ``"skip"``: unanswered
        questions are left out (metrics then carry ``n_missing``). ``skip_hint`` ends the
        error's line (the CLI names its flag).
        """
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
        known = {q.question_id for q in questions}
        unknown = [k for k in answers if k not in known]
        if unknown:
            raise ValueError(f"answer for unknown question_id {unknown[0]} ({len(unknown)} unknown)")
        absent = [q for q in questions if q.question_id not in answers]
        if absent and missing == "error":
            raise ValueError(f"no answer for {file_name(absent[0])} "
                             f"({len(absent)} of {len(questions)} unanswered; {skip_hint})")
        asked = [q for q in questions if q.question_id in answers]
        if not asked:
            raise ValueError("no question has an answer")
        result = self.scorer(asked, {q.question_id: str(answers[q.question_id]) for q in asked})
        if absent:
            extra = pl.DataFrame({"metric": ["n_missing"], "category": [""], "value": [float(len(absent))]},
                                 schema=result.long.schema)
            result = TaskScore(result.task, result.per_question, pl.concat([result.long, extra]), result.headline)
        return result
