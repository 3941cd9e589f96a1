"""Sections 1, 3, 4 and the main numbers: accuracy vs keep, vs alpha and vs cost (FLOPs,
measured speed-up), the headline table and the full-control note.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..strategies import METHODS as METHOD_ORDER
from .configs import PLAIN, primary_alpha, primary_only
from .style import PALETTE, new_figure
from .tables import paired_p, sci_text


def plot_accuracy_vs_keep(accuracy: pl.DataFrame, agg_layer: int | None = None):
    """Accuracy vs kept image tokens, one line per method, 95% intervals, full model as reference."""
    layer = agg_layer if agg_layer is not None else accuracy["agg_layer"].min()
    acc = accuracy.filter(pl.col("agg_layer") == layer)
    alpha = primary_alpha(acc)
    acc = acc.filter(primary_only(alpha))
    fig, axes = new_figure()
    ax = axes[0, 0]
    for method in [m for m in METHOD_ORDER if m in acc["method"].unique().to_list()]:
        d = acc.filter(pl.col("method") == method).sort("keep")
        label = method if method != "weighted_combination" else f"weighted_combination (alpha={alpha:g})"
        x, y = d["keep"].to_numpy(), 100 * d["accuracy"].to_numpy()
        err = np.vstack([y - 100 * d["ci_lo"].to_numpy(), 100 * d["ci_hi"].to_numpy() - y])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, color=PALETTE[method])
    full = 100 * float(acc.filter(pl.col("method") == "full")["accuracy"][0])
    ax.axhline(full, color="black", linestyle="--", label=f"full control, nothing pruned ({full:.1f}%)")
    ax.set_xscale("log", base=2)
    keeps = sorted(k for k in acc.filter(pl.col("method") != "full")["keep"].unique().to_list() if k > 0)
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.minorticks_off()
    ax.set_xlabel("image tokens kept after layer K (count, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Accuracy vs keep at agg layer K={layer} (n={int(acc['n'][0])}, 95% Wilson intervals)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_accuracy_vs_alpha(accuracy: pl.DataFrame, num_heads: int | None = None, agg_layer: int | None = None):
    """weighted_combination accuracy vs alpha, one line per keep; avg_all_heads at 1/H and max_head at 1 marked."""
    layer = agg_layer if agg_layer is not None else accuracy["agg_layer"].min()
    acc = accuracy.filter(pl.col("agg_layer") == layer)
    acc = acc.filter(PLAIN)
    wc = acc.filter(pl.col("method") == "weighted_combination")
    fig, axes = new_figure()
    ax = axes[0, 0]
    import seaborn as sns

    keeps = sorted(wc["keep"].unique().to_list(), reverse=True)
    colors = dict(zip(keeps, sns.color_palette("viridis", len(keeps))))
    for keep in keeps:
        d = wc.filter(pl.col("keep") == keep).sort("alpha")
        ax.plot(d["alpha"], 100 * d["accuracy"], marker="o", color=colors[keep], label=f"keep {keep}")
        for method, x, marker in (("avg_all_heads", 1 / num_heads if num_heads else None, "s"),
                                  ("max_head", 1.0, "^")):
            ref = acc.filter(pl.col("method") == method, pl.col("keep") == keep)
            if ref.height and x is not None:
                ax.scatter([x], [100 * ref["accuracy"][0]], marker=marker, s=90, facecolors="none",
                           edgecolors=colors[keep], linewidths=2)
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="s", linestyle="", markerfacecolor="none", markeredgecolor="black",
                       label=f"avg_all_heads (alpha = 1/H{'' if not num_heads else f' = {1 / num_heads:.2f}'})"),
                Line2D([], [], marker="^", linestyle="", markerfacecolor="none", markeredgecolor="black",
                       label="max_head (alpha = 1)")]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("alpha (weight of the max head)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"weighted_combination: accuracy vs alpha at K={layer}")
    fig.tight_layout()
    return fig


def plot_cost(accuracy: pl.DataFrame, agg_layer: int | None = None):
    """What pruning buys and costs: accuracy (95% Wilson intervals) against FastV's theoretical
    prefill FLOP ratio (left) and against the measured prefill speed-up over the full control
    (right: median of paired ratios, bars the interquartile range), one marker per method, one
    point per keep; the ``full`` control sits at (1, its accuracy)."""
    layer = agg_layer if agg_layer is not None else accuracy["agg_layer"].min()
    acc = accuracy.filter(pl.col("agg_layer") == layer)
    alpha = primary_alpha(acc)
    acc = acc.filter(primary_only(alpha))
    markers = {"avg_all_heads": "o", "max_head": "^", "weighted_combination": "D", "random": "s", "uniform": "P"}
    fig, axes = new_figure(width=13, height=5.0, ncols=2, sharey=True)
    full = acc.filter(pl.col("method") == "full")
    panels = (("flops_ratio", None, None,
               "prefill FLOPs relative to the full model\n(FastV's formula; lower = cheaper)"),
              ("prefill_speedup_vs_full", "prefill_speedup_p25", "prefill_speedup_p75",
               "measured prefill speed-up over the full control (x; higher = faster)\n"
               "(median of paired ratios; horizontal bars: IQR)"))
    for ax, (xcol, lo, hi, xlabel) in zip(axes[0], panels):
        if xcol not in acc.columns or acc.filter(pl.col(xcol).is_not_null(), pl.col("method") != "full").height == 0:
            ax.text(0.5, 0.5, "no timings in this run (eval --timing-samples 0?)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy (%)")
            ax.set_title("Accuracy vs measured prefill speed-up")
            continue
        for method in [m for m in METHOD_ORDER if m in acc["method"].unique().to_list()]:
            d = acc.filter(pl.col("method") == method, pl.col(xcol).is_not_null()).sort(xcol)
            x, y = d[xcol].to_numpy(), 100 * d["accuracy"].to_numpy()
            yerr = np.vstack([y - 100 * d["ci_lo"].to_numpy(), 100 * d["ci_hi"].to_numpy() - y])
            xerr = None
            if lo and lo in d.columns and d[lo].null_count() == 0:
                xerr = np.clip(np.vstack([x - d[lo].to_numpy(), d[hi].to_numpy() - x]), 0, None)
            label = method if method != "weighted_combination" else f"weighted_combination (alpha={alpha:g})"
            ax.errorbar(x, y, yerr=yerr, xerr=xerr, marker=markers.get(method, "o"), markersize=7, capsize=3,
                        linestyle="-", linewidth=1, alpha=0.9, color=PALETTE[method], label=label)
        if full.height:
            fy = 100 * float(full["accuracy"][0])
            ferr = [[fy - 100 * float(full["ci_lo"][0])], [100 * float(full["ci_hi"][0]) - fy]]
            ax.errorbar([1.0], [fy], yerr=ferr, marker="*", markersize=15, color="black", capsize=3, linestyle="",
                        label=f"full control, nothing pruned ({fy:.1f}%)")
        pruned = acc.filter(pl.col("method") != "full", pl.col(xcol).is_not_null())
        for keep, d in sorted(pruned.group_by("keep"), key=lambda kv: kv[0][0]):
            x = float(d[xcol].median())
            ax.axvline(x, color="0.75", linewidth=0.8, linestyle=":", zorder=0)
            ax.annotate(f"keep {keep[0]}", (x, 2), rotation=90, ha="right", va="bottom", fontsize=8, color="0.3",
                        xytext=(-2, 0), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 108)
        ax.set_title("Accuracy vs theoretical prefill FLOPs" if xcol == "flops_ratio" else
                     "Accuracy vs measured prefill speed-up")
        ax.legend(fontsize=8, loc="lower right" if xcol == "flops_ratio" else "lower left")
    timing = ""
    if "prefill_ms" in full.columns and full.height and full["prefill_ms"][0] is not None:
        timing = f"; full prefill {float(full['prefill_ms'][0]):.1f} ms (median)"
    fig.suptitle(f"Cost vs accuracy at agg layer K={layer} (n={int(acc['n'][0])}, 95% Wilson intervals{timing})")
    fig.tight_layout()
    return fig


def main_numbers(accuracy: pl.DataFrame) -> pl.DataFrame:
    """The headline table: accuracy per method and keep (weighted at its alpha nearest 0.5),
    its interval, n samples and n units, the change vs the full control, exact paired
    p-values (:func:`paired_p`) vs full and vs avg_all_heads with their Holm adjustment over
    the whole table, and FLOPs."""
    alpha = primary_alpha(accuracy)
    acc = accuracy.filter(primary_only(alpha))
    benchmark = []
    if "metric_value" in acc.columns:  # a standard benchmark: its own headline, scored the official way
        ci = pl.format("[{}, {}]", pl.col("metric_ci_lo").round(1), pl.col("metric_ci_hi").round(1))
        benchmark = [pl.col("metric"), pl.col("metric_value").cast(pl.Float64).round(2),
                     pl.when(pl.col("metric_ci_lo").is_not_null()).then(ci).otherwise(pl.lit("")).alias("metric_ci")]
    p_full, p_avg = paired_p(accuracy, "full"), paired_p(accuracy, "avg")
    units = ["n_units"] if "n_units" in acc.columns else []
    return acc.select("agg_layer", "keep", "config", "n", *units, *benchmark,
                      (pl.col("accuracy") * 100).round(1).alias("accuracy_%"),
                      (pl.col("ci_lo") * 100).round(1).alias("ci_lo_%"), (pl.col("ci_hi") * 100).round(1).alias("ci_hi_%"),
                      (pl.col("delta_vs_full") * 100).round(1).alias("delta_vs_full_pts"),
                      sci_text(p_full), sci_text(f"{p_full}_holm"), sci_text(p_avg), sci_text(f"{p_avg}_holm"),
                      pl.col("flops_ratio").round(3),
                      pl.col("prefill_speedup_vs_full").cast(pl.Float64).round(2)).sort(
        ["agg_layer", "keep", "config"], descending=[False, True, False])


def full_control_note(info: dict | None) -> str:
    """One line on how the full control compares with capture's own answers."""
    if not info or "full_vs_capture" not in info:
        return "eval has not run (or predates the full control)"
    f = info["full_vs_capture"]
    timing = info.get("timing", {})
    return (f"Full control vs capture's `generate` answers: {f['differ']} of {f['compared']} differ "
            f"(0 expected on CPU float32). Timings: {timing.get('samples')} samples x {timing.get('repeats')} "
            f"repeats after a warm-up pass, {timing.get('threads')} threads on {timing.get('device')}.")
