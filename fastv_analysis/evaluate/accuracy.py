"""The accuracy table, a pure function of the predictions and timings: accuracy with its 95 %
interval per configuration (Wilson, copies of one item counted as one unit), paired tests
against ``full``, ``avg_all_heads`` and ``random`` (per sample and over units) with Holm / BH
columns, FLOPs and batch-1 timings.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from .. import flops as flops_mod
from .. import stats
from .plan import FULL, REFERENCE, reference_label

CONTROL = "random"
"""The control every strategy must beat: the per-sample random subset at the same keep."""

P_COLUMNS = ("mcnemar_p_vs_full", "mcnemar_p_vs_avg", "mcnemar_p_vs_random",
             "unit_p_vs_full", "unit_p_vs_avg", "unit_p_vs_random")

TIMING_COLUMNS = ("prefill_ms", "prefill_ms_p25", "prefill_ms_p75", "decode_ms_per_token",
                  "prefill_speedup_vs_full", "prefill_speedup_p25", "prefill_speedup_p75")


def _pairs(g: pl.DataFrame, ref: pl.DataFrame, what: str) -> pl.DataFrame:
    """``g``'s rows joined with the reference configuration's ``correct`` (``ref``) on
    sample_id: one pair per sample, or an error naming the reference that repeats one."""
    dup = ref.group_by("sample_id").len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(f"the {what} reference has {dup['len'][0]} rows for sample_id {dup['sample_id'][0]}: "
                         f"a paired test needs exactly one")
    return g.join(ref.select("sample_id", pl.col("correct").alias("ref")), on="sample_id")


def _paired_tests(g: pl.DataFrame, ref: pl.DataFrame | None, what: str) -> tuple[float | None, float | None, pl.DataFrame]:
    """(exact McNemar p, the unit-level test's p, the pairs) of a configuration against a
    reference configuration on the samples both answered; Nones when there is no reference."""
    if ref is None or ref.height == 0:
        return None, None, g.clear()
    pairs = _pairs(g, ref, what)
    if pairs.height == 0:
        return None, None, pairs
    a, b = pairs["correct"].to_numpy(), pairs["ref"].to_numpy()
    return stats.mcnemar_exact(a, b), stats.paired_unit_test(a, b, pairs["unit"].to_numpy()), pairs


def with_adjusted(frame: pl.DataFrame, columns) -> pl.DataFrame:
    """Add ``<col>_holm`` and ``<col>_bh`` next to each p-value column.

    The family of a column is every test in it (all layers, keeps and configurations of
    the table): Holm controls the chance of any false positive among them,
    Benjamini-Hochberg the expected share of false positives among the rejections.
    """
    out = frame
    for c in columns:
        p = out[c].cast(pl.Float64).fill_null(np.nan).to_numpy()
        out = out.with_columns(pl.Series(f"{c}_holm", stats.holm(p)).fill_nan(None),
                               pl.Series(f"{c}_bh", stats.benjamini_hochberg(p)).fill_nan(None))
    return out


def with_units(pred: pl.DataFrame) -> pl.DataFrame:
    """``pred`` with a ``unit`` column: as given, or every sample its own unit."""
    return pred if "unit" in pred.columns else pred.with_columns(pl.col("sample_id").cast(pl.Utf8).alias("unit"))


def _references(layer: pl.DataFrame, row: dict) -> dict[str, pl.DataFrame | None]:
    """The reference configurations of one configuration, by configuration id: ``full`` at
    its layer, and the plain ``avg_all_heads`` and ``random`` configurations at its layer and
    budget (keep, or keep ratio); None where it is that reference itself (or ``full``)."""
    config, ratio = row["config"], row.get("ratio")
    same = layer.filter(pl.col("keep").eq_missing(row["keep"]))
    if "ratio" in layer.columns:
        same = same.filter(pl.col("ratio").eq_missing(ratio))
    avg, rnd = reference_label(REFERENCE, ratio), reference_label(CONTROL, ratio)
    return {"full": None if config == FULL else layer.filter(pl.col("config") == FULL),
            "avg": None if config in (avg, FULL) else same.filter(pl.col("config") == avg),
            "random": None if config in (rnd, FULL) else same.filter(pl.col("config") == rnd)}


def _accuracy_row(g: pl.DataFrame, layer: pl.DataFrame, row: dict) -> dict:
    """Accuracy, its interval and the paired tests of one configuration (``g``: its rows)."""
    correct = g["correct"].to_numpy()
    lo, hi = stats.cluster_wilson_interval(correct, g["unit"].to_numpy())
    out = {"n": len(correct), "n_units": g["unit"].n_unique(), "accuracy": float(correct.mean()),
           "ci_lo": lo, "ci_hi": hi}
    for name, ref in _references(layer, row).items():
        p, p_unit, pairs = _paired_tests(g, ref, name)
        out[f"mcnemar_p_vs_{name}"], out[f"unit_p_vs_{name}"] = p, p_unit
        delta = float(pairs["correct"].mean() - pairs["ref"].mean()) if pairs.height else None
        if name == "full":
            out["full_accuracy"] = float(pairs["ref"].mean()) if pairs.height else None
            out["delta_vs_full"] = delta
        elif name == "random":
            out["delta_vs_random"] = delta
    if row["config"] == FULL:
        out["full_accuracy"], out["delta_vs_full"] = out["accuracy"], 0.0
    return out


def accuracy_table(pred: pl.DataFrame, timing: pl.DataFrame, model_dims: dict,
                   config_timing: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per configuration: accuracy with its 95 % interval (Wilson; copies of one item count
    as one unit, :func:`fastv_analysis.stats.cluster_wilson_interval`), n samples and
    n_units, the change vs the ``full`` control, and paired tests against three reference
    configurations joined by configuration id — ``full`` (same layer), the plain
    ``avg_all_heads`` and ``random`` (same layer and keep) — each from exactly one pair per
    sample: the exact McNemar p (``mcnemar_p_vs_*``: samples as independent) and the exact
    sign-flip test over units (``unit_p_vs_*``: the same p when every unit is one sample),
    with Holm and BH columns over the table; FLOPs and timings."""
    pred = with_units(pred)
    rows = []
    keys = ["agg_layer", "config", "method", "alpha", "keep", *(["ratio"] if "ratio" in pred.columns else [])]
    for key, g in pred.group_by(keys, maintain_order=True):
        row = dict(zip(keys, key))
        g = g.sort("sample_id")
        layer = pred.filter(pl.col("agg_layer") == row["agg_layer"])
        n_tokens = int(g["prompt_tokens"].mean())
        n_image = int(round(float(g["n_image_tokens"].mean())))  # anyres models: N varies by image
        # image tokens the model really kept: the full control all of each sample's, and a
        # --newline-tokens keep selection its newline tokens on top of the budget
        keep = min(int(round(float(g["n_kept"].mean()))) if "n_kept" in g.columns else int(row["keep"]), n_image)
        stages = [(k, kp) for k, kp, _ in json.loads(g["stages"][0])] if "stages" in g.columns else []
        t = timing.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("keep").eq_missing(row["keep"]))
        rows.append({
            **row, **_accuracy_row(g, layer, row),
            **{name: flops_mod.flops_ratio(n_tokens, n_image, keep, model_dims["num_layers"], int(row["agg_layer"]),
                                           model_dims["hidden"], model_dims["intermediate"], stages, matrices)
               for name, matrices in (("flops_ratio", 2), ("flops_ratio_3mlp", 3))},
            "equivalent_image_tokens": flops_mod.equivalent_image_tokens(n_image, keep,
                                                                         model_dims["num_layers"],
                                                                         int(row["agg_layer"]), stages),
            **_config_times(config_timing, row),
            "batched_prefill_ms_per_set": 1e3 * float(t["prefill_seconds"].sum() / max(t["n_sets"].sum(), 1)),
            "batched_decode_ms_per_token": 1e3 * float(t["decode_seconds"].sum() / max(t["decode_tokens"].sum(), 1)),
        })
    first = ["agg_layer", "config", "method", "alpha", "keep", "n", "n_units", "accuracy", "ci_lo", "ci_hi",
             "full_accuracy", "delta_vs_full", "delta_vs_random", *P_COLUMNS]
    table = pl.DataFrame(rows, infer_schema_length=None,
                         schema_overrides={c: pl.Float64 for c in (*P_COLUMNS, "full_accuracy", "delta_vs_full",
                                                                   "delta_vs_random")})
    table = table.select(*first, *[c for c in table.columns if c not in first])
    return with_adjusted(table, P_COLUMNS).sort(["agg_layer", "keep", "method", "alpha"],
                                                descending=[False, True, False, False], nulls_last=True)


def _config_times(config_timing: pl.DataFrame | None, row: dict) -> dict:
    """Median batch-1 prefill ms with its quartiles, median decode ms per token, and the
    prefill speed-up vs ``full``: the median of paired ratios (same sample, same repeat),
    so a slow moment of the machine cancels out of each ratio."""
    empty = {**{c: None for c in TIMING_COLUMNS}, "timing_n": 0}
    if config_timing is None or config_timing.height == 0:
        return empty
    keys = ["sample_id", "repeat"]
    layer = config_timing.filter(pl.col("agg_layer") == row["agg_layer"])
    mine = layer.filter(pl.col("config") == row["config"],
                        pl.col("keep").eq_missing(row["keep"]) | (pl.col("config") == FULL))  # full: keep = each N
    if mine.height == 0:
        return empty
    prefill = 1e3 * mine["prefill_seconds"].to_numpy()
    per_token = 1e3 * mine["decode_seconds"].to_numpy() / np.maximum(mine["decode_tokens"].to_numpy(), 1)
    full = layer.filter(pl.col("config") == FULL).select(*keys, pl.col("prefill_seconds").alias("full_s"))
    ratio = mine.join(full, on=keys).select(pl.col("full_s") / pl.col("prefill_seconds"))["full_s"].to_numpy()
    q = (lambda x, p: float(np.percentile(x, p)) if len(x) else None)
    return {
        "prefill_ms": q(prefill, 50), "prefill_ms_p25": q(prefill, 25), "prefill_ms_p75": q(prefill, 75),
        "decode_ms_per_token": q(per_token[mine["decode_tokens"].to_numpy() > 0], 50),
        "prefill_speedup_vs_full": q(ratio, 50), "prefill_speedup_p25": q(ratio, 25),
        "prefill_speedup_p75": q(ratio, 75), "timing_n": mine.height,
    }
