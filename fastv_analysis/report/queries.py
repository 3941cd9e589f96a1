"""Section 13: FastV's last prompt token vs the text_mean / all_mean query rows.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .overlap import chance_jaccard
from .style import PALETTE, new_figure
from .tables import RunTables


QUERY_VARIANTS = ("text_mean", "all_mean")

"""The query rows compared with FastV's last prompt token (strategies.QUERIES less ``last``)."""

QUERY_COLORS = {"last": PALETTE["avg_all_heads"], "text_mean": "#ff7f0e", "all_mean": "#2ca02c"}


def query_agreement(overlap_summary: pl.DataFrame, accuracy: pl.DataFrame | None = None,
                    base: str = "avg_all_heads", n_tokens: int | None = None) -> pl.DataFrame | None:
    """How much the ranking's query matters: per (agg_layer, keep, query), the mean Jaccard (95%
    interval) between ``base``'s kept set on the last token's rows and on the ``text_mean`` /
    ``all_mean`` query rows, chance Jaccard (needs ``n_tokens``), the Spearman correlation of
    the two rankings over all tokens, and where eval answered them the accuracy (%) of each
    variant and of ``base``. None when select compared no query variant."""
    out = []
    for query in QUERY_VARIANTS:
        other = f"{base}@{query}"
        pair = (((pl.col("config_a") == base) & (pl.col("config_b") == other))
                | ((pl.col("config_a") == other) & (pl.col("config_b") == base)))
        d = overlap_summary.filter(pair, pl.col("keep") > 0)
        out += [{"agg_layer": r["agg_layer"], "keep": r["keep"], "query": query, "n": int(r["n"]),
                 "jaccard": r["jaccard_mean"], "jaccard_lo": r["jaccard_lo"], "jaccard_hi": r["jaccard_hi"],
                 "chance": chance_jaccard(n_tokens, r["keep"]) if n_tokens else None,
                 "spearman": r.get("spearman_mean")} for r in d.iter_rows(named=True)]
    if not out:
        return None
    frame = pl.DataFrame(out, schema_overrides={"chance": pl.Float64, "spearman": pl.Float64})
    variant_acc = base_acc = pl.lit(None, dtype=pl.Float64)
    if accuracy is not None:
        acc = {(r["agg_layer"], r["keep"], r["config"]): 100 * r["accuracy"]
               for r in accuracy.select("agg_layer", "keep", "config", "accuracy").iter_rows(named=True)}
        frame = frame.with_columns(
            pl.struct("agg_layer", "keep", "query").map_elements(
                lambda r: acc.get((r["agg_layer"], r["keep"], f"{base}@{r['query']}")), return_dtype=pl.Float64)
            .alias("accuracy_%"),
            pl.struct("agg_layer", "keep").map_elements(
                lambda r: acc.get((r["agg_layer"], r["keep"], base)), return_dtype=pl.Float64).alias("last_accuracy_%"))
    else:
        frame = frame.with_columns(variant_acc.alias("accuracy_%"), base_acc.alias("last_accuracy_%"))
    return frame.sort(["agg_layer", "keep", "query"], descending=[False, True, True])


def query_table(agreement: pl.DataFrame) -> pl.DataFrame:
    """:func:`query_agreement` rounded for reading (Jaccard with its interval, accuracies, change)."""
    return agreement.select(
        "agg_layer", "keep", pl.format("{} vs last", pl.col("query")).alias("query"), "n",
        pl.col("jaccard").round(3),
        pl.format("[{}, {}]", pl.col("jaccard_lo").round(3), pl.col("jaccard_hi").round(3)).alias("jaccard_95%"),
        pl.col("chance").round(3).alias("chance_jaccard"), pl.col("spearman").round(3).alias("spearman_all_tokens"),
        pl.col("last_accuracy_%").round(1), pl.col("accuracy_%").round(1).alias("query_accuracy_%"),
        (pl.col("accuracy_%") - pl.col("last_accuracy_%")).round(1).alias("change_pts"))


def plot_query_choice(agreement: pl.DataFrame | None, base: str = "avg_all_heads"):
    """Left: Jaccard between ``base`` on the last token's rows and on each other query's rows
    per keep (95% intervals), chance dotted. Right: accuracy of each query per keep where eval
    answered them. None without query variants."""
    if agreement is None or agreement.height == 0:
        return None
    layer = agreement["agg_layer"].min()
    a = agreement.filter(pl.col("agg_layer") == layer)
    keeps = sorted(a["keep"].unique().to_list())
    fig, axes = new_figure(width=13, height=4.8, ncols=2)
    ax = axes[0, 0]
    for query in QUERY_VARIANTS:
        d = a.filter(pl.col("query") == query).sort("keep")
        if d.height:
            y = d["jaccard"].to_numpy()
            err = np.vstack([y - d["jaccard_lo"].to_numpy(), d["jaccard_hi"].to_numpy() - y])
            ax.errorbar(d["keep"], y, yerr=np.clip(err, 0, None), marker="o", capsize=3, color=QUERY_COLORS[query],
                        label=f"last vs {query}")
    chance = a.group_by("keep").agg(pl.col("chance").first()).sort("keep")
    if chance["chance"].null_count() == 0:
        ax.plot(chance["keep"], chance["chance"], color="black", linestyle=":", label="chance (two random subsets)")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mean Jaccard of the kept sets")
    ax.set_title(f"Agreement of {base}'s kept sets across query rows", fontsize=10)
    ax = axes[0, 1]
    drawn = False
    for query, column in (("last", "last_accuracy_%"), *((q, "accuracy_%") for q in QUERY_VARIANTS)):
        d = a.filter(pl.col("query") == (QUERY_VARIANTS[0] if query == "last" else query)).sort("keep")
        d = d.filter(pl.col(column).is_not_null())
        if d.height:
            drawn = True
            ax.plot(d["keep"], d[column], marker="o", color=QUERY_COLORS[query],
                    label=f"{base} on {'the last token' if query == 'last' else query} rows")
    if not drawn:
        ax.text(0.5, 0.5, "eval answered no query variant\n(eval --configs avg_all_heads@text_mean,...)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by query rows", fontsize=10)
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(keeps, [str(k) for k in keeps])
        ax.minorticks_off()
        ax.set_xlabel("image tokens kept after layer K (count, log scale)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Query choice at K={layer}: FastV's last prompt token vs text_mean (the instruction's text "
                 f"tokens) and all_mean (all query tokens)")
    fig.tight_layout()
    return fig


def query_choice_missing(t: RunTables) -> str | None:
    """Why the query-choice section has no figure (None when select compared query variants)."""
    if t.overlap_summary is None or query_agreement(t.overlap_summary) is None:
        return ("No query-choice section: select compared no query variant (capture with --store "
                "attention_text_mean,attention_all_mean, then select --queries last,text_mean,all_mean).")
    return None
