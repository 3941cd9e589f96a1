"""Copies of one item are one unit (issue 19.2): which unit a sample belongs to, and the
intervals and tables that count units instead of copies. Expected values are worked out
in the comments or come from an independent route (the same data with one copy)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from fastv_analysis import stats
from fastv_analysis.benchmark import headline_interval, sample_unit
from fastv_analysis.data import Question


def test_sample_unit_is_the_benchmarks_grouping_else_the_image():
    mmb = [Question(f"{i}", Path(f"/x/{i}.png"), "q", "A", meta={"group": i % 1_000_000})
           for i in (7, 1_000_007, 8)]
    assert sample_unit(mmb[0]) == sample_unit(mmb[1]) != sample_unit(mmb[2])  # rotations of one question
    mme = [Question(f"{i}", Path("/mme/artwork/a.jpg"), "q", "Yes", meta={"image_key": "artwork/a.jpg"})
           for i in range(2)]
    assert sample_unit(mme[0]) == sample_unit(mme[1])
    # POPE's three splits ask about the same COCO image; a plain file's two questions of one scene
    pope = [Question(f"{i}", Path("/coco/val2014/COCO_1.jpg"), "q", "yes", category=c)
            for i, c in enumerate(("adversarial", "popular", "random"))]
    assert len({sample_unit(q) for q in pope}) == 1
    assert sample_unit(Question("a", Path("/i/1.png"), "q", "x")) != sample_unit(Question("b", Path("/i/2.png"), "q", "x"))


def _pope(n_images: int, copies: int, rng) -> tuple[pl.DataFrame, dict]:
    """POPE-shaped per-question rows: every image asked in every split, ``copies`` times."""
    rows, units = [], {}
    answers = rng.random((n_images, 3)) < 0.6
    labels = rng.random((n_images, 3)) < 0.5
    for i in range(n_images):
        for s, split in enumerate(("adversarial", "popular", "random")):
            for c in range(copies):
                qid = f"{split}-{i}-{c}"
                pred_yes, label_yes = bool(answers[i, s]), bool(labels[i, s])
                rows.append({"question_id": qid, "category": split, "parsed": "yes" if pred_yes else "no",
                             "correct": pred_yes == label_yes, "score": float(pred_yes == label_yes)})
                units[qid] = f"image:{i}"
    return pl.DataFrame(rows), units


def test_pope_f1_interval_counts_an_image_once_however_often_it_is_asked():
    # Every question copied 4 times within its image: F1 of any draw is unchanged by scaling
    # every count by 4, so the bootstrap over images must give exactly the one-copy interval.
    # (Resampling questions, as before, narrowed it by about half.)
    result = SimpleNamespace(task="pope", headline=("mean/f1", 70.0))
    one, u1 = _pope(60, 1, np.random.default_rng(0))
    four, u4 = _pope(60, 4, np.random.default_rng(0))
    assert headline_interval(result, four, units=u4) == pytest.approx(headline_interval(result, one, units=u1))
    lo, hi = headline_interval(result, four, units={q: q for q in u4})  # copies as independent
    lo1, hi1 = headline_interval(result, one, units=u1)
    assert hi - lo < 0.75 * (hi1 - lo1)


def test_pope_f1_interval_is_identical_for_equal_answers_in_any_row_order():
    result = SimpleNamespace(task="pope", headline=("mean/f1", 70.0))
    rows, units = _pope(40, 1, np.random.default_rng(1))
    shuffled = rows.sample(fraction=1.0, shuffle=True, seed=3)
    assert headline_interval(result, shuffled, units=units) == headline_interval(result, rows, units=units)


def test_accuracy_interval_of_copies_is_the_interval_of_one_copy():
    # Two identical copies per unit: the cluster-robust variance is p(1-p)/n_units, so the
    # interval is the plain Wilson interval of the single copies (k of n_units).
    y = np.array([1] * 23 + [0] * 17, dtype=float)
    per_question = pl.DataFrame({"question_id": [f"q{i}-{c}" for i in range(40) for c in range(2)],
                                 "score": np.repeat(y, 2)})
    result = SimpleNamespace(task="gqa", headline=("accuracy", 100 * y.mean()))
    units = {f"q{i}-{c}": f"u{i}" for i in range(40) for c in range(2)}
    lo, hi = stats.wilson_interval(23, 40)
    assert headline_interval(result, per_question, units=units) == pytest.approx((100 * lo, 100 * hi))


def test_jaccard_vs_avg_is_measured_for_query_variants_and_schedules(tmp_path):
    # Before: every row whose *method* was avg_all_heads got 1.0 (the text_mean variant and
    # the schedule too), and those rows then fell out of the pooled relations.
    from fastv_analysis.evaluate import statistics_frame, with_schedule

    sel = tmp_path / "select"
    sel.mkdir()
    pl.DataFrame({"sample_id": [0, 0, 1, 1], "agg_layer": [2] * 4, "keep": [64] * 4,
                  "config_a": ["avg_all_heads", "avg_all_heads@text_mean"] * 2,
                  "config_b": ["avg_all_heads@text_mean", "random"] * 2,
                  "jaccard": [0.18, 0.05, 0.25, 0.07]}).write_parquet(sel / "overlap.parquet")
    pl.concat([pl.DataFrame({"sample_id": [0, 0, 1, 1], "agg_layer": [2] * 4, "keep": [64] * 4,
                             "config_a": ["avg_all_heads"] * 4, "config_b": ["random"] * 4,
                             "jaccard": [0.06, 0.06, 0.08, 0.08]}).unique(),
               pl.read_parquet(sel / "overlap.parquet")]).write_parquet(sel / "overlap.parquet")
    pl.DataFrame({"sample_id": [0, 1], "agg_layer": [2, 2], "max_head_share": [0.2, 0.3],
                  "head_entropy": [1.0, 2.0]}).write_parquet(sel / "heads.parquet")
    base = pl.DataFrame({"sample_id": [0, 1] * 3, "agg_layer": [2] * 6, "keep": [64] * 6,
                         "method": ["avg_all_heads"] * 4 + ["random"] * 2,
                         "config": ["avg_all_heads"] * 2 + ["avg_all_heads@text_mean"] * 2 + ["random"] * 2,
                         "selection_id": [str(i) for i in range(6)], "alpha": [None] * 6},
                        schema_overrides={"alpha": pl.Float64})
    pred = with_schedule(base, [(4, 32, "max_head")]).with_columns(correct=pl.lit(True))
    out = statistics_frame(pred, tmp_path)
    j = {(c, s): v for c, s, v in out.select("config", "sample_id", "jaccard_vs_avg").iter_rows()}
    assert j["avg_all_heads", 0] == 1.0
    assert j["avg_all_heads@text_mean", 0] == 0.18 and j["avg_all_heads@text_mean", 1] == 0.25
    assert j["avg_all_heads@text_mean then max_head K=4 keep 32", 1] == 0.25  # its first cut
    assert j["random", 0] == 0.06 and j["random then max_head K=4 keep 32", 1] == 0.08
    assert j["avg_all_heads then max_head K=4 keep 32", 0] == 1.0


def test_a_units_label_does_not_depend_on_where_the_data_lies():
    # an image's unit is named by its folder and file, so a moved run (or another checkout)
    # writes the same predictions table; ScienceQA's images are all image.png in a folder per id
    a = Question("1", Path("/home/a/scienceqa/images/test/17/image.png"), "q", "A")
    b = Question("1", Path("/mnt/b/scienceqa/images/test/17/image.png"), "q", "A")
    c = Question("2", Path("/home/a/scienceqa/images/test/18/image.png"), "q", "A")
    assert sample_unit(a) == sample_unit(b) == "image:17/image.png" != sample_unit(c)
