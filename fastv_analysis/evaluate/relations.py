"""What selection statistics say about correctness: each answer joined with its selection's
statistics, their relation to being correct (per configuration and pooled within samples), and
the adaptive tables (choosing the strategy per sample: the oracle and a cross-validated rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .. import stats
from .accuracy import with_adjusted, with_units
from .plan import FULL, REFERENCE, reference_label

QUANTILES = 4

STATISTICS = ("jaccard_vs_avg", "max_head_share", "head_entropy", "mean_row", "mean_col", "bottom_share",
              "object_token_share", "objects_touched")


def _budget(frame: pl.DataFrame) -> pl.Expr:
    """A row's budget as one join key: its keep count, or its ``--keep-ratio`` (whose rows
    keep each sample's own count)."""
    keep = pl.lit("keep ") + pl.col("keep").cast(pl.Utf8)
    if "ratio" not in frame.columns:
        return keep.alias("budget")
    return pl.when(pl.col("ratio").is_null()).then(keep).otherwise(
        pl.lit("ratio ") + pl.col("ratio").cast(pl.Utf8)).alias("budget")


def _reference_at_budget(frame: pl.DataFrame) -> pl.Expr:
    """Per row, the plain avg_all_heads configuration's id at the row's budget
    (:func:`reference_label`)."""
    if "ratio" not in frame.columns:
        return pl.lit(REFERENCE)
    return pl.when(pl.col("ratio").is_null()).then(pl.lit(REFERENCE)).otherwise(
        pl.col("ratio").map_elements(lambda r: reference_label(REFERENCE, r), return_dtype=pl.Utf8))


def statistics_frame(pred: pl.DataFrame, run_dir: Path) -> pl.DataFrame:
    """Predictions joined with each selection's statistics (overlap with the plain
    avg_all_heads configuration's set at the same sample, layer and keep — measured for
    every configuration, query variants included; a schedule's first cut for a schedule;
    1.0 for that configuration itself — head statistics, spatial statistics)."""
    sel_dir = run_dir / "select"
    overlap = pl.read_parquet(sel_dir / "overlap.parquet")
    overlap = overlap.with_columns(_budget(overlap))
    ref = _reference_at_budget(overlap)
    vs_avg = pl.concat([
        overlap.filter(pl.col("config_a") == ref).select(
            "sample_id", "agg_layer", "budget", pl.col("config_b").alias("base_config"), pl.col("jaccard")),
        overlap.filter(pl.col("config_b") == ref).select(
            "sample_id", "agg_layer", "budget", pl.col("config_a").alias("base_config"), pl.col("jaccard")),
    ]).rename({"jaccard": "jaccard_vs_avg"})
    heads = pl.read_parquet(sel_dir / "heads.parquet").select("sample_id", "agg_layer", "max_head_share",
                                                                "head_entropy")
    out = pred if "base_config" in pred.columns else pred.with_columns(pl.col("config").alias("base_config"))
    out = out.with_columns(_budget(out)).join(vs_avg, on=["sample_id", "agg_layer", "budget", "base_config"],
                                               how="left").drop("budget")
    is_ref = pl.col("base_config") == _reference_at_budget(out)
    out = out.with_columns(pl.when(is_ref).then(1.0).otherwise(pl.col("jaccard_vs_avg")).alias("jaccard_vs_avg"))
    return out.join(heads, on=["sample_id", "agg_layer"], how="left")


def relations_table(frame: pl.DataFrame, n_permutations: int = 2000, seed: int = 0,
                    statistics: tuple[str, ...] = STATISTICS) -> pl.DataFrame:
    """How each selection statistic relates to being correct.

    scope "configuration": within one configuration (one row per sample, so the samples
    are independent), Spearman's rho with its p-value and accuracy by quartile of the
    statistic. scope "within_sample": pooled over the pruned configurations (``full`` and
    avg_all_heads left out) but compared only within each (sample, layer, keep): the
    within-stratum correlation ``r_within`` and a permutation p that shuffles the
    statistic within strata (:func:`fastv_analysis.stats.within_sample_permutation_test`),
    so a sample counted in 24 configurations is one sample and keep cannot confound it.
    Statistics that are properties of the sample (head statistics) do not vary within a
    stratum and get no pooled test. Each scope is its own family for ``p_holm``/``p_bh``.

    Copies of one item (a ``unit`` column: MME's two questions per image, MMBench's
    rotations, several questions per image) are one unit: a configuration's Spearman test
    runs on the units' mean statistic and mean outcome (``n_units`` of them), and the pooled
    permutation shuffles every copy of a unit alike. ``statistics``: the columns related
    (default :data:`STATISTICS`; the methods section passes its own).
    """
    scored = with_units(frame.filter(pl.col("method") != FULL))
    outcome = "score" if "score" in frame.columns else "correct"  # soft where the metric is soft
    per_config = _per_configuration(scored, outcome, statistics)
    pooled = _pooled(scored.filter(pl.col("config") != _reference_at_budget(scored)), outcome, n_permutations, seed,
                     statistics)
    schema = {"scope": pl.Utf8, "config": pl.Utf8, "agg_layer": pl.Int64, "keep": pl.Int64, "statistic": pl.Utf8,
              "n": pl.Int64, "n_units": pl.Int64, "n_strata": pl.Int64, "spearman_rho": pl.Float64, "r_within": pl.Float64,
              "p_value": pl.Float64, **{f"accuracy_q{i + 1}": pl.Float64 for i in range(QUANTILES)}}
    frames = [with_adjusted(pl.DataFrame(rows, schema=schema), ["p_value"]) for rows in (per_config, pooled) if rows]
    out = pl.concat(frames) if frames else with_adjusted(pl.DataFrame(schema=schema), ["p_value"])
    return out.rename({"p_value_holm": "p_holm", "p_value_bh": "p_bh"})


def _per_configuration(scored: pl.DataFrame, outcome: str, statistics=STATISTICS) -> list[dict]:
    """Scope "configuration" of :func:`relations_table`: per configuration and statistic,
    Spearman's rho over units and accuracy by quartile of the statistic."""
    from scipy.stats import spearmanr

    per_config = []
    for (config, layer, keep), g in scored.group_by(["config", "agg_layer", "keep"], maintain_order=True):
        correct = g[outcome].cast(pl.Float64).to_numpy()
        for stat in statistics:
            x = g[stat].cast(pl.Float64).fill_null(np.nan).to_numpy()
            ok = ~np.isnan(x)
            units = g.filter(pl.Series(ok)).group_by("unit", maintain_order=True).agg(
                pl.col(stat).cast(pl.Float64).mean(), pl.col(outcome).cast(pl.Float64).mean())
            ux, uy = units[stat].to_numpy(), units[outcome].to_numpy()
            rho = p = None
            if ux.size >= 3 and np.ptp(ux) > 0 and np.ptp(uy) > 0:
                res = spearmanr(ux, uy)
                rho, p = float(res.statistic), float(res.pvalue)
            qs = stats.quantile_accuracy(x[ok], correct[ok], QUANTILES)
            per_config.append({"scope": "configuration", "config": config, "agg_layer": layer, "keep": keep,
                               "statistic": stat, "n": int(ok.sum()), "n_units": int(ux.size), "n_strata": None,
                               "spearman_rho": rho, "r_within": None, "p_value": p,
                               **{f"accuracy_q{i + 1}": v for i, v in enumerate(qs)}})
    return per_config


def _pooled(pruned: pl.DataFrame, outcome: str, n_permutations: int, seed: int, statistics=STATISTICS) -> list[dict]:
    """Scope "within_sample" of :func:`relations_table`: per statistic, the within-stratum
    correlation over the pruned configurations and its permutation p."""
    pooled = []
    if pruned.height:
        strata = pruned.select(pl.struct("sample_id", "agg_layer", "keep").rank("dense")).to_series().to_numpy()
        blocks = pruned.select(pl.struct("unit", "agg_layer", "keep").rank("dense")).to_series().to_numpy()
        correct = pruned[outcome].cast(pl.Float64).to_numpy()
        for stat in statistics:
            x = pruned[stat].cast(pl.Float64).fill_null(np.nan).to_numpy()
            res = stats.within_sample_permutation_test(x, correct, strata, n_permutations=n_permutations, seed=seed,
                                                       blocks=blocks, slots=pruned["config"].to_numpy())
            r = None if res["r"] is None or not np.isfinite(res["r"]) else float(res["r"])
            p = None if r is None or res["p_value"] is None or not np.isfinite(res["p_value"]) else float(res["p_value"])
            pooled.append({"scope": "within_sample", "config": "pooled", "agg_layer": None, "keep": None,
                           "statistic": stat, "n": int(res["n"]), "n_units": pruned["unit"].n_unique(),
                           "n_strata": int(res["n_strata"]),
                           "spearman_rho": None, "r_within": r, "p_value": p,
                           **{f"accuracy_q{i + 1}": None for i in range(QUANTILES)}})
    return pooled


ADAPTIVE_FEATURES = ("max_head_share", "head_entropy", "head_gini", "sink_mass")
"""Cached per-sample statistics a choice rule may read (select's heads.parquet)."""


def adaptive_tables(pred: pl.DataFrame, run_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(oracle table, cross-validated choice rule) over the answered configurations, per layer
    and keep (:mod:`fastv_analysis.adaptive`): what choosing the strategy per sample could
    gain, and what a threshold rule on cached head / sink statistics gains on held-out
    questions."""
    from ..adaptive import choice_rule_cv, oracle_table

    candidates = pred.filter(pl.col("method") != FULL)
    features = pl.read_parquet(run_dir / "select" / "heads.parquet")
    columns = [c for c in ADAPTIVE_FEATURES if c in features.columns]
    if candidates["config"].n_unique() < 2:
        return pl.DataFrame(), pl.DataFrame()
    oracle = oracle_table(candidates)
    summary, _ = choice_rule_cv(candidates, features, None, feature_columns=columns)
    return oracle, summary
