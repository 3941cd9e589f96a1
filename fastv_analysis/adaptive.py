"""Adaptive choice of a pruning strategy per sample (issue 15, point 4).

Three questions, each a pure function on the eval tables (no I/O):

* :func:`which_correct`: per sample, which candidate strategies answered correctly.
* :func:`oracle_table`: the upper bound of choosing per sample ("oracle": a sample counts
  if ANY candidate is right) next to the best single strategy. The gap is the most any
  selector could gain; a small gap means adaptivity is not worth studying further.
* :func:`choice_rule_cv`: a rule a paper can state ("if max_head_share <= 0.41 use
  max_head, else avg_all_heads") that chooses from cached per-sample statistics only,
  scored by K-fold cross-validation so no sample's choice comes from a rule fitted on it.

Inputs are what eval writes: ``predictions`` has one row per (sample_id, agg_layer,
config, keep) with a boolean ``correct``; ``features`` one row per (sample_id, agg_layer)
with numeric statistics (NaN / null = unknown for that sample). Everything is computed per
(agg_layer, keep) on the samples every candidate answered (an inner join), and the tables
say how many (``n``). The unpruned ``full`` control is never a candidate: it keeps every
token, so "choosing" it is not pruning.

Candidates are kept in Python's string order, and every tie between strategies goes to
the first of them in that order, so the tables do not depend on row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

from . import stats

FULL = "full"
"""The unpruned control's config label (the same as ``evaluate.FULL``; not imported so this
module stays free of the model-side imports)."""
KEYS = ("sample_id", "agg_layer")


# ----------------------------------------------------------------------------------------
# Per-(layer, keep) correctness matrices
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    agg_layer: int
    keep: int | None  # None: a --keep-ratio's configurations
    sample_ids: np.ndarray  # [S] sorted
    configs: list[str]  # [C] sorted
    correct: np.ndarray  # [S, C] bool
    units: np.ndarray  # [S] the unit of each sample (copies of one item share it)
    ratio: float | None = None  # a --keep-ratio's budget (keep is None then)


def _check_candidates(candidates: Sequence[str] | None) -> list[str] | None:
    if candidates is None:
        return None
    out = sorted(set(candidates))
    if FULL in out:
        raise ValueError(f"{FULL!r} is the unpruned control, never a candidate strategy")
    if not out:
        raise ValueError("candidates is empty")
    return out


def _groups(predictions: pl.DataFrame, candidates: Sequence[str] | None) -> list[_Group]:
    """One correctness matrix per (agg_layer, keep), sorted by layer then keep.

    Default candidates: every config at that (layer, keep) except ``full``. Only samples
    with a row for every candidate count (inner join); a (layer, keep) where no sample
    has all of them (e.g. ``full``'s own keep = N, or an explicit candidate never run
    there) is left out.
    """
    cands = _check_candidates(candidates)
    unit = pl.col("unit").cast(pl.Utf8) if "unit" in predictions.columns else pl.col("sample_id").cast(pl.Utf8)
    units = predictions.select("sample_id", unit.alias("unit")).unique("sample_id")
    ratio = pl.col("ratio") if "ratio" in predictions.columns else pl.lit(None, dtype=pl.Float64).alias("ratio")
    pred = predictions.select("sample_id", "agg_layer", "keep", ratio, "config", pl.col("correct").cast(pl.Boolean))
    pred = pred.filter(pl.col("config") != FULL)
    if cands is not None:
        pred = pred.filter(pl.col("config").is_in(cands))
    dup = pred.group_by("sample_id", "agg_layer", "keep", "config").len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(f"predictions has {dup.height} repeated (sample_id, agg_layer, keep, config) rows, "
                         f"e.g. {dup.row(0, named=True)}")
    out = []
    # keep null: a --keep-ratio's configurations (each sample its own count), one group per layer
    for (layer, keep, ratio), g in sorted(pred.group_by("agg_layer", "keep", "ratio"),
                                          key=lambda item: (item[0][0], item[0][1] is None, item[0][1] or 0,
                                                            item[0][2] or 0.0)):
        configs = cands if cands is not None else sorted(g["config"].unique().to_list())
        wide = g.pivot(on="config", index="sample_id", values="correct")
        if any(c not in wide.columns for c in configs):
            continue
        wide = wide.drop_nulls(configs).sort("sample_id").join(units, on="sample_id", how="left",
                                                               maintain_order="left")
        if wide.height == 0:
            continue
        out.append(_Group(int(layer), None if keep is None else int(keep), wide["sample_id"].to_numpy(),
                          list(configs), wide.select(configs).to_numpy().astype(bool), wide["unit"].to_numpy(),
                          None if ratio is None else float(ratio)))
    return out


def _best(counts: np.ndarray) -> int:
    """Index of the highest count; ties go to the lowest index (candidates are sorted)."""
    return int(np.argmax(counts))


# ----------------------------------------------------------------------------------------
# Who was right, and the oracle bound
# ----------------------------------------------------------------------------------------


def which_correct(predictions: pl.DataFrame, candidates: Sequence[str] | None = None) -> pl.DataFrame:
    """Per (sample_id, agg_layer, keep): the candidates that answered correctly.

    Columns: sample_id, agg_layer, keep, correct_configs (list, sorted), n_correct.
    Why: the raw material of any adaptive choice; a sample no candidate gets right cannot
    be rescued by choosing, one every candidate gets right needs no choice.
    """
    rows = []
    for g in _groups(predictions, candidates):
        names = np.array(g.configs, dtype=object)
        for sid, row in zip(g.sample_ids, g.correct):
            rows.append({"sample_id": sid.item(), "agg_layer": g.agg_layer, "keep": g.keep,
                         "correct_configs": names[row].tolist(), "n_correct": int(row.sum())})
    schema = {"sample_id": predictions.schema["sample_id"], "agg_layer": pl.Int64, "keep": pl.Int64,
              "correct_configs": pl.List(pl.Utf8), "n_correct": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def oracle_table(predictions: pl.DataFrame, candidates: Sequence[str] | None = None) -> pl.DataFrame:
    """Per (agg_layer, keep): best single strategy vs the per-sample oracle.

    Columns: agg_layer, keep, n (samples answered by every candidate), n_candidates,
    best_single (highest accuracy, ties to the first in string order), best_single_accuracy,
    oracle_accuracy (share of samples where any candidate is correct), oracle_ci_lo /
    oracle_ci_hi (95 %, Wilson with copies of one item counted as one unit), oracle_gain (oracle - best single), then one
    ``accuracy[<config>]`` column per candidate (null where that config is not a candidate
    at this layer and keep). The oracle is an upper bound, not an achievable accuracy: it
    peeks at the answers.
    """
    rows = []
    for g in _groups(predictions, candidates):
        n = g.correct.shape[0]
        counts = g.correct.sum(axis=0)
        best = _best(counts)
        any_right = int(g.correct.any(axis=1).sum())
        lo, hi = stats.cluster_wilson_interval(g.correct.any(axis=1), g.units)
        row = {"agg_layer": g.agg_layer, "keep": g.keep, "ratio": g.ratio, "n": n, "n_units": int(np.unique(g.units).size),
               "n_candidates": len(g.configs),
               "best_single": g.configs[best], "best_single_accuracy": counts[best] / n,
               "oracle_accuracy": any_right / n, "oracle_ci_lo": lo, "oracle_ci_hi": hi,
               "oracle_gain": (any_right - counts[best]) / n}
        row.update({f"accuracy[{c}]": counts[i] / n for i, c in enumerate(g.configs)})
        rows.append(pl.DataFrame([row]))
    if not rows:
        return pl.DataFrame(schema={"agg_layer": pl.Int64, "keep": pl.Int64, "ratio": pl.Float64, "n": pl.Int64,
                                    "n_units": pl.Int64,
                                    "n_candidates": pl.Int64, "best_single": pl.Utf8,
                                    "best_single_accuracy": pl.Float64, "oracle_accuracy": pl.Float64,
                                    "oracle_ci_lo": pl.Float64, "oracle_ci_hi": pl.Float64,
                                    "oracle_gain": pl.Float64})
    out = pl.concat(rows, how="diagonal_relaxed")
    acc = sorted(c for c in out.columns if c.startswith("accuracy["))
    return out.select([c for c in out.columns if c not in acc] + acc)


# ----------------------------------------------------------------------------------------
# Threshold rules chosen by cross-validation
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdRule:
    """``feature <= threshold ? le : gt``, or the constant rule ``always le`` (feature None).

    ``fallback`` is what a sample whose feature is unknown (NaN / null / missing) gets:
    the best single strategy of the data the rule was fitted on. ``train_correct`` counts
    the training samples the rule (with that fallback) answers correctly.
    """

    le: str
    fallback: str
    train_correct: int
    feature: str | None = None
    threshold: float | None = None
    gt: str | None = None

    @property
    def text(self) -> str:
        if self.feature is None:
            return f"always {self.le}"
        return f"{self.feature} <= {self.threshold:.4g} ? {self.le} : {self.gt}"

    def choose(self, x: np.ndarray, features: Sequence[str]) -> np.ndarray:
        """Chosen config per row of ``x`` ``[S, F]`` (columns named by ``features``)."""
        out = np.full(x.shape[0], self.le, dtype=object)
        if self.feature is None:
            return out
        v = x[:, list(features).index(self.feature)]
        out[v > self.threshold] = self.gt
        out[np.isnan(v)] = self.fallback
        return out


def fit_threshold_rule(x: np.ndarray, correct: np.ndarray, features: Sequence[str],
                       configs: Sequence[str]) -> ThresholdRule:
    """The rule with the most training samples correct, over every feature, every threshold
    at a midpoint between consecutive distinct training values, and every ordered pair of
    distinct configs, plus the constant rules.

    x: ``[S, F]`` float, NaN = unknown (such a sample gets the fallback, the best single,
    while scoring that feature's rules too, exactly as it would when applied). correct:
    ``[S, C]`` bool, configs in string order.

    Ties, in this order, so the result is unique and favours the simplest statement:
    1. the constant rule (the best single, itself tie-broken to the first config) beats
       any threshold rule with as many correct: a split must earn its keep;
    2. then the first feature in string order;
    3. then the smallest threshold;
    4. then the first ``le`` config, then the first ``gt`` config, in string order.
    """
    configs = list(configs)
    counts = correct.sum(axis=0)
    best = _best(counts)
    rule = ThresholdRule(le=configs[best], fallback=configs[best], train_correct=int(counts[best]))
    y = correct.astype(np.int64)
    for fi in sorted(range(len(features)), key=lambda i: features[i]):
        v = x[:, fi]
        ok = ~np.isnan(v)
        order = np.argsort(v[ok], kind="stable")
        vs, ys = v[ok][order], y[ok][order]
        if vs.size < 2 or vs[0] == vs[-1]:
            continue
        last = np.flatnonzero(vs[1:] != vs[:-1])  # last position of each distinct value but the top one
        left = np.cumsum(ys, axis=0)[last]  # [T, C] correct counts for v <= threshold
        right = ys.sum(axis=0) - left
        score = left.max(axis=1) + right.max(axis=1) + int(y[~ok, best].sum())
        j = int(np.argmax(score))  # first = smallest threshold
        # A split whose two sides pick the same config is that constant rule: never > best constant.
        if score[j] <= rule.train_correct:
            continue
        lo, hi = vs[last[j]], vs[last[j] + 1]
        rule = ThresholdRule(le=configs[_best(left[j])], gt=configs[_best(right[j])], fallback=configs[best],
                             train_correct=int(score[j]), feature=features[fi], threshold=float(lo + (hi - lo) / 2))
    return rule


def assign_folds(sample_ids, n_folds: int, seed: int) -> np.ndarray:
    """Fold (0 .. k-1) of each given id, k = min(n_folds, number of distinct ids). Pass
    units (not sample ids) where samples repeat one item, so copies share a fold.

    The distinct ids are sorted, permuted by ``numpy.random.default_rng(seed)``, and the
    i-th of that permutation goes to fold i mod k, so folds depend on the seed and the set
    of ids only (never on row order) and their sizes differ by at most one.
    """
    if n_folds < 2:
        raise ValueError("n_folds must be at least 2")
    ids = np.asarray(sample_ids)
    uniq, inverse = np.unique(ids, return_inverse=True)
    k = min(n_folds, uniq.size)
    fold_sorted = np.empty(uniq.size, dtype=np.int64)
    fold_sorted[np.random.default_rng(seed).permutation(uniq.size)] = np.arange(uniq.size) % max(k, 1)
    return fold_sorted[inverse.ravel()]


def _feature_matrix(features: pl.DataFrame, feature_columns: Sequence[str] | None) -> tuple[pl.DataFrame, list[str]]:
    if feature_columns is None:
        feature_columns = [c for c, t in features.schema.items() if c not in KEYS and t.is_numeric()]
    else:
        feature_columns = list(feature_columns)
    if not feature_columns:
        raise ValueError("features has no numeric feature columns besides sample_id and agg_layer")
    dup = features.group_by(*KEYS).len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(f"features has {dup.height} repeated (sample_id, agg_layer) rows")
    cols = [pl.col(c).cast(pl.Float64) for c in feature_columns]
    feat = features.select(*KEYS, *cols).with_columns(
        [pl.when(pl.col(c).is_finite()).then(pl.col(c)).otherwise(None).alias(c) for c in feature_columns])
    return feat, feature_columns


SUMMARY_SCHEMA = {
    "agg_layer": pl.Int64, "keep": pl.Int64, "ratio": pl.Float64, "n": pl.Int64, "n_units": pl.Int64,
    "n_folds": pl.Int64,
    "cv_accuracy": pl.Float64, "cv_ci_lo": pl.Float64, "cv_ci_hi": pl.Float64,
    "best_single_cv_accuracy": pl.Float64, "best_single": pl.Utf8, "best_single_accuracy": pl.Float64,
    "oracle_accuracy": pl.Float64, "n_rule_only": pl.Int64, "n_best_single_only": pl.Int64,
    "p_mcnemar": pl.Float64, "p_permutation": pl.Float64, "p_holm": pl.Float64,
    "rule": pl.Utf8, "rule_feature": pl.Utf8, "rule_threshold": pl.Float64, "rule_le": pl.Utf8,
    "rule_gt": pl.Utf8, "rule_train_accuracy": pl.Float64,
}


def choice_rule_cv(predictions: pl.DataFrame, features: pl.DataFrame, candidates: Sequence[str] | None,
                   n_folds: int = 5, seed: int = 0, *,
                   feature_columns: Sequence[str] | None = None, n_permutations: int = 199) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cross-validated threshold rule choosing a strategy per sample from cached statistics.

    Per (agg_layer, keep), on the samples every candidate answered: folds from
    :func:`assign_folds` over the samples' units (a ``unit`` column of ``predictions``:
    copies of one item, e.g. MMBench's rotations or MME's two questions per image, share
    a fold, so no rule is scored on a copy of what it was fitted on; without the column
    every sample is its own unit); for each fold a rule is fitted by
    :func:`fit_threshold_rule` on the other folds and applied to it, so every sample's
    choice comes from a rule that never saw it. The per-fold best single strategy (the
    constant rule, fitted on the same training folds) is the honest baseline: an exact
    paired test compares the two on the same held-out samples (McNemar's when every unit
    is one sample; with copies the sign-flip test over units,
    :func:`fastv_analysis.stats.paired_unit_test`, which reduces to it). A sample whose feature is
    unknown (NaN, null, infinite, or no row in ``features``) gets its fold's best single.

    candidates: None = every config but ``full``; ``full`` in the list is an error.
    feature_columns: None = every numeric column of ``features`` but the keys (pass a list
    to leave out e.g. ``max_head``, a head index, not a quantity).

    Returns (summary, per_sample).
    summary, one row per (agg_layer, keep): n, n_units, n_folds, cv_accuracy with its
    95 % cluster-aware Wilson cv_ci_lo / cv_ci_hi, best_single_cv_accuracy (best single chosen inside each training
    fold, scored on its held-out fold), best_single and best_single_accuracy (chosen and
    scored on ALL data: optimistic, for reference), oracle_accuracy (upper bound),
    n_rule_only / n_best_single_only (discordant pairs), p_mcnemar (the exact paired test,
    rule vs per-fold best single: descriptive, since cross-validated choices share training
    data and are not independent, which makes it anti-conservative even without copies),
    p_permutation (one-sided: does the rule gain more over the per-fold best single than
    it does when the statistics are shuffled across units, re-running the whole
    cross-validation each time: valid whatever the folds share), p_holm (Holm of
    p_permutation over all rows), and the rule fitted on all data: rule (text),
    rule_feature, rule_threshold, rule_le, rule_gt (null for a constant rule),
    rule_train_accuracy (in-sample, optimistic).
    per_sample: sample_id, agg_layer, keep, fold, chosen, correct, fold_best_single,
    fold_best_single_correct.
    """
    feat, names = _feature_matrix(features, feature_columns)
    summary, per_sample = [], []
    for g in _groups(predictions, candidates):
        n = g.sample_ids.size
        if n < 2:
            continue
        ids = pl.DataFrame({"sample_id": g.sample_ids}).cast({"sample_id": feat.schema["sample_id"]})
        x = ids.join(feat.filter(pl.col("agg_layer") == g.agg_layer).drop("agg_layer"), on="sample_id",
                     how="left", maintain_order="left").select(names).fill_null(np.nan).to_numpy().astype(np.float64)
        folds = assign_folds(stats.unit_codes(g.units), n_folds, seed)
        k = int(folds.max()) + 1
        chosen, single = _cross_validate(x, g, folds, names)
        ok, ok_single = _outcomes(g, chosen), _outcomes(g, single)
        summary.append({**_summary_row(x, g, names, ok, ok_single), "n_folds": k,
                        "p_permutation": _permutation_p(x, g, folds, names, int(ok.sum() - ok_single.sum()),
                                                        n_permutations, seed)})
        per_sample.append(pl.DataFrame({
            "sample_id": g.sample_ids, "agg_layer": np.full(n, g.agg_layer, dtype=np.int64),
            "keep": pl.Series([g.keep] * n, dtype=pl.Int64), "fold": folds, "chosen": chosen.astype(str),
            "correct": ok, "fold_best_single": single.astype(str), "fold_best_single_correct": ok_single,
        }))
    out = pl.DataFrame(summary, schema=SUMMARY_SCHEMA)
    out = out.with_columns(pl.Series("p_holm", stats.holm(out["p_permutation"].to_numpy()), dtype=pl.Float64))
    per = pl.concat(per_sample) if per_sample else pl.DataFrame(schema={
        "sample_id": predictions.schema["sample_id"], "agg_layer": pl.Int64, "keep": pl.Int64, "fold": pl.Int64,
        "chosen": pl.Utf8, "correct": pl.Boolean, "fold_best_single": pl.Utf8, "fold_best_single_correct": pl.Boolean})
    return out, per


def _summary_row(x: np.ndarray, g: _Group, names: Sequence[str], ok: np.ndarray, ok_single: np.ndarray) -> dict:
    """One (layer, keep)'s summary: held-out accuracy of the rule and of the per-fold best
    single, the all-data best single and oracle, the paired test, and the rule fitted on all."""
    n = g.sample_ids.size
    counts = g.correct.sum(axis=0)
    best = _best(counts)
    full_rule = fit_threshold_rule(x, g.correct, names, g.configs)
    lo, hi = stats.cluster_wilson_interval(ok, g.units)
    return {
        "agg_layer": g.agg_layer, "keep": g.keep, "ratio": g.ratio, "n": n, "n_units": int(np.unique(g.units).size),
        "cv_accuracy": float(ok.mean()), "cv_ci_lo": lo, "cv_ci_hi": hi,
        "best_single_cv_accuracy": float(ok_single.mean()),
        "best_single": g.configs[best], "best_single_accuracy": float(counts[best] / n),
        "oracle_accuracy": float(g.correct.any(axis=1).mean()),
        "n_rule_only": int(np.sum(ok & ~ok_single)), "n_best_single_only": int(np.sum(~ok & ok_single)),
        "p_mcnemar": stats.paired_unit_test(ok, ok_single, g.units), "p_holm": None,
        "rule": full_rule.text, "rule_feature": full_rule.feature, "rule_threshold": full_rule.threshold,
        "rule_le": full_rule.le, "rule_gt": full_rule.gt, "rule_train_accuracy": full_rule.train_correct / n,
    }


def _cross_validate(x: np.ndarray, g: _Group, folds: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(chosen config, the training folds' best single) per sample, each from a rule fitted
    without the sample's fold."""
    chosen = np.empty(x.shape[0], dtype=object)
    single = np.empty(x.shape[0], dtype=object)
    for f in range(int(folds.max()) + 1):
        test, train = folds == f, folds != f
        rule = fit_threshold_rule(x[train], g.correct[train], names, g.configs)
        chosen[test] = rule.choose(x[test], names)
        single[test] = rule.fallback
    return chosen, single


def _outcomes(g: _Group, chosen: np.ndarray) -> np.ndarray:
    col = {c: i for i, c in enumerate(g.configs)}
    return g.correct[np.arange(chosen.size), [col[c] for c in chosen]]


def unit_blocks(units: np.ndarray) -> list[np.ndarray]:
    """Rows of each unit, grouped by how many rows a unit has: one ``[units, size]`` array per
    size (sizes ascending, units in order of first appearance, rows ascending) — computed
    once, then every :func:`unit_permutation` is a gather."""
    codes = stats.unit_codes(units)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    rows = np.split(order, np.cumsum(sizes)[:-1])
    return [np.stack([rows[u] for u in np.flatnonzero(sizes == size)]) for size in np.unique(sizes)]


def unit_permutation(blocks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Row order that gives each unit the rows of another unit with as many rows (units
    permuted within each size class of :func:`unit_blocks`, rows kept in their order):
    shuffles statistics between items while copies of one item stay together."""
    order = np.empty(sum(b.size for b in blocks), dtype=np.int64)
    for block in blocks:
        order[block] = block[rng.permutation(len(block))]
    return order


def _permutation_p(x: np.ndarray, g: _Group, folds: np.ndarray, names: Sequence[str], gain: int,
                   n_permutations: int, seed: int) -> float:
    """One-sided p of the rule's held-out gain over the per-fold best single: the share of
    unit-level shuffles of the statistics (whole cross-validation re-run) that gain as much."""
    rng = np.random.default_rng([seed, g.agg_layer, 0 if g.keep is None else g.keep + 1,
                                 int(round(1e6 * (g.ratio or 0.0)))])
    hits, blocks = 0, unit_blocks(g.units)
    for _ in range(n_permutations):
        chosen, single = _cross_validate(x[unit_permutation(blocks, rng)], g, folds, names)
        hits += int(_outcomes(g, chosen).sum() - _outcomes(g, single).sum()) >= gain
    return (1 + hits) / (1 + n_permutations)
