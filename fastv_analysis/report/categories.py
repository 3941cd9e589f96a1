"""Section 2: accuracy per question category and configuration.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .configs import shown_configs
from .style import method_label, new_figure


def category_accuracy(predictions: pl.DataFrame, agg_layer: int | None = None,
                      all_configs: bool = False) -> pl.DataFrame | None:
    """Accuracy per question category: one row per (keep, config, category) with ``n``,
    ``correct`` and ``accuracy_%`` (the ``full`` control under its keep N; one configuration
    per method unless ``all_configs``). None when the data has no categories."""
    if predictions is None or "category" not in predictions.columns:
        return None
    layer = agg_layer if agg_layer is not None else predictions["agg_layer"].min()
    p = predictions.filter(pl.col("agg_layer") == layer).with_columns(
        pl.col("category").cast(pl.Utf8).fill_null("").str.strip_chars())
    if p.filter(pl.col("category") != "").height == 0:
        return None
    p = p.with_columns(pl.when(pl.col("category") == "").then(pl.lit("(none)")).otherwise(pl.col("category"))
                       .alias("category"))
    configs = p["config"].unique().to_list() if all_configs else ["full"] + shown_configs(p)
    order = {c: i for i, c in enumerate(configs)}
    out = (p.filter(pl.col("config").is_in(configs))
           .group_by("keep", "config", "category")
           .agg(pl.len().alias("n"), pl.col("correct").cast(pl.Int64).sum().alias("correct"))
           .with_columns((100 * pl.col("correct") / pl.col("n")).round(1).alias("accuracy_%"),
                         pl.col("config").replace_strict(order, return_dtype=pl.Int64).alias("_order"))
           .sort(["keep", "_order", "category"], descending=[True, False, False]).drop("_order"))
    return out.with_columns(pl.lit(layer).alias("agg_layer")).select("agg_layer", *[c for c in out.columns])


def category_table(predictions: pl.DataFrame, agg_layer: int | None = None) -> pl.DataFrame | None:
    """:func:`category_accuracy` as a wide table: one row per (keep, config), one column per
    category ("<category> % (n=...)"), plus the overall accuracy."""
    long = category_accuracy(predictions, agg_layer)
    if long is None:
        return None
    n = long.filter(pl.col("config") == "full").group_by("category").agg(pl.col("n").first())
    names = {c: f"{c} % (n={k})" for c, k in n.iter_rows()}
    long = long.with_columns(pl.col("category").replace_strict(names, default=pl.col("category")))
    wide = long.pivot(on="category", index=["keep", "config"], values="accuracy_%", sort_columns=True)
    overall = long.group_by("keep", "config").agg(
        (100 * pl.col("correct").sum() / pl.col("n").sum()).round(1).alias("all %"))
    return wide.join(overall, on=["keep", "config"], maintain_order="left")


def plot_category_accuracy(predictions: pl.DataFrame, agg_layer: int | None = None):
    """Accuracy (%) per question category for every configuration, one panel per keep: rows are
    the configurations (the ``full`` control first), columns the categories with their n;
    None when the questions have no categories."""
    import seaborn as sns

    long = category_accuracy(predictions, agg_layer)
    if long is None:
        return None
    layer = long["agg_layer"][0]
    full_keep = long.filter(pl.col("config") == "full")["keep"].max()
    keeps = sorted((k for k in long.filter(pl.col("config") != "full")["keep"].unique().to_list()), reverse=True)
    if not keeps:
        keeps = [full_keep]
    cats = sorted(long["category"].unique().to_list())
    n_cat = dict(long.filter(pl.col("config") == "full").group_by("category").agg(pl.col("n").first()).iter_rows())
    configs = list(dict.fromkeys(long["config"].to_list()))
    fig, axes = new_figure(width=max(4.2, 1.05 * len(cats) + 3.0) * len(keeps), height=0.42 * len(configs) + 2.2,
                        ncols=len(keeps))
    for ax, keep in zip(axes[0], keeps):
        d = long.filter((pl.col("keep") == keep) | (pl.col("config") == "full"))
        rows = [c for c in configs if d.filter(pl.col("config") == c).height]
        m = np.full((len(rows), len(cats)), np.nan)
        for cfg, cat, acc in d.select("config", "category", "accuracy_%").iter_rows():
            m[rows.index(cfg), cats.index(cat)] = acc
        ylabels = [f"full (all {full_keep}, reference)" if c == "full" else method_label(c) for c in rows]
        xlabels = [f"{c}\n(n={n_cat.get(c, int(d.filter(pl.col('category') == c)['n'].max()))})" for c in cats]
        sns.heatmap(m, ax=ax, vmin=0, vmax=100, cmap="RdYlGn", annot=True, fmt=".0f", xticklabels=xlabels,
                    yticklabels=ylabels, cbar_kws={"label": "accuracy (%)"}, annot_kws={"size": 9},
                    linewidths=0.5, linecolor="white")
        ax.axhline(1, color="black", linewidth=1.5)  # the full control above the line
        ax.set_title(f"keep {keep}" if keep != full_keep else "full control", fontsize=10)
        ax.set_xlabel("question category (n questions)")
        ax.set_ylabel("configuration")
        ax.tick_params(axis="x", labelrotation=0, labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"Accuracy per question category and configuration (agg layer K={layer})")
    fig.tight_layout()
    return fig
