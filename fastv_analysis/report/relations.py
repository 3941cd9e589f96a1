"""Section 10 and 2b: selection statistics vs correctness, and object coverage vs accuracy.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .style import base_method, config_colors, method_label, new_figure, ordered_configs


def plot_relations(relations: pl.DataFrame):
    """Left: within-sample correlation of each statistic with correctness, pooled over pruned
    configurations (permutation p, Holm-adjusted). Right: accuracy by quartile of the
    overlap with avg_all_heads, one line per configuration at the smallest keep, one hue per
    method (:func:`config_colors`), the legend beside the panel."""
    fig, axes = new_figure(width=16, height=5.2, ncols=2, gridspec_kw={"width_ratios": [1, 1.05]})
    ax = axes[0, 0]
    pooled = relations.filter(pl.col("scope") == "within_sample", pl.col("r_within").is_not_null())
    if pooled.height:
        names = pooled["statistic"].to_list()
        r = pooled["r_within"].to_numpy()
        ax.barh(range(len(names)), r, color=["#1f77b4" if v >= 0 else "#d62728" for v in r])
        for i, row in enumerate(pooled.iter_rows(named=True)):
            ax.annotate(f"p_holm={row['p_holm']:.1e} (n={row['n']}, {row['n_strata']} strata)", (0, i),
                        xytext=(4 if row["r_within"] < 0 else -4, 0), textcoords="offset points", va="center",
                        ha="left" if row["r_within"] < 0 else "right", fontsize=8)
        ax.set_yticks(range(len(names)), names)
        ax.axvline(0, color="black", linewidth=0.8)
        lim = max(0.05, float(np.abs(r).max()) * 1.1)
        ax.set_xlim(-lim, lim)
    ax.set_xlabel("within-sample correlation with correctness (r)")
    ax.set_ylabel("selection statistic")
    ax.set_title("Pooled, compared within (sample, layer, keep)")
    ax = axes[0, 1]
    per = relations.filter(pl.col("scope") == "configuration", pl.col("statistic") == "jaccard_vs_avg",
                           pl.col("keep") > 0)
    q_cols = [c for c in relations.columns if c.startswith("accuracy_q")]
    if per.height:
        keep = per["keep"].min()
        layer = per["agg_layer"].min()
        rows = {r["config"]: r for r in per.filter(pl.col("keep") == keep, pl.col("agg_layer") == layer,
                                                   pl.col("config") != "avg_all_heads").iter_rows(named=True)}
        colors = config_colors(list(rows))
        for config in ordered_configs(rows):  # one hue per method, shades within; legend outside, in method order
            row = rows[config]
            y = [np.nan if row[c] is None else 100 * row[c] for c in q_cols]
            rho = "" if row["spearman_rho"] is None else f": rho {row['spearman_rho']:+.2f}, p_holm {row['p_holm']:.1e}"
            control = base_method(config) in ("random", "uniform")
            ax.plot(range(1, len(q_cols) + 1), y, marker="o", markersize=4, color=colors[config],
                    linestyle="--" if control or "@" in config else "-", linewidth=1.3,
                    label=f"{method_label(config)}{rho}")
        ax.set_title(f"Accuracy by quartile of Jaccard with avg_all_heads (keep {keep}, K={layer})", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title=f"{len(rows)} configurations "
                  "(one hue per method)", title_fontsize=7)
    ax.set_xticks(range(1, len(q_cols) + 1))
    ax.set_xlabel("quartile of the statistic over samples (1 = lowest)")
    ax.set_ylabel("accuracy of the pruned model (%)")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    return fig


def plot_object_coverage(predictions: pl.DataFrame):
    """Where ground-truth object boxes exist (question files' ``objects``): for each keep,
    the mean share of kept tokens on objects and the share of objects touched by at least
    one kept token, per configuration, next to its accuracy. None without objects."""
    if predictions is None or "objects_touched" not in predictions.columns:
        return None
    pred = predictions.filter(pl.col("method") != "full", pl.col("objects_touched").is_not_nan(),
                              pl.col("keep") > 0)
    if pred.height == 0:
        return None
    layer = pred["agg_layer"].min()
    pred = pred.filter(pl.col("agg_layer") == layer)
    summary = (pred.group_by("keep", "method", "config").agg(
        (100 * pl.col("object_token_share").mean()).alias("on_objects"),
        (100 * pl.col("objects_touched").mean()).alias("touched"),
        (100 * pl.col("correct").cast(pl.Float64).mean()).alias("accuracy")).sort("keep", "config"))
    keeps = sorted(summary["keep"].unique().to_list(), reverse=True)
    configs = ordered_configs(summary["config"].unique().to_list())
    colors = config_colors(configs)
    fig, axes = new_figure(width=6.2 * 2 + 3.2, height=4.8, ncols=2)
    markers = dict(zip(keeps, "osD^v<>"))
    for ax, column, label in ((axes[0, 0], "touched", "objects touched by a kept token (%)"),
                              (axes[0, 1], "on_objects", "kept tokens that lie on an object (%)")):
        # weighted_combination's alphas small and under the rest: its alpha = 1/H and 1 points
        # coincide with avg_all_heads and max_head, which are drawn on top
        for row in summary.sort(pl.col("method") != "weighted_combination").iter_rows(named=True):
            wc = row["method"] == "weighted_combination"
            ax.scatter(row[column], row["accuracy"], color=colors[row["config"]], marker=markers[row["keep"]],
                       s=34 if wc else 60, alpha=0.85 if wc else 0.95, edgecolors="black", linewidths=0.4,
                       zorder=2 if wc else 3)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy of the pruned model (%)")
        ax.set_ylim(0, 105)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=colors[c], markeredgecolor="black",
                      markeredgewidth=0.4, label=method_label(c)) for c in configs]
    handles += [Line2D([], [], marker=markers[k], linestyle="", color="black", markerfacecolor="none",
                       label=f"keep {k}") for k in keeps]
    fig.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
               title=f"{len(configs)} configurations\n(one hue per method)", title_fontsize=8)
    axes[0, 0].set_title(f"Objects touched vs accuracy (K={layer}, one marker per configuration and keep)")
    axes[0, 1].set_title("Kept tokens on objects vs accuracy")
    fig.tight_layout()
    return fig
