"""Section 15: every pruned configuration against random at the same layer and keep.
"""

from __future__ import annotations

import polars as pl

from .tables import RunTables, paired_p, sci_text


SIGNIFICANCE = 0.05


def beats_random(accuracy: pl.DataFrame, level: float = SIGNIFICANCE) -> pl.DataFrame | None:
    """Every pruned configuration against ``random`` at the same (agg_layer, keep): accuracy,
    random's, the change (points), the exact McNemar p and its Holm adjustment (over every
    test of that column), and ``holm_<level>``: "better" / "worse" where Holm < ``level``.
    Sorted by layer, keep (largest first) and change (best first). None when eval predates
    the comparison."""
    if accuracy is None:
        return None
    p = paired_p(accuracy, "random")
    need = ("delta_vs_random", p, f"{p}_holm")
    if any(c not in accuracy.columns for c in need):
        return None
    rnd = accuracy.filter(pl.col("config") == "random").select(
        "agg_layer", "keep", (100 * pl.col("accuracy")).alias("random_%"))
    acc = accuracy.filter(~pl.col("method").is_in(["random", "full"]), pl.col("keep") > 0)
    verdict = (pl.when(pl.col(f"{p}_holm") < level)
               .then(pl.when(pl.col("delta_vs_random") > 0).then(pl.lit("better")).otherwise(pl.lit("worse")))
               .otherwise(pl.lit("")).alias(f"holm_{level:g}"))
    return (acc.join(rnd, on=["agg_layer", "keep"], how="left")
            .select("agg_layer", "keep", "config", "n", *(["n_units"] if "n_units" in acc.columns else []),
                    (100 * pl.col("accuracy")).round(1).alias("accuracy_%"), pl.col("random_%").round(1),
                    (100 * pl.col("delta_vs_random")).round(1).alias("delta_vs_random_pts"),
                    pl.col(p).alias("p_vs_random"), pl.col(f"{p}_holm").alias("p_vs_random_holm"), verdict)
            .sort(["agg_layer", "keep", "delta_vs_random_pts", "config"], descending=[False, True, True, False],
                  nulls_last=True))


def beats_random_summary(table: pl.DataFrame | None, level: float = SIGNIFICANCE, max_named: int = 6) -> str:
    """One line: in how many comparisons a configuration differs from random at Holm < ``level``,
    better and worse, naming the first few."""
    if table is None:
        return "No comparison with random: eval has not run, or predates it (re-run eval)."
    col = f"holm_{level:g}"
    tested = table.filter(pl.col("p_vs_random").is_not_null()).height
    units = "n_units" in table.columns and (table["n_units"] < table["n"]).any()
    test = ("exact paired test over units: copies of one item count once" if units else "exact McNemar")
    parts = []
    for kind in ("better", "worse"):
        hits = table.filter(pl.col(col) == kind)
        names = [f"{r['config']} at keep {r['keep']} ({r['delta_vs_random_pts']:+.1f} pts)"
                 for r in hits.head(max_named).iter_rows(named=True)]
        more = f", and {hits.height - max_named} more" if hits.height > max_named else ""
        parts.append(f"{hits.height} {kind}" + (f" ({'; '.join(names)}{more})" if names else ""))
    return (f"Against random at the same keep ({test}, Holm-adjusted over {tested} tests): "
            f"{parts[0]}, {parts[1]} at Holm p < {level:g}; the rest are indistinguishable from random here.")


def beats_random_view(table: pl.DataFrame) -> pl.DataFrame:
    """:func:`beats_random` with its p-values as text in scientific notation, for display."""
    return table.with_columns(sci_text("p_vs_random"), sci_text("p_vs_random_holm"))


def beats_random_missing(t: RunTables) -> str | None:
    """Why there is no comparison with random (None when eval made one)."""
    return None if beats_random(t.accuracy) is not None else beats_random_summary(None)
