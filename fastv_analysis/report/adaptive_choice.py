"""Section 16: the per-sample oracle and the cross-validated choice rule, for reading.
"""

from __future__ import annotations

import polars as pl

from .beats_random import SIGNIFICANCE
from .tables import RunTables, sci_text


def oracle_view(oracle: pl.DataFrame) -> pl.DataFrame:
    """The oracle table for reading: per (agg_layer, keep) the best single strategy and its
    accuracy, the oracle's (a sample counts when ANY candidate answers it) with its 95%
    interval, and the gap (points): an upper bound on choosing per sample, not achievable."""
    ci = pl.format("[{}, {}]", (100 * pl.col("oracle_ci_lo")).round(1), (100 * pl.col("oracle_ci_hi")).round(1))
    extra = ["n_candidates"] if "n_candidates" in oracle.columns else []
    return oracle.select("agg_layer", "keep", "n", *extra, "best_single",
                         (100 * pl.col("best_single_accuracy")).round(1).alias("best_single_%"),
                         (100 * pl.col("oracle_accuracy")).round(1).alias("oracle_%"), ci.alias("oracle_95%"),
                         (100 * pl.col("oracle_gain")).round(1).alias("oracle_gain_pts")).sort(
        ["agg_layer", "keep"], descending=[False, True])


def adaptive_view(adaptive: pl.DataFrame) -> pl.DataFrame:
    """The cross-validated rule for reading: its accuracy on held-out folds (95% interval) next
    to the per-fold best single strategy's (chosen on the training folds too), the samples
    only one of them answers, the permutation p of the rule's gain (the whole cross-validation
    re-run with the statistics shuffled between units) and its Holm adjustment, and the rule
    fitted on all samples with its training accuracy (the rule text, e.g. "x <= t ? a : b")."""
    ci = pl.format("[{}, {}]", (100 * pl.col("cv_ci_lo")).round(1), (100 * pl.col("cv_ci_hi")).round(1))
    p = "p_permutation" if "p_permutation" in adaptive.columns else "p_mcnemar"  # an older eval: McNemar
    units = ["n_units"] if "n_units" in adaptive.columns else []
    return adaptive.select(
        "agg_layer", "keep", "n", *units, "n_folds", (100 * pl.col("cv_accuracy")).round(1).alias("rule_cv_%"),
        ci.alias("rule_cv_95%"), (100 * pl.col("best_single_cv_accuracy")).round(1).alias("best_single_cv_%"),
        (100 * (pl.col("cv_accuracy") - pl.col("best_single_cv_accuracy"))).round(1).alias("rule_gain_pts"),
        "n_rule_only", "n_best_single_only", sci_text(p), sci_text("p_holm"), "rule",
        (100 * pl.col("rule_train_accuracy")).round(1).alias("rule_train_%")).sort(
        ["agg_layer", "keep"], descending=[False, True])


def adaptive_note(oracle: pl.DataFrame | None, adaptive: pl.DataFrame | None, level: float = SIGNIFICANCE) -> str:
    """One line: the largest oracle gap, and whether the rule beats the per-fold best single."""
    if oracle is None or adaptive is None:
        return ("No adaptive-choice section: eval has not run, or predates oracle.parquet / adaptive.parquet "
                "(re-run eval).")
    if oracle.height == 0 or adaptive.height == 0:
        return ("No adaptive-choice section: eval answered fewer than two pruned strategies, so there is nothing "
                "to choose.")
    top = oracle.sort("oracle_gain", descending=True).row(0, named=True)
    won = adaptive.filter(pl.col("p_holm") < level, pl.col("cv_accuracy") > pl.col("best_single_cv_accuracy"))
    lost = adaptive.filter(pl.col("p_holm") < level, pl.col("cv_accuracy") < pl.col("best_single_cv_accuracy"))
    gain = (100 * (adaptive["cv_accuracy"] - adaptive["best_single_cv_accuracy"])).to_numpy()
    return (f"The oracle could add at most {100 * top['oracle_gain']:+.1f} pts (keep {top['keep']}, over "
            f"{top['best_single']}); the cross-validated rule changes accuracy by {gain.min():+.1f} to "
            f"{gain.max():+.1f} pts against the per-fold best single strategy and is better at Holm p < {level:g} "
            f"in {won.height} and worse in {lost.height} of {adaptive.height} (layer, keep) cells.")


def adaptive_missing(t: RunTables) -> str | None:
    """Why the adaptive-choice section has no tables (None when eval made them)."""
    ready = t.oracle is not None and t.adaptive is not None and t.oracle.height and t.adaptive.height
    return None if ready else adaptive_note(t.oracle, t.adaptive)
