"""A run's questions and their scoring, for a plain question file or a standard benchmark.

Capture and eval read a run's questions through :func:`run_questions`, so both see the
same list (sample_id = position in it). A benchmark's answers are scored through
:func:`score_answers`, the benchmark's official rule with its grouped metrics (POPE's
per-split F1, MME's acc+, MMBench's circular pass); a plain question file keeps the generic
exact match / option / yes-no rule of :mod:`fastv_analysis.scoring`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from .data import Question, load_questions


def resolve_benchmark(data: str | Path, benchmark: str | None) -> str | None:
    """The benchmark of ``data``: as named, else detected where the layout is unambiguous;
    None for a plain question file (.jsonl in the LLaVA convention)."""
    from .tasks import detect, get_task

    if benchmark:
        return get_task(benchmark).name
    return detect(data)


def run_questions(data: str | Path, benchmark: str | None, image_root: str | Path | None = None,
                  errors: list[dict] | None = None, missing_images_ok: bool = False) -> list[Question]:
    """Every question of the run's data, in a fixed order (sample_id = position).
    ``missing_images_ok`` (capture --skip-bad): a benchmark question whose image is missing
    is kept, for capture to skip and log like any unreadable image."""
    if benchmark is None:
        return load_questions(data, errors)
    from .tasks import get_task

    return get_task(benchmark).read(data, image_root=image_root, missing_images_ok=missing_images_ok)


def question_group(question: Question) -> str | None:
    """The unit a benchmark's grouped metric scores together: MMBench's circular group (all
    rotations of one question), MME's image (its two questions, for acc+); None elsewhere."""
    if question.meta.get("group") is not None:
        return f"group:{question.meta['group']}"
    if question.meta.get("image_key") is not None:
        return f"image:{question.meta['image_key']}"
    return None


def sample_unit(question: Question) -> str:
    """The independent unit a sample belongs to, for folds, intervals and paired tests:
    the benchmark's own grouping where it has one (MMBench's rotations of one question,
    MME's image), else the image (POPE's three splits and VQAv2 / GQA / TextVQA's several
    questions ask about one image; so do the toy's two questions per scene), named by its
    folder and file name (``val2014/COCO_...jpg``, ScienceQA's ``<id>/image.png``) so the
    label does not depend on where the data lies."""
    image = Path(question.image)
    return question_group(question) or f"image:{image.parent.name}/{image.name}"


def _units(questions: Sequence[Question]) -> list[list[int]]:
    """Question indices in whole groups (first-appearance order); an ungrouped question alone."""
    units: dict[object, list[int]] = {}
    for i, q in enumerate(questions):
        units.setdefault(question_group(q) or ("alone", i), []).append(i)
    return list(units.values())


def _take(units: list[list[int]], n: int) -> list[list[int]]:
    """Whole units from the front until they hold at least ``n`` questions."""
    out, count = [], 0
    for unit in units:
        if count >= n:
            break
        out.append(unit)
        count += len(unit)
    return out


def sample_order(questions: Sequence[Question], subsample: int | None = None, seed: int = 0,
                 limit: int | None = None) -> list[int]:
    """Sample ids to capture: all, or a seeded random subset of at least ``subsample``
    questions, then the first ``limit`` — always in whole groups (:func:`question_group`):
    a circular group missing a rotation, or an MME image missing a question, would score
    higher than the benchmark does. The subset is a prefix of one seeded permutation of the
    groups, so a larger N extends a smaller one's run."""
    units = _units(questions)
    if subsample is not None and subsample < len(questions):
        shuffled = [units[i] for i in np.random.default_rng(seed).permutation(len(units))]
        units = sorted(_take(shuffled, subsample), key=min)
    if limit is not None:
        units = _take(units, limit)
    return sorted(i for unit in units for i in unit)


def complete_groups(sample_ids: Sequence[int], questions: Sequence[Question], available: Sequence[int]) -> list[int]:
    """``sample_ids`` plus every available sample of the groups they touch (eval's --limit)."""
    wanted = {question_group(questions[i]) for i in sample_ids} - {None}
    return sorted(set(sample_ids) | {i for i in available if question_group(questions[i]) in wanted})


def questions_fingerprint(questions: Sequence[Question]) -> str:
    """sha256 of what the questions say (id, text, answer, category, choices, image name):
    a benchmark spread over several files changes exactly when this changes."""
    h = hashlib.sha256()
    for q in questions:
        answer = q.answer if isinstance(q.answer, int) else str(q.answer)
        h.update(json.dumps([q.question_id, q.text, answer, q.category, q.choices, Path(q.image).name],
                            ensure_ascii=False).encode())
    return h.hexdigest()


def score_answers(benchmark: str, questions: Sequence[Question], answers: dict[str, str]):
    """Per-question ``score`` (soft where the metric is) and ``correct`` of answers given as
    ``{question_id: text}`` by the benchmark's official rule, and its metrics.

    Returns (``polars.DataFrame`` question_id, score, correct + the task's own columns;
    TaskScore).
    """
    from .tasks import get_task

    asked = [q for q in questions if q.question_id in answers]
    result = get_task(benchmark).score(asked, answers, missing="skip")
    return result.per_question, result


def headline_interval(result, per_question: pl.DataFrame, n_boot: int = 200, seed: int = 0,
                      units: dict | None = None) -> tuple:
    """95% interval of a benchmark's headline; ``units``: question_id -> its unit
    (:func:`sample_unit`), so copies of one item (POPE's splits over one image, MME's two
    questions per image, several questions per image) count once; None: each question alone.

    A headline that is the mean of per-question scores (accuracy, soft VQA accuracy):
    Wilson with the cluster-robust effective n for 0/1 scores
    (:func:`fastv_analysis.stats.cluster_wilson_interval`), Student t with the
    cluster-robust (CR1) standard error and units - 1 degrees of freedom for soft ones —
    both the plain intervals when every unit is one question. POPE's mean F1: a bootstrap
    over units (a drawn image brings its questions in every split), in a fixed order with a
    fixed seed, so equal answers always give equal intervals. Others (MME's acc+ pairs,
    MMBench's circular groups): None.
    """
    from scipy import stats as sps

    from .stats import cluster_residual_sum, cluster_wilson_interval, unit_codes

    name, value = result.headline
    per_question = per_question.sort("question_id")  # the same interval whatever the row order
    scores = per_question["score"].to_numpy()
    qids = per_question["question_id"].to_list()
    code = unit_codes([units.get(q, q) for q in qids] if units else qids) if len(qids) else np.zeros(0, int)
    if len(scores) and math.isclose(value, 100 * scores.mean(), abs_tol=1e-6):
        if np.all((scores == 0) | (scores == 1)):
            lo, hi = cluster_wilson_interval(scores, code)
            return 100 * lo, 100 * hi
        n_units = int(code.max()) + 1
        se = math.sqrt(n_units / max(n_units - 1, 1) * cluster_residual_sum(scores, code)) / len(scores)
        half = sps.t.ppf(0.975, max(n_units - 1, 1)) * se
        return 100 * (scores.mean() - half), 100 * (scores.mean() + half)
    if result.task == "pope" and name == "mean/f1":
        return _pope_f1_interval(per_question, code, n_boot, seed)
    return None, None


def _pope_f1_interval(per_question: pl.DataFrame, code: np.ndarray, n_boot: int, seed: int) -> tuple:
    """Bootstrap over units of the mean over splits of F1 (positive = yes): each draw takes
    units with replacement and every question of a drawn unit, in every split."""
    pred_yes = (per_question["parsed"] == "yes").to_numpy()
    label_yes = np.where(per_question["correct"].to_numpy(), pred_yes, ~pred_yes)
    split_names = sorted(set(per_question["category"].to_list()))
    split = np.array([split_names.index(c) for c in per_question["category"].to_list()])
    n_units = int(code.max()) + 1
    counts = np.zeros((3, n_units, len(split_names)))  # tp, fp, fn per unit and split
    for i, flags in enumerate((pred_yes & label_yes, pred_yes & ~label_yes, ~pred_yes & label_yes)):
        np.add.at(counts[i], (code, split), flags.astype(np.float64))
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, n_units, n_units), minlength=n_units) for _ in range(n_boot)])
    tp, fp, fn = (weights @ counts[i] for i in range(3))  # [n_boot, splits]
    denom = 2 * tp + fp + fn
    f1 = np.where(tp > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    values = 100 * f1.mean(axis=1)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))
