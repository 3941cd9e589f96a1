"""Section 17, the field's methods side by side: eval's methods table (accuracy and % of the full
model retained per benchmark and averaged, FLOPs with each method's own cost, measured prefill,
KV cache), the cost figure, the per-selection statistics across methods and which of them
predicts being correct within a sample.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .configs import strategy_configs
from .style import PALETTE, config_colors, method_label, new_figure, where_marker

STATISTIC_TITLES = {
    "jaccard_vs_avg": "Jaccard with FastV's set",
    "region_coverage": "region coverage (4 x 4 grid)",
    "bottom_share": "share in the bottom half",
    "object_token_share": "kept tokens on an object",
    "objects_touched": "objects touched",
    "diversity": "diversity (mean pairwise\ncosine distance, LLM input)",
    "relevance": "relevance (mean cosine to the\ninstruction, LLM input)",
}
"""The statistics the section draws, with their panel titles."""


def _layer(frame: pl.DataFrame) -> int:
    ranked = frame.filter(pl.col("agg_layer") > 0)["agg_layer"]
    return int(ranked.min() if ranked.len() else frame["agg_layer"].min())


def _benchmarks(frame: pl.DataFrame) -> list[str]:
    """The benchmarks of the methods table, from its ``retained[B]`` columns."""
    return [c[len("retained["):-1] for c in frame.columns if c.startswith("retained[")]


def methods_view(methods: pl.DataFrame | None) -> pl.DataFrame | None:
    """The table as the report shows it, at the first ranked layer: per configuration its
    retained % (per benchmark and the mean of ratios), accuracy, FLOPs ratio without and with
    the method's own cost, measured prefill ms, KV-cache MB, where it reads, positions."""
    if methods is None or methods.height == 0:
        return None
    m = methods.filter(pl.col("agg_layer") == _layer(methods))
    benches = _benchmarks(m)
    cols = [pl.col("config"), pl.col("keep"), pl.col("where"), pl.col("positions"),
            *[pl.col(f"retained[{b}]").round(1).alias(f"retained_{b}_%") for b in benches],
            pl.col("retained_avg").round(1).alias("retained_avg_%"),
            (100 * pl.col("accuracy_avg")).round(1).alias("acc_avg_%"),
            pl.col("flops_ratio").round(4), pl.col("flops_ratio_total").round(4),
            pl.col("prefill_ms").round(2), (pl.col("kv_cache_bytes") / 2**20).round(2).alias("kv_cache_MB"),
            pl.col("method_cost")]
    return m.select(cols)


def methods_note(methods: pl.DataFrame | None) -> str:
    """One paragraph: which benchmarks, how the average is taken, and the best configuration
    at each keep (measured)."""
    if methods is None or methods.height == 0:
        return "No methods table in this run: re-run `fastv-analyze eval` (eval writes eval/methods.parquet)."
    m = methods.filter(pl.col("agg_layer") == _layer(methods), pl.col("config") != "full")
    benches = _benchmarks(methods)
    lines = [f"Benchmarks: {', '.join(benches)}; `retained_avg` is the mean over benchmarks of each benchmark's "
             "% of the full model's headline (mean of ratios, as the methods' papers report their average)."]
    for keep, g in sorted(m.filter(pl.col("keep").is_not_null()).group_by("keep"), key=lambda kv: -kv[0][0]):
        g = g.sort("retained_avg", descending=True, nulls_last=True)
        best, worst = g.row(0, named=True), g.row(g.height - 1, named=True)
        fastv = g.filter(pl.col("config") == "avg_all_heads")
        if best["retained_avg"] is None:
            lines.append(f"keep {keep[0]}: no % retained (the full control scored 0).")
            continue
        extra = f", FastV (avg_all_heads) {_pct(fastv['retained_avg'][0])}" if fastv.height else ""
        lines.append(f"keep {keep[0]}: best {best['config']} {_pct(best['retained_avg'])}, "
                     f"lowest {worst['config']} {_pct(worst['retained_avg'])}{extra}.")
    missing = m.filter(pl.col("method_macs").is_null())["method"].unique().sort().to_list()
    if missing:
        lines.append("Own cost not counted (no formula in flops.METHOD_COSTS or a size unknown): "
                     f"{', '.join(missing)}.")
    return " ".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


def plot_methods_cost(methods: pl.DataFrame | None):
    """Left: % of the full model retained (mean over benchmarks) against the prefill FLOPs ratio
    with each method's own cost, one colour per configuration, one point per keep (hollow:
    own cost not counted, drawn at FastV's formula alone). Right: each configuration's own cost
    as % of the full model's prefill FLOPs, per keep."""
    if methods is None or methods.height == 0:
        return None
    m = methods.filter(pl.col("agg_layer") == _layer(methods))
    configs = strategy_configs(m)
    if not configs:
        return None
    fig, axes = new_figure(width=15, height=5.5, ncols=2)
    _retained_panel(axes[0, 0], m, configs)
    _own_cost_panel(axes[0, 1], m, configs)
    fig.tight_layout()
    return fig


def _retained_panel(ax, m: pl.DataFrame, configs: list[str]) -> None:
    colors = config_colors(configs)
    for config in configs:
        d = m.filter(pl.col("config") == config, pl.col("keep").is_not_null()).sort("keep")
        counted = d["flops_ratio_total"].is_not_null().to_numpy()
        x = np.where(counted, d["flops_ratio_total"].fill_null(0).to_numpy(), d["flops_ratio"].to_numpy())
        y = d["retained_avg"].to_numpy()
        ax.plot(x, y, "-", color=colors[config], linewidth=1, alpha=0.8)
        marker = where_marker(config)
        ax.scatter(x[counted], y[counted], color=colors[config], s=40, marker=marker, label=method_label(config),
                   zorder=3)
        ax.scatter(x[~counted], y[~counted], facecolors="none", edgecolors=colors[config], s=40, marker=marker,
                   zorder=3)
    ax.axhline(100.0, color="black", linestyle="--", linewidth=1, label="full control (100 %, FLOPs 1)")
    for keep, d in m.filter(pl.col("config") != "full", pl.col("keep").is_not_null()).group_by("keep"):
        x = float(d["flops_ratio"].median())
        ax.axvline(x, color="0.75", linewidth=0.8, linestyle=":", zorder=0)
        ax.annotate(f"keep {keep[0]}", (x, 0.01), xycoords=("data", "axes fraction"), rotation=90, ha="right",
                    va="bottom", fontsize=8, color="0.3", xytext=(-2, 0), textcoords="offset points")
    ax.set_xlabel("prefill FLOPs relative to the full model, the method's own cost included\n"
                  "(FastV's formula + flops.method_cost; dotted: FastV's formula alone at each keep;\n"
                  "hollow: own cost not counted;\ncircle: read in the LLM, square: before it, triangle: in the vision tower)")
    ax.set_ylabel("% of the full model retained (mean over benchmarks)")
    ax.set_title("Retained accuracy vs prefill FLOPs")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=1 + len(configs) // 20)


def _own_cost_panel(ax, m: pl.DataFrame, configs: list[str]) -> None:
    keeps = sorted(k for k in m["keep"].drop_nulls().unique().to_list() if k < m["keep"].max())
    width = 0.8 / max(len(keeps), 1)
    shares = {k: [_own_share(m.filter(pl.col("keep") == k), c) for c in configs] for k in keeps}
    for i, keep in enumerate(keeps):
        share = shares[keep]
        ax.barh(np.arange(len(configs)) + i * width, [s if s is not None else 0 for s in share], height=width,
                color=PALETTE.get("avg_all_heads"), alpha=0.35 + 0.65 * (i + 1) / len(keeps), label=f"keep {keep}")
        for j, s in enumerate(share):
            if not s and i == len(keeps) // 2:  # once per configuration, at its middle bar
                ax.text(0, j + i * width, " not counted" if s is None else " 0", va="center", fontsize=8,
                        color="0.3")
    ax.set_yticks(np.arange(len(configs)) + width * (len(keeps) - 1) / 2, [method_label(c) for c in configs])
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlim(0, 3 * max([s for share in shares.values() for s in share if s] or [1e-3]))
    ax.set_xlabel("the method's own cost, % of the full model's prefill FLOPs (symlog)")
    ax.set_ylabel("configuration")
    ax.set_title("What selecting costs")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _own_share(d: pl.DataFrame, config: str) -> float | None:
    row = d.filter(pl.col("config") == config)
    if row.height == 0 or row["flops_ratio_total"][0] is None:
        return None
    return 100.0 * float(row["flops_ratio_total"][0] - row["flops_ratio"][0])


def statistics_summary(stats: pl.DataFrame | None) -> pl.DataFrame | None:
    """Per configuration and keep: accuracy and the mean of every statistic (eval's
    method_statistics.parquet), at the first ranked layer."""
    if stats is None or stats.height == 0:
        return None
    s = stats.filter(pl.col("agg_layer") == _layer(stats), pl.col("keep").is_not_null())
    present = [c for c in STATISTIC_TITLES if c in s.columns]
    return s.group_by("config", "method", "alpha", "keep").agg(
        pl.col("correct").cast(pl.Float64).mean().alias("accuracy"), *[pl.col(c).mean() for c in present]
    ).sort("config", "keep")


def plot_method_statistics(stats: pl.DataFrame | None):
    """One panel per statistic (and accuracy first): each configuration's mean over the samples
    (one row each, the registry's order), one marker per keep."""
    summary = statistics_summary(stats)
    if summary is None or summary.height == 0:
        return None
    configs = strategy_configs(summary)
    panels = ["accuracy"] + [c for c in STATISTIC_TITLES if c in summary.columns
                             and summary[c].drop_nulls().len()]
    keeps = sorted(summary["keep"].unique().to_list(), reverse=True)
    markers = dict(zip(keeps, "oDs^v<>"))
    ncols = 4
    nrows = -(-len(panels) // ncols)
    fig, axes = new_figure(width=4.2 * ncols, height=0.25 * len(configs) * nrows + 1.6 * nrows, ncols=ncols,
                           nrows=nrows, sharey=True)
    y, colors = np.arange(len(configs)), config_colors(configs)
    for ax, stat in zip(axes.flat, panels):
        for keep in keeps:
            d = summary.filter(pl.col("keep") == keep)
            values = dict(zip(d["config"].to_list(), d[stat].to_list()))
            x = [values.get(c) for c in configs]
            x = np.array([np.nan if v is None else v for v in x], dtype=float) * (100 if stat == "accuracy" else 1)
            ax.scatter(x, y, marker=markers[keep], s=30, label=f"keep {keep}",
                       c=[colors[c] for c in configs])
        ax.set_title("accuracy (%)" if stat == "accuracy" else STATISTIC_TITLES[stat], fontsize=10)
        ax.set_yticks(y, [method_label(c) for c in configs], fontsize=8)
        if ax in axes[:, 0]:  # the rows are shared: named once per row
            ax.set_xlabel("mean over samples")
            ax.set_ylabel("configuration")
        ax.grid(axis="y", color="0.9")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0, 0].invert_yaxis()
    handles = [axes[0, 0].scatter([], [], marker=markers[k], color="0.3", label=f"keep {k}") for k in keeps]
    fig.legend(handles=handles, loc="upper center", ncol=len(keeps), bbox_to_anchor=(0.5, 1.02))
    fig.suptitle("Per-selection statistics across methods (mean over samples)", y=1.06)
    fig.tight_layout()
    return fig


def method_relations_view(relations: pl.DataFrame | None) -> pl.DataFrame | None:
    """Which statistic predicts being correct within a sample: the pooled within-sample rows of
    eval's method_relations.parquet (r_within, permutation p, Holm)."""
    if relations is None or relations.height == 0:
        return None
    return relations.filter(pl.col("scope") == "within_sample").select(
        "statistic", "n", "n_strata", pl.col("r_within").round(3), "p_value", "p_holm")


def methods_missing(tables) -> str | None:
    """The line the section shows without eval's methods table."""
    return None if tables.methods is not None else methods_note(None)
