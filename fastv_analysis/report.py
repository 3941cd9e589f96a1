"""Figures of a run directory, as functions a researcher can call from any notebook.

Each ``plot_*`` function takes the tables it needs (or a :class:`RunTables`) and returns a
matplotlib Figure with a title, labelled axes and a legend (or None where the run has
nothing to draw, e.g. no question categories). :func:`save_all` writes them to
``RUN/figures/``; ``notebooks/report.ipynb`` shows them with a text cell each, and
``fastv-analyze report`` executes that notebook headless into ``RUN/report.html``
(:func:`render`: one-line :class:`ReportError` on failure, full traceback in
``RUN/report-error.log``, no temporary files left behind).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from . import grid as image_grid
from .strategies import METHODS as METHOD_ORDER

PALETTE = {"avg_all_heads": "#1f77b4", "max_head": "#d62728", "weighted_combination": "#2ca02c",
           "random": "#7f7f7f", "uniform": "#9467bd", "full": "black",
           "dynamic_alpha": "#ff7f0e", "no_rope": "#8c564b", "sink_excluded": "#e377c2", "diverse": "#17becf",
           "hybrid_uniform": "#bcbd22"}


@dataclass
class RunTables:
    """The tables of one run directory that the figures use (None where a stage has not run)."""

    root: Path
    samples: pl.DataFrame
    selections: pl.DataFrame | None
    overlap_summary: pl.DataFrame | None
    heads: pl.DataFrame | None
    accuracy: pl.DataFrame | None
    predictions: pl.DataFrame | None
    relations: pl.DataFrame | None
    num_heads: int | None
    eval_info: dict | None = None
    geometry: image_grid.ImageGeometry = image_grid.DEFAULT_GEOMETRY  # the processor's resize/crop/patch grid
    oracle: pl.DataFrame | None = None     # eval/oracle.parquet: per-sample oracle vs best single strategy
    adaptive: pl.DataFrame | None = None   # eval/adaptive.parquet: the cross-validated choice rule
    store: tuple[str, ...] = ()            # what capture stored beyond the attention (run.json "store")
    architecture: str = "LlavaForConditionalGeneration"  # run.json's: where its grid sits on the image
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # tensors read from the run, once


def load_tables(run_dir: str | Path) -> RunTables:
    root = Path(run_dir)

    def read(*parts):
        p = root.joinpath(*parts)
        return pl.read_parquet(p) if p.exists() else None

    import json

    config = json.loads((root / "run.json").read_text()) if (root / "run.json").exists() else {}
    return RunTables(
        root=root,
        samples=read("samples.parquet"),
        selections=read("select", "selections.parquet"),
        overlap_summary=read("select", "overlap_summary.parquet"),
        heads=read("select", "heads.parquet"),
        accuracy=read("eval", "accuracy.parquet"),
        predictions=read("eval", "predictions.parquet"),
        relations=read("eval", "relations.parquet"),
        num_heads=config.get("num_heads"),
        eval_info=json.loads((root / "eval" / "eval.json").read_text()) if (root / "eval" / "eval.json").exists()
        else None,
        geometry=image_grid.load_geometry(config.get("model")),
        oracle=read("eval", "oracle.parquet"),
        adaptive=read("eval", "adaptive.parquet"),
        store=tuple(config.get("store") or ()),
        architecture=config.get("architecture") or "LlavaForConditionalGeneration",
    )


def resolve_run_dir(run_dir: str | Path, base: str | Path | None = None) -> Path:
    """``run_dir`` as given if it exists, else relative to the parent folder (a notebook opened
    from ``notebooks/`` with the default ``runs/demo``), else relative to ``base``; as given
    (so the error names it) when none exists."""
    given = Path(run_dir)
    candidates = [given]
    if not given.is_absolute():
        candidates += [Path("..") / given] + ([Path(base) / given] if base is not None else [])
    return next((c for c in candidates if (c / "run.json").exists()), given)


def _style():
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")


def _figure(width=7.0, height=4.5, ncols=1, nrows=1, **kw):
    import matplotlib.pyplot as plt

    _style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)
    return fig, axes


def _primary_alpha(accuracy: pl.DataFrame) -> float | None:
    alphas = accuracy.filter(pl.col("method") == "weighted_combination")["alpha"].unique().drop_nulls().to_list()
    if not alphas:
        return None
    return min(alphas, key=lambda a: abs(a - 0.5))


PLAIN = (~pl.col("config").str.contains("@", literal=True) & ~pl.col("config").str.contains(" then ", literal=True)
         & ~pl.col("config").str.contains(" ratio ", literal=True))
"""Configurations on the last token's rows with one cut of a --keep count: the query variants
(``@text_mean``) and schedules (``... then ...``) share their method name and have sections of
their own; a --keep-ratio's (``... ratio 0.25``) has no single count to sit on a keep axis (its
rows are in the tables, keep null, and in the overlap heatmap)."""


def _primary_only(alpha: float | None) -> pl.Expr:
    """Rows of every method but weighted_combination, and weighted_combination at ``alpha``
    (none when None); plain configurations only (:data:`PLAIN`)."""
    wc = pl.col("alpha") == alpha if alpha is not None else pl.lit(False)
    return ((pl.col("method") != "weighted_combination") | wc) & PLAIN


def plot_accuracy_vs_keep(accuracy: pl.DataFrame, agg_layer: int | None = None):
    """Accuracy vs kept image tokens, one line per method, 95% intervals, full model as reference."""
    layer = agg_layer if agg_layer is not None else accuracy["agg_layer"].min()
    acc = accuracy.filter(pl.col("agg_layer") == layer)
    alpha = _primary_alpha(acc)
    acc = acc.filter(_primary_only(alpha))
    fig, axes = _figure()
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
    fig, axes = _figure()
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


def _shown_configs(frame: pl.DataFrame) -> list[str]:
    """One configuration per method in METHOD_ORDER (weighted_combination at its alpha nearest 0.5)."""
    alpha = _primary_alpha(frame)
    present = frame.filter(_primary_only(alpha))
    configs = present["config"].unique().sort().to_list()
    return [c for m in METHOD_ORDER for c in configs if c.split("(")[0] == m]


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
    configs = p["config"].unique().to_list() if all_configs else ["full"] + _shown_configs(p)
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
    fig, axes = _figure(width=max(4.2, 1.05 * len(cats) + 3.0) * len(keeps), height=0.42 * len(configs) + 2.2,
                        ncols=len(keeps))
    for ax, keep in zip(axes[0], keeps):
        d = long.filter((pl.col("keep") == keep) | (pl.col("config") == "full"))
        rows = [c for c in configs if d.filter(pl.col("config") == c).height]
        m = np.full((len(rows), len(cats)), np.nan)
        for cfg, cat, acc in d.select("config", "category", "accuracy_%").iter_rows():
            m[rows.index(cfg), cats.index(cat)] = acc
        ylabels = [f"full (all {full_keep}, reference)" if c == "full" else _method_label(c) for c in rows]
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


def plot_cost(accuracy: pl.DataFrame, agg_layer: int | None = None):
    """What pruning buys and costs: accuracy (95% Wilson intervals) against FastV's theoretical
    prefill FLOP ratio (left) and against the measured prefill speed-up over the full control
    (right: median of paired ratios, bars the interquartile range), one marker per method, one
    point per keep; the ``full`` control sits at (1, its accuracy)."""
    layer = agg_layer if agg_layer is not None else accuracy["agg_layer"].min()
    acc = accuracy.filter(pl.col("agg_layer") == layer)
    alpha = _primary_alpha(acc)
    acc = acc.filter(_primary_only(alpha))
    markers = {"avg_all_heads": "o", "max_head": "^", "weighted_combination": "D", "random": "s", "uniform": "P"}
    fig, axes = _figure(width=13, height=5.0, ncols=2, sharey=True)
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


def _method_label(config: str) -> str:
    return config.replace("weighted_combination", "weighted")


def chance_jaccard(n_tokens: int, keep: int) -> float:
    """Expected Jaccard index of two independent, uniformly random ``keep``-subsets of ``n_tokens``.

    The intersection ``I = |A & B|`` of two random k-subsets of N items is hypergeometric
    (population N, k marked, k drawn) and the union is ``2k - I``, so

        E[J] = sum_i P(I = i) * i / (2k - i),    I ~ Hypergeometric(N, k, k),

    summed over ``max(0, 2k - N) <= i <= k``. It is the overlap two strategies reach by
    chance alone (about ``k / (2N - k)``: 0.200 at k = 192 of 576, 0.059 at 64, 0.015 at 16);
    ``random`` against anything sits there. ``keep >= N`` gives 1, ``keep <= 0`` NaN (0 / 0).
    """
    from scipy.stats import hypergeom

    n, k = int(n_tokens), int(keep)
    if k <= 0:
        return float("nan")
    if k >= n:
        return 1.0
    i = np.arange(max(0, 2 * k - n), k + 1)
    return float(np.sum(hypergeom(n, k, k).pmf(i) * i / (2 * k - i)))


def n_image_tokens(tables: "RunTables") -> int | None:
    """N, the number of image tokens per sample (576 for LLaVA-1.5), from the samples table."""
    if tables.samples is not None and "n_image_tokens" in tables.samples.columns and tables.samples.height:
        return int(tables.samples["n_image_tokens"].max())
    if tables.selections is not None:
        return grid_side(tables.selections) ** 2
    return None


def mean_chance_jaccard(n_tokens, keep=None, ratio: float | None = None) -> float:
    """The chance Jaccard of a run whose samples have different N: the mean over samples of
    :func:`chance_jaccard` of two random k_b-subsets of their own N_b (``n_tokens``: one N per
    sample, or one N for all), with k_b = ``keep``, or a ``ratio`` of N_b as select rounds it."""
    from .select import ratio_keep

    counts = pl.DataFrame({"n": np.atleast_1d(np.asarray(n_tokens, dtype=np.int64))}).group_by("n").len()
    total = 0.0
    for n, weight in counts.iter_rows():
        k = ratio_keep(ratio, n) if ratio is not None else int(keep)
        total += weight * chance_jaccard(n, k)
    return total / counts["len"].sum()


def _overlap_panels(ov: pl.DataFrame) -> list[tuple[int | None, float | None]]:
    """``(keep, ratio)`` of each heatmap panel: the --keep counts (descending), then the ratios."""
    ratio = pl.col("ratio") if "ratio" in ov.columns else pl.lit(None, dtype=pl.Float64)
    counts = sorted(ov.filter(ratio.is_null())["keep"].unique().to_list(), reverse=True)
    ratios = sorted(ov.filter(ratio.is_not_null())["ratio"].unique().to_list(), reverse=True) \
        if "ratio" in ov.columns else []
    return [(k, None) for k in counts] + [(None, r) for r in ratios]


def _panel_configs(d: pl.DataFrame, max_configs: int) -> list[str]:
    configs = [c for c in dict.fromkeys(d["config_a"].to_list() + d["config_b"].to_list())
               if "@" not in c]  # query variants: the query-choice section
    if len(configs) > max_configs:  # keep the single methods and a few alphas readable
        wc = [c for c in configs if c.startswith("weighted")]
        room = max(2, max_configs - (len(configs) - len(wc)))  # the newer strategies take room too
        keep_wc = wc[:: max(1, math.ceil(len(wc) / room))]
        configs = [c for c in configs if not c.startswith("weighted") or c in keep_wc]
    return configs


def _budget_title(keep: int | None, ratio: float | None, n_tokens) -> str:
    """``keep 64 of 576`` / ``keep 64 of N = 256-1280`` / ``keep 0.25 x N (64-320 of 256-1280)``."""
    from .select import ratio_keep

    ns = sorted({int(n) for n in np.atleast_1d(n_tokens)}) if n_tokens is not None else []
    of = "" if not ns else f" of {ns[0]}" if len(ns) == 1 else f" of N = {ns[0]}-{ns[-1]}"
    if ratio is None:
        return f"keep {keep}{of}"
    if not ns:
        return f"keep {ratio:g} x N"
    ks = [ratio_keep(ratio, n) for n in ns]
    return f"keep {ratio:g} x N ({ks[0]}{of})" if len(ns) == 1 else \
        f"keep {ratio:g} x N ({ks[0]}-{ks[-1]} of {ns[0]}-{ns[-1]})"


def plot_overlap_heatmap(overlap_summary: pl.DataFrame, agg_layer: int | None = None, max_configs: int = 8,
                         n_tokens=None):
    """Mean Jaccard overlap between configurations' kept sets, one panel per keep (and per
    ``--keep-ratio``). The level two random subsets reach by chance is in each panel's title,
    marked on its colour bar, and is the white centre of its diverging colour scale (red: more
    overlap than chance, blue: less). ``n_tokens``: each sample's N (or one N); with images of
    different sizes the chance level is the mean over samples of each one's own
    (:func:`mean_chance_jaccard`), since the mean Jaccard is a mean over samples too."""
    import seaborn as sns

    layer = agg_layer if agg_layer is not None else overlap_summary["agg_layer"].min()
    ov = overlap_summary.filter(pl.col("agg_layer") == layer)
    panels = []
    for keep, ratio in _overlap_panels(ov):
        d = ov.filter(pl.col("keep") == keep) if ratio is None else ov.filter(pl.col("ratio") == ratio)
        panels.append((keep, ratio, d, _panel_configs(d, max_configs)))
    mixed = n_tokens is not None and len({int(n) for n in np.atleast_1d(n_tokens)}) > 1
    side = max(5.0, 0.42 * max(len(p[3]) for p in panels) + 2.6)  # room for every label
    fig, axes = _figure(width=(side + 1.0) * len(panels), height=side, ncols=len(panels))
    for ax, (keep, ratio, d, configs) in zip(axes[0], panels):
        m = np.eye(len(configs))
        idx = {c: i for i, c in enumerate(configs)}
        for a, b, j in d.select("config_a", "config_b", "jaccard_mean").iter_rows():
            if a in idx and b in idx:
                m[idx[a], idx[b]] = m[idx[b], idx[a]] = j
        suffix = "" if ratio is None else f" ratio {ratio:g}"
        labels = [_method_label(c.removesuffix(suffix)) for c in configs]
        chance = mean_chance_jaccard(n_tokens, keep, ratio) if n_tokens is not None else float("nan")
        at_chance = 0 < chance < 1
        if at_chance:  # diverging around chance: white = what two random subsets share, red above, blue below
            from matplotlib.colors import TwoSlopeNorm

            style = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vmin=0, vcenter=chance, vmax=1)}
        else:
            style = {"cmap": "mako", "vmin": 0, "vmax": 1}
        sns.heatmap(m, ax=ax, annot=len(configs) <= 8, fmt=".2f", xticklabels=labels, yticklabels=labels,
                    cbar_kws={"label": "mean Jaccard"}, annot_kws={"size": 7}, **style)
        title = _budget_title(keep, ratio, n_tokens)
        if at_chance:
            cbar = ax.collections[0].colorbar
            cbar.set_ticks([0, chance, 0.5, 1], labels=["0", f"chance {chance:.3f}", "0.5", "1"], fontsize=8)
            cbar.ax.axhline(chance, color="black", linewidth=1.5)
            title += (f":\nmean over samples of each one's chance Jaccard {chance:.3f} (white)" if mixed
                      else f": chance Jaccard {chance:.3f} (white)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("configuration")
        ax.set_ylabel("configuration")
        ax.set_xticks(np.arange(len(labels)) + 0.5, labels, rotation=45, ha="right", rotation_mode="anchor",
                      fontsize=7)
        ax.set_yticks(np.arange(len(labels)) + 0.5, labels, rotation=0, fontsize=7)
    fig.suptitle(f"Overlap of kept sets between strategies (K={layer}); white = chance (two random subsets), "
                 "red above, blue below")
    fig.tight_layout()
    return fig


def sample_token_counts(tables: "RunTables") -> list[int] | None:
    """Each captured sample's N (anyres and dynamic resolution: N varies by image)."""
    if tables.samples is not None and "n_image_tokens" in tables.samples.columns and tables.samples.height:
        return [int(n) for n in tables.samples["n_image_tokens"].to_list()]
    return n_image_tokens(tables)


def plot_head_statistics(heads: pl.DataFrame, num_heads: int | None = None):
    """How often each head is the max head, and the spread of head-importance entropy, per layer."""
    import seaborn as sns

    fig, axes = _figure(width=11, height=4.2, ncols=2)
    h = num_heads or int(heads["max_head"].max()) + 1
    layers = sorted(heads["agg_layer"].unique().to_list())
    counts = (heads.group_by(["agg_layer", "max_head"]).len().with_columns(
        (pl.col("len") / pl.col("len").sum().over("agg_layer") * 100).alias("share")))
    ax = axes[0, 0]
    width = 0.8 / len(layers)
    for i, layer in enumerate(layers):
        d = counts.filter(pl.col("agg_layer") == layer)
        share = np.zeros(h)
        share[d["max_head"].to_numpy()] = d["share"].to_numpy()
        ax.bar(np.arange(h) + i * width - 0.4 + width / 2, share, width=width, label=f"layer K-1={layer - 1}")
    ax.set_xlabel("head index")
    ax.set_ylabel("samples where it is the max head (%)")
    ax.set_title("Max-head frequency")
    ax.set_xticks(np.arange(h) if h <= 40 else np.arange(0, h, max(1, h // 16)))
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for layer in layers:
        d = heads.filter(pl.col("agg_layer") == layer)["head_entropy"].to_numpy()
        sns.histplot(d, ax=ax, bins=20, binrange=(0, 1), stat="percent", element="step",
                     label=f"layer K-1={layer - 1}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("normalised head-importance entropy (0 = one head, 1 = all equal)")
    ax.set_ylabel("samples (%)")
    ax.set_title("Head-importance entropy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def keep_frequency(selections: pl.DataFrame, n_tokens: int) -> dict[str, np.ndarray]:
    """Per configuration: fraction of samples in which each image token was kept ``[N]``."""
    out = {}
    for (config,), d in selections.group_by(["config"], maintain_order=True):
        kept = d["kept"].explode().drop_nulls().to_numpy()
        out[config] = np.bincount(kept, minlength=n_tokens) / max(d.height, 1)
    return out


def one_config_per_method(selections: pl.DataFrame, keep: int | None = None, agg_layer: int | None = None):
    """The selections of one layer and keep (default: the smallest keep > 0), one configuration
    per method (weighted_combination at its alpha nearest 0.5), at ``agg_layer`` (default: the
    first K > 0, where the attention ranks; K = 0 replays only the controls); returns (rows,
    layer, keep, configs)."""
    ranked = selections.filter(pl.col("agg_layer") > 0)["agg_layer"]
    layer = agg_layer if agg_layer is not None else (ranked.min() if ranked.len() else selections["agg_layer"].min())
    sel = selections.filter(pl.col("agg_layer") == layer)
    keeps = sorted(sel["keep"].unique().to_list())
    keep = keep if keep is not None else next((k for k in keeps if k > 0), keeps[0])
    sel = sel.filter(pl.col("keep") == keep)
    alpha = _primary_alpha(sel)
    sel = sel.filter(_primary_only(alpha))
    configs = [c for m in METHOD_ORDER for c in sel["config"].unique().sort().to_list() if c.split("(")[0] == m]
    return sel, layer, keep, configs


def grid_side(selections: pl.DataFrame) -> int:
    """Side of the square image-token grid (24 for LLaVA-1.5's 576), from keep / keep_ratio."""
    row = selections.filter(pl.col("keep") > 0).head(1)
    return math.isqrt(round(row["keep"][0] / row["keep_ratio"][0])) if row.height else 24


# -- where each image token sits, for every family -------------------------------------------


def _layouts(samples: pl.DataFrame | None, selections: pl.DataFrame | None = None) -> dict:
    """sample_id -> :class:`~fastv_analysis.layout.TokenLayout` (samples.parquet's stored layout;
    without samples, a square grid of N from the selections' keep / keep_ratio)."""
    from .layout import TokenLayout
    from .select import sample_layouts

    if samples is not None and ("token_cells" in samples.columns or "n_image_tokens" in samples.columns):
        return sample_layouts(samples)
    side = grid_side(selections)
    return {int(s): TokenLayout.grid(side, side) for s in selections["sample_id"].unique().to_list()}


def base_tile(layout, architecture: str) -> int:
    """Side of the anyres base tile: the square block of off-grid tokens before the grid
    (:data:`~fastv_analysis.adapters.BASE_TILE` architectures only; 0 where there is none)."""
    from .adapters import BASE_TILE
    from .layout import OFF_GRID

    if architecture not in BASE_TILE:
        return 0
    lead = int(np.argmax(layout.cells != OFF_GRID)) if (layout.cells != OFF_GRID).any() else layout.n_tokens
    side = math.isqrt(lead)
    return side if side and side * side == lead else 0


def grid_extent(architecture: str) -> str:
    """``crop`` or ``image``: what the spatial grid spans (:data:`~fastv_analysis.adapters.GRID_EXTENT`)."""
    from .adapters import GRID_EXTENT

    return GRID_EXTENT.get(architecture, "crop")


def cell_boxes(cells, rows: int, cols: int, width: int, height: int, geometry, extent: str) -> np.ndarray:
    """``[k, 4]`` boxes ``(x0, y0, x1, y1)`` in original pixels of raster ``cells`` of a
    ``rows x cols`` grid spanning the processor's crop (``extent="crop"``, via
    :func:`fastv_analysis.grid.token_boxes`) or the whole ``width x height`` image."""
    cells = np.asarray(cells, dtype=np.int64).reshape(-1)
    if extent == "crop":
        return image_grid.token_boxes(cells, width, height, geometry, (rows, cols))
    r, c = np.divmod(cells, cols)
    return np.stack([c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows],
                    axis=-1).astype(float)


def grid_note(samples: pl.DataFrame | None, architecture: str = "LlavaForConditionalGeneration") -> str:
    """One line: the image-token grids of the run's samples (the spatial figures draw on these)."""
    if samples is None or samples.height == 0:
        return "No samples."
    layouts = _layouts(samples)
    shapes: dict[tuple[int, int], int] = {}
    for lay in layouts.values():
        shapes[(lay.rows, lay.cols)] = shapes.get((lay.rows, lay.cols), 0) + 1
    ranked = sorted(shapes.items(), key=lambda kv: (-kv[1], kv[0]))
    named = ", ".join(("no grid" if r == 0 else f"{r} x {c}") + f" ({n})" for (r, c), n in ranked[:6])
    more = f" and {len(ranked) - 6} more shapes" if len(ranked) > 6 else ""
    where = "the processor's center crop" if grid_extent(architecture) == "crop" else "the whole image"
    tiles = sorted({base_tile(lay, architecture) for lay in layouts.values()} - {0})
    base = f"; before it an anyres base tile of {' / '.join(f'{s} x {s}' for s in tiles)} tokens (the whole image)" \
        if tiles else ""
    off = sum(int((lay.cells < 0).sum()) for lay in layouts.values())
    extra = f"; {off} of the {sum(lay.n_tokens for lay in layouts.values())} image tokens are off the grid " \
            "(base tiles, tiles, newlines)" if off else ""
    return (f"Image-token grids of this run's {samples.height} samples (rows x columns, samples): {named}{more}, "
            f"each over {where}{base}{extra}.")


def _most_common_grid(layouts: dict, ids) -> tuple[int, int] | None:
    shapes = [(layouts[s].rows, layouts[s].cols) for s in ids if s in layouts and layouts[s].rows > 0]
    if not shapes:
        return None
    values, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    return tuple(int(v) for v in values[int(np.argmax(counts))])


def grid_keep_frequency(sel: pl.DataFrame, layouts: dict, architecture: str = "LlavaForConditionalGeneration"):
    """Keep frequency on the samples' own grids: ``(grid, base, n_grid, n_base)`` with ``grid``
    ``{config: [rows, cols]}`` the fraction of the samples of the most common grid in which each
    cell was kept, ``base`` ``{config: [s, s]}`` the same on the anyres base tile (empty where
    there is none) and the number of samples each pools. None when no sample is on a grid."""
    shape = _most_common_grid(layouts, sel["sample_id"].unique().to_list())
    if shape is None:
        return None
    rows, cols = shape
    sides = [base_tile(layouts[s], architecture) for s in sel["sample_id"].unique().to_list() if s in layouts]
    side = max(set(sides) - {0}, key=sides.count) if set(sides) - {0} else 0
    grid, base, n_grid, n_base = {}, {}, 0, 0
    for (config,), d in sel.group_by(["config"], maintain_order=True):
        g, b, n_grid, n_base = np.zeros(rows * cols), np.zeros(side * side), 0, 0
        for sid, kept in d.select("sample_id", "kept").iter_rows():
            lay = layouts.get(int(sid))
            if lay is None or kept is None:
                continue
            kept = np.asarray(kept, dtype=np.int64)
            if (lay.rows, lay.cols) == shape:
                n_grid += 1
                cells = lay.cells[kept]
                g[cells[cells >= 0]] += 1
            if side and base_tile(lay, architecture) == side:
                n_base += 1
                b[kept[kept < side * side]] += 1
        grid[config] = g.reshape(rows, cols) / max(n_grid, 1)
        if side:
            base[config] = b.reshape(side, side) / max(n_base, 1)
    return grid, base, n_grid, n_base


def _tick_step(n: int) -> int:
    return max(1, round(n / 4))


def plot_keep_frequency(selections: pl.DataFrame, keep: int | None = None, agg_layer: int | None = None,
                        samples: pl.DataFrame | None = None, architecture: str = "LlavaForConditionalGeneration"):
    """Where kept tokens sit: keep frequency of every cell of the samples' own grid (the most
    common one where samples differ: 24 x 24 for LLaVA-1.5, each image's own for Qwen2-VL and
    anyres), one panel per method; anyres runs add the base tile under it. The methods share
    one colour scale (0 to their largest cell) except ``uniform``, which keeps the same
    lattice in every sample (100 % cells) and has its own 0-100 % scale: on a single scale it
    would wash the others out. Each title names its scale and the flat level keep / N. None
    when no sample's tokens lie on a grid."""
    sel, layer, keep, configs = one_config_per_method(selections, keep, agg_layer)
    layouts = _layouts(samples, sel)
    found = grid_keep_frequency(sel, layouts, architecture)
    if found is None:
        return None
    grid, base, n_grid, n_base = found
    n_tok = np.mean([layouts[s].n_tokens for s in sel["sample_id"].unique().to_list() if s in layouts])
    flat = 100 * keep / n_tok
    panels = [("grid", grid)] + ([("base tile", base)] if base else [])
    fig, axes = _figure(width=3.9 * len(configs), height=4.0 * len(panels), ncols=len(configs), nrows=len(panels))
    for r, (where, freq) in enumerate(panels):
        freq = {c: 100 * f for c, f in freq.items()}
        shared = [c for c in configs if c != "uniform"]
        shared_top = max([float(freq[c].max()) for c in shared] or [100.0]) or 1.0
        for ax, config in zip(axes[r], configs):
            top = shared_top if config in shared else (float(freq[config].max()) or 100.0)
            _grid_map(ax, freq[config], "rocket_r", "kept in % of samples", vmin=0, vmax=top)
            scale = "shared" if config in shared else "own"
            head = _method_label(config) if where == "grid" else f"{_method_label(config)}: base tile"
            ax.set_title(f"{head}\n{scale} scale 0-{top:.0f}% (flat: {flat:.1f}%)", fontsize=9)
            ax.set_xlabel("image column (patch)" if where == "grid" else "base-tile column")
            ax.set_ylabel("image row (patch)" if where == "grid" else "base-tile row")
    rows, cols = next(iter(grid.values())).shape
    n_all = sel["sample_id"].n_unique()
    base_note = f"; below: the {base[configs[0]].shape[0]} x {base[configs[0]].shape[0]} base tile ({n_base} samples)" \
        if base else ""
    fig.suptitle(f"Keep frequency per image patch (keep {keep}, K={layer}; the {rows} x {cols} grid of {n_grid} of "
                 f"{n_all} samples{base_note})\none colour scale shared by all methods but uniform, which has its own")
    fig.tight_layout()
    return fig


MARK = {True: "\u2713", False: "\u2717"}  # check mark / ballot x
KEPT_FILL = (0.0, 0.9, 1.0, 0.35)          # translucent cyan inside each kept token
KEPT_EDGE = (0.0, 0.9, 1.0, 1.0)           # bright cyan outline over a black one: visible on any background
BASE_EDGE = (1.0, 0.55, 0.0, 1.0)          # orange dashed outline: a kept anyres base-tile token


def _load_image(path) -> np.ndarray | None:
    """float RGB ``[H, W, 3]`` in [0, 1], or None where the file is gone or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=float) / 255
    except (OSError, ValueError, TypeError):
        return None


def _correctness(predictions: pl.DataFrame | None, layer: int, keeps) -> dict:
    """``{(sample_id, config, keep): (correct, prediction)}`` of eval's answers at ``layer``
    (the ``full`` control under its own keep N)."""
    if predictions is None:
        return {}
    p = predictions.filter(pl.col("agg_layer") == layer,
                           pl.col("keep").is_in(list(keeps)) | (pl.col("config") == "full"))
    return {(s, c, k): (bool(ok), pred) for s, c, k, ok, pred in
            p.select("sample_id", "config", "keep", "correct", "prediction").iter_rows()}


def example_sample_ids(samples: pl.DataFrame, n: int = 3, predictions: pl.DataFrame | None = None,
                       configs: list[str] | None = None, keep: int | None = None,
                       agg_layer: int | None = None) -> list[int]:
    """``n`` samples with different images: first those where the shown configurations at
    ``keep`` disagree (some answer right, some wrong), one per category while categories
    last, then the rest in sample order."""
    ids = samples["sample_id"].to_list()
    image = dict(zip(ids, samples["image"].to_list()))
    category = dict(zip(ids, samples["category"].to_list())) if "category" in samples.columns else {}
    mixed: set[int] = set()
    if predictions is not None and configs and keep is not None:
        p = predictions.filter(pl.col("config").is_in(configs), pl.col("keep") == keep)
        if agg_layer is not None:
            p = p.filter(pl.col("agg_layer") == agg_layer)
        agg = p.group_by("sample_id").agg(pl.col("correct").cast(pl.Int64).sum().alias("ok"), pl.len().alias("n"))
        mixed = set(agg.filter((pl.col("ok") > 0) & (pl.col("ok") < pl.col("n")))["sample_id"].to_list())
    order = [s for s in ids if s in mixed] + [s for s in ids if s not in mixed]
    chosen: list[int] = []
    for need_new_category in (True, False):
        for s in order:
            if len(chosen) == n:
                return chosen
            if s in chosen or image[s] in {image[c] for c in chosen}:
                continue
            if need_new_category and category.get(s) in {category.get(c) for c in chosen}:
                continue
            chosen.append(s)
    return chosen


def _draw_image_with_tokens(ax, image: np.ndarray | None, size: tuple[int, int], boxes, geometry,
                            extent: str = "crop", base_boxes=None):
    """The original image; for a grid over the processor's crop (``extent="crop"``) what the
    crop drops greyed out (dashed line: the crop); each kept grid token (``boxes``, original
    pixels) a cyan box with a black outline, each kept base-tile token (``base_boxes``) an
    orange dashed outline."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    w, h = size
    x0, y0, x1, y1 = image_grid.crop_box(w, h, geometry) if extent == "crop" else (0, 0, w, h)
    if image is not None:
        cols = (np.arange(w) + 0.5 < x0) | (np.arange(w) + 0.5 > x1)
        rows = (np.arange(h) + 0.5 < y0) | (np.arange(h) + 0.5 > y1)
        outside = rows[:, None] | cols[None, :]
        shown = image.copy()
        if outside.any():  # grey wash: still recognisable, clearly not what the model saw
            lum = shown[outside].mean(-1, keepdims=True)
            shown[outside] = 0.62 + 0.25 * (lum - 0.5)
        ax.imshow(shown, extent=(0, w, h, 0), interpolation="nearest")
    else:
        ax.add_patch(Rectangle((0, 0), w, h, facecolor="0.85", edgecolor="none"))
        ax.text(w / 2, h / 2, "image not found", ha="center", va="center", fontsize=8, color="0.3")
    if (x0, y0, x1, y1) != (0, 0, w, h):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black", linewidth=1.6,
                               linestyle="--", label="model crop"))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=0.8,
                               linestyle="--"))
    ax.set_xlim(min(0.0, x0), max(float(w), x1))
    ax.set_ylim(max(float(h), y1), min(0.0, y0))
    ax.set_facecolor("black")  # where the crop reaches past the image the processor padded (black)
    if boxes is not None and len(boxes):
        rects = [Rectangle((bx0, by0), bx1 - bx0, by1 - by0) for bx0, by0, bx1, by1 in boxes]
        ax.add_collection(PatchCollection(rects, facecolor=KEPT_FILL, edgecolor="black", linewidth=2.2,
                                          label="kept tokens"))
        ax.add_collection(PatchCollection([Rectangle(r.get_xy(), r.get_width(), r.get_height()) for r in rects],
                                          facecolor="none", edgecolor=KEPT_EDGE, linewidth=0.9))
    if base_boxes is not None and len(base_boxes):
        rects = [Rectangle((bx0, by0), bx1 - bx0, by1 - by0) for bx0, by0, bx1, by1 in base_boxes]
        ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="black", linewidth=3.0))
        ax.add_collection(PatchCollection([Rectangle(r.get_xy(), r.get_width(), r.get_height()) for r in rects],
                                          facecolor="none", edgecolor=BASE_EDGE, linewidth=2.0, linestyle="--",
                                          label="kept base-tile tokens"))
    ax.set_xticks([])
    ax.set_yticks([])


def kept_boxes(kept, layout, size: tuple[int, int], geometry, architecture: str = "LlavaForConditionalGeneration"):
    """Where a sample's kept tokens came from, in original pixels: ``(grid boxes, base-tile
    boxes, off)`` with ``off`` the kept tokens drawn in neither (newlines, unplaced tiles)."""
    kept = np.asarray(kept, dtype=np.int64)
    w, h = size
    cells = layout.cells[kept]
    grid = cell_boxes(cells[cells >= 0], layout.rows, layout.cols, w, h, geometry, grid_extent(architecture)) \
        if layout.rows else np.zeros((0, 4))
    side = base_tile(layout, architecture)
    in_base = kept[kept < side * side]
    base = cell_boxes(in_base, side, side, w, h, geometry, "image") if side else np.zeros((0, 4))
    return grid, base, int(kept.size - len(grid) - len(base))


def plot_examples(selections: pl.DataFrame, samples: pl.DataFrame, n_examples: int = 3, keep: int | None = None,
                  agg_layer: int | None = None, predictions: pl.DataFrame | None = None,
                  geometry: image_grid.ImageGeometry | None = None, sample_ids: list[int] | None = None,
                  architecture: str = "LlavaForConditionalGeneration"):
    """A few images (a different image per row), each method's kept tokens drawn on the original
    image where the processor really took them from, on each sample's own token grid
    (:func:`kept_boxes`): kept tokens as cyan boxes with a black outline, kept anyres
    base-tile tokens as orange dashed outlines (the base tile is the whole image at a coarser
    grid), the region the center crop drops greyed out (dashed line: the crop). The first
    column is the ``full`` control (every token kept: no boxes). Each panel title says whether
    that configuration answered right (check) or wrong (x) and what it said."""
    sel, layer, keep, configs = one_config_per_method(selections, keep, agg_layer)
    geometry = geometry or image_grid.DEFAULT_GEOMETRY
    layouts = _layouts(samples, sel)
    ids = sample_ids if sample_ids is not None else example_sample_ids(samples, n_examples, predictions, configs,
                                                                         keep, layer)
    answers = _correctness(predictions, layer, [keep])
    columns = ["full"] + configs
    sizes, images = {}, {}
    for sid in ids:
        row = samples.filter(pl.col("sample_id") == sid).row(0, named=True)
        images[sid] = _load_image(row["image"])
        sizes[sid] = ((images[sid].shape[1], images[sid].shape[0]) if images[sid] is not None
                      else (geometry.crop_width, geometry.crop_height))
    ratios = [min(1.5, max(0.65, sizes[s][1] / sizes[s][0])) for s in ids] or [1.0]
    fig, axes = _figure(width=3.0 * len(columns), height=sum(2.9 * r + 0.7 for r in ratios),
                        ncols=len(columns), nrows=max(1, len(ids)), gridspec_kw={"height_ratios": ratios})
    extent = grid_extent(architecture)
    for r, sid in enumerate(ids):
        row = samples.filter(pl.col("sample_id") == sid).row(0, named=True)
        w, h = sizes[sid]
        layout = layouts[int(sid)]
        n_tokens = layout.n_tokens
        for c, config in enumerate(columns):
            ax = axes[r, c]
            boxes = base = None
            off = 0
            if config != "full":
                k = sel.filter(pl.col("sample_id") == sid, pl.col("config") == config)["kept"]
                kept = np.asarray(k[0], dtype=int) if k.len() else np.zeros(0, dtype=int)
                boxes, base, off = kept_boxes(kept, layout, (w, h), geometry, architecture)
            _draw_image_with_tokens(ax, images[sid], (w, h), boxes, geometry, extent, base)
            label = f"full (all {n_tokens})" if config == "full" else _method_label(config)
            answer = answers.get((sid, config, n_tokens if config == "full" else keep))
            if answer is None and config == "full":
                answer = next((v for (s, cf, _), v in answers.items() if s == sid and cf == "full"), None)
            note = f"\n+{off} kept off the image (newlines / tiles)" if off else ""
            if answer is None:
                ax.set_title(label + note, fontsize=9)
            else:
                ok, pred = answer
                ax.set_title(f"{label} {MARK[ok]} {str(pred)[:14]!r}{note}", fontsize=9,
                             color="#1a7f37" if ok else "#c62828")
            if c == 0:
                cropped = extent == "crop" and (w, h) != (geometry.crop_width, geometry.crop_height)
                grid = f"{layout.rows} x {layout.cols} grid" if layout.rows else "no grid"
                shape = f"{w}x{h} image, {grid}" + (", grey = cropped" if cropped else "")
                ax.set_ylabel(f"#{sid} {row.get('category') or ''}: {row['question'][:26]}\n"
                              f"answer: {str(row['answer'])[:20]}\n{shape}", fontsize=7.5)
    counts = sorted({layouts[int(s)].n_tokens for s in ids})
    of = f"of {counts[0]}" if len(counts) == 1 else "of each image's N"
    source = "" if not geometry.is_fallback or extent != "crop" else \
        " [processor config not found: LLaVA-1.5 defaults assumed]"
    base_note = "; orange dashed: kept base-tile tokens (the whole image, coarser)" if any(
        base_tile(layouts[int(s)], architecture) for s in ids) else ""
    crop_note = "; grey: cropped away by the processor" if extent == "crop" else ""
    fig.suptitle(f"Kept tokens (cyan boxes) at keep {keep} {of}, K={layer}; first column: full control\n"
                 f"\u2713/\u2717: that configuration's answer right/wrong{crop_note}{base_note}{source}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_relations(relations: pl.DataFrame):
    """Left: within-sample correlation of each statistic with correctness, pooled over pruned
    configurations (permutation p, Holm-adjusted). Right: accuracy by quartile of the
    overlap with avg_all_heads, one line per configuration at the smallest keep, one hue per
    method (:func:`config_colors`), the legend beside the panel."""
    fig, axes = _figure(width=16, height=5.2, ncols=2, gridspec_kw={"width_ratios": [1, 1.05]})
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
        for config in _ordered(rows):  # one hue per method, shades within; legend outside, in method order
            row = rows[config]
            y = [np.nan if row[c] is None else 100 * row[c] for c in q_cols]
            rho = "" if row["spearman_rho"] is None else f": rho {row['spearman_rho']:+.2f}, p_holm {row['p_holm']:.1e}"
            control = _base_method(config) in ("random", "uniform")
            ax.plot(range(1, len(q_cols) + 1), y, marker="o", markersize=4, color=colors[config],
                    linestyle="--" if control or "@" in config else "-", linewidth=1.3,
                    label=f"{_method_label(config)}{rho}")
        ax.set_title(f"Accuracy by quartile of Jaccard with avg_all_heads (keep {keep}, K={layer})", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), title=f"{len(rows)} configurations "
                  "(one hue per method)", title_fontsize=7)
    ax.set_xticks(range(1, len(q_cols) + 1))
    ax.set_xlabel("quartile of the statistic over samples (1 = lowest)")
    ax.set_ylabel("accuracy of the pruned model (%)")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    return fig


def _grid_map(ax, values: np.ndarray, cmap: str, label: str, vmin: float | None = None, vmax: float | None = None):
    """A token-grid map (rows x cols) with its own colour bar; ticks every quarter (imshow:
    seaborn's heatmap redraws the whole figure per call, slow on a many-panel figure)."""
    rows, cols = values.shape
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, extent=(0, cols, rows, 0), interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, shrink=0.7, label=label)
    ax.set_xticks(np.arange(0, cols, _tick_step(cols)) + 0.5, [str(t) for t in range(0, cols, _tick_step(cols))])
    ax.set_yticks(np.arange(0, rows, _tick_step(rows)) + 0.5, [str(t) for t in range(0, rows, _tick_step(rows))])
    ax.grid(False)


def attention_sample_ids(predictions: pl.DataFrame | None, samples: pl.DataFrame, n: int = 3,
                         agg_layer: int | None = None) -> list[tuple[int, str]]:
    """Samples worth a look at their attention, with why: first one the pruned ``avg_all_heads``
    at the smallest keep > 0 answers wrong and the ``full`` control right, then one both answer
    right, then another pruned-wrong one (of another category where there is one); different
    images. Without eval: the first samples with different images."""
    if predictions is None or predictions.filter(pl.col("method") == "avg_all_heads").height == 0:
        return [(s, "") for s in example_sample_ids(samples, n)]
    avg = predictions.filter(pl.col("method") == "avg_all_heads")
    layer = agg_layer if agg_layer is not None else avg["agg_layer"].min()
    p = predictions.filter(pl.col("agg_layer") == layer)
    keep = p.filter(pl.col("method") == "avg_all_heads", pl.col("keep") > 0)["keep"].min()
    pruned = dict(p.filter(pl.col("config") == "avg_all_heads", pl.col("keep") == keep)
                  .select("sample_id", "correct").iter_rows())
    full = dict(p.filter(pl.col("config") == "full").select("sample_id", "correct").iter_rows())
    ids = samples["sample_id"].to_list()
    image = dict(zip(ids, samples["image"].to_list()))
    category = dict(zip(ids, samples["category"].to_list())) if "category" in samples.columns else {}
    lost = [s for s in ids if pruned.get(s) is False and full.get(s) is True]
    kept_right = [s for s in ids if pruned.get(s) is True and full.get(s) is True]
    why_lost = f"avg_all_heads keep {keep} \u2717, full \u2713"
    why_right = f"avg_all_heads keep {keep} \u2713, full \u2713"
    chosen: list[tuple[int, str]] = []

    def take(pool, why, new_category=False):
        for s in pool:
            if any(image[s] == image[c] for c, _ in chosen):
                continue
            if new_category and any(category.get(s) == category.get(c) for c, _ in chosen):
                continue
            chosen.append((s, why))
            return True
        return False

    take(lost, why_lost)
    take(kept_right, why_right)
    take(lost, why_lost, new_category=True) or take(lost, why_lost)
    for s in ids:  # too few of either kind: fill with the first other images
        if len(chosen) >= n:
            break
        take([s], "")
    return chosen[:n]


def _attention_panels(att, layout, architecture: str, max_heads: int):
    """The maps of one sample's ``[H, N]`` attention: ``[(title, [rows, cols] map or None), ...]``
    — the head mean on the grid, on the anyres base tile where there is one, then each head
    on the grid (the max head marked); cells no token covers are NaN (drawn blank)."""
    from .strategies import head_importance, max_head_index

    top = int(max_head_index(head_importance(att)))
    heads = list(range(min(att.shape[0], max_heads)))
    if top not in heads:
        heads[-1] = top
    att = att.numpy() if hasattr(att, "numpy") else np.asarray(att)
    on = np.flatnonzero(layout.cells >= 0)
    side = base_tile(layout, architecture)

    def on_grid(a):
        m = np.full(layout.rows * layout.cols, np.nan)
        m[layout.cells[on]] = a[on]
        return m.reshape(layout.rows, layout.cols)

    mean = att.mean(0)
    off = float(mean[layout.cells < 0].sum() / max(mean.sum(), 1e-30))
    note = f"\n({100 * off:.0f}% of it off the grid)" if (layout.cells < 0).any() else ""
    panels = [(f"mean over heads{note}", on_grid(mean))]
    if side:
        panels.append(("mean over heads: base tile", mean[: side * side].reshape(side, side)))
    panels += [(f"head {h}{' (max head)' if h == top else ''}", on_grid(att[h])) for h in heads]
    return panels


def _model_view_panel(ax, path, layout, geometry, extent: str):
    """The image as the model saw it, on the grid's coordinates: the processor's crop
    (``extent="crop"``) or the whole image resized to the grid."""
    rows, cols = layout.rows, layout.cols
    try:
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
            view = np.asarray(image_grid.model_view(im, geometry) if extent == "crop" else im.convert("RGB"))
        ax.imshow(view, extent=(0, cols, rows, 0), interpolation="bilinear", aspect="equal")
        what = f"{view.shape[1]}x{view.shape[0]} crop" if extent == "crop" else f"{rows} x {cols} grid"
        ax.set_title(f"image as the model saw it\n({size[0]}x{size[1]} -> {what})", fontsize=9)
    except (OSError, ValueError, TypeError):
        ax.text(0.5, 0.5, "image not found", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("image (not found)", fontsize=9)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks(np.arange(0, cols, _tick_step(cols)) + 0.5, [str(t) for t in range(0, cols, _tick_step(cols))])
    ax.set_yticks(np.arange(0, rows, _tick_step(rows)) + 0.5, [str(t) for t in range(0, rows, _tick_step(rows))])
    ax.grid(False)
    ax.set_xlabel("image column (patch)")


def plot_sample_attention(run_dir: str | Path, sample_id: int | list, agg_layer: int | None = None,
                          max_heads: int = 8, geometry: image_grid.ImageGeometry | None = None,
                          reasons: list[str] | None = None):
    """Samples' last-token attention at layer K-1 on each sample's own image-token grid, one
    row per sample: the image as the model saw it (the processor's center crop for LLaVA-1.5,
    the whole image for the families whose grid spans it, so its grid lines up with the maps),
    the head mean (what avg_all_heads ranks; anyres runs add it on the base tile) and each head
    (the max head marked), from the cached run. ``sample_id`` is one id or a list; each map
    has its own colour scale (attention in % of the last token's row). None when capture
    recorded no layer K > 0 or no chosen sample lies on a grid."""
    from .store import open_run

    run = open_run(run_dir)
    layers = [k for k in run.agg_layers if k > 0]
    if agg_layer is None and not layers:
        return None  # K = 0 only: capture records no attention
    layer = agg_layer if agg_layer is not None else layers[0]
    geometry = geometry or image_grid.load_geometry(run.config.get("model"))
    architecture = run.config.get("architecture") or "LlavaForConditionalGeneration"
    extent = grid_extent(architecture)
    ids = [int(sample_id)] if isinstance(sample_id, (int, np.integer)) else [int(s) for s in sample_id]
    reasons = dict(zip(ids, list(reasons or [""] * len(ids))))
    layouts = _layouts(run.samples)
    ids = [s for s in ids if layouts[s].rows > 0]
    if not ids:
        return None
    rows = [(sid, _attention_panels(run.last_token_attention(sid, layer), layouts[sid], architecture, max_heads))
            for sid in ids]
    ncols = 1 + max(len(p) for _, p in rows)
    fig, axes = _figure(width=3.3 * ncols, height=3.7 * len(rows), ncols=ncols, nrows=len(rows))
    for r, (sid, panels) in enumerate(rows):
        row = run.samples.filter(pl.col("sample_id") == sid).row(0, named=True)
        _model_view_panel(axes[r, 0], row["image"], layouts[sid], geometry, extent)
        why = f"\n[{reasons[sid]}]" if reasons.get(sid) else ""
        axes[r, 0].set_ylabel(f"#{sid}: {row['question'][:32]}\nfull model {row['prediction']!r}, reference "
                              f"{row['answer']!r}{why}", fontsize=8)
        for c, (title, a) in enumerate(panels, start=1):
            ax = axes[r, c]
            _grid_map(ax, 100 * a, "viridis", "attention (% of the row)")
            ax.set_title(title, fontsize=9)
            base = title.endswith("base tile")
            ax.set_xlabel("base-tile column" if base else "image column (patch)")
            ax.set_ylabel("base-tile row" if base else "image row (patch)")
        for c in range(1 + len(panels), ncols):
            axes[r, c].axis("off")
    if len(rows) == 1:
        row = run.samples.filter(pl.col("sample_id") == ids[0]).row(0, named=True)
        fig.suptitle(f"Sample {ids[0]}: last-token attention to the image at layer {layer - 1} "
                     f"(\"{row['question'][:40]}\" -> {row['prediction']!r}, reference {row['answer']!r})")
    else:
        fig.suptitle(f"Last-token attention to the image at layer K-1={layer - 1}, per head, next to the image "
                     f"(each map its own colour scale)")
    fig.tight_layout()
    return fig


def _sci(col: str) -> pl.Expr:
    """A p-value column as text in scientific notation ("" where there is no test)."""
    return pl.col(col).map_elements(lambda p: f"{p:.2e}", return_dtype=pl.Utf8).fill_null("").alias(col)


def paired_p(accuracy: pl.DataFrame, reference: str) -> str:
    """The p column a table shows against ``reference`` (full / avg / random): the exact
    test over units (copies of one item count once; McNemar's p when every unit is one
    sample), or McNemar's where eval predates it."""
    unit = f"unit_p_vs_{reference}"
    return unit if unit in accuracy.columns else f"mcnemar_p_vs_{reference}"


def main_numbers(accuracy: pl.DataFrame) -> pl.DataFrame:
    """The headline table: accuracy per method and keep (weighted at its alpha nearest 0.5),
    its interval, n samples and n units, the change vs the full control, exact paired
    p-values (:func:`paired_p`) vs full and vs avg_all_heads with their Holm adjustment over
    the whole table, and FLOPs."""
    alpha = _primary_alpha(accuracy)
    acc = accuracy.filter(_primary_only(alpha))
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
                      _sci(p_full), _sci(f"{p_full}_holm"), _sci(p_avg), _sci(f"{p_avg}_holm"),
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


def configure_tables(max_rows: int = 100) -> None:
    """polars display for the report: whole strings (no truncated config names), no dtype row,
    no shape line, every column."""
    pl.Config.set_fmt_str_lengths(200)
    pl.Config.set_tbl_hide_column_data_types(True)
    pl.Config.set_tbl_hide_dataframe_shape(True)
    pl.Config.set_tbl_rows(max_rows)
    pl.Config.set_tbl_cols(-1)


def _attention_examples(t: RunTables):
    if why_missing("sample_attention", t):
        return None
    ids = [s for s, lay in _layouts(t.samples).items() if lay.rows > 0]
    on_grid = t.samples.filter(pl.col("sample_id").is_in(ids))
    preds = None if t.predictions is None else t.predictions.filter(pl.col("sample_id").is_in(ids))
    picks = attention_sample_ids(preds, on_grid, n=3)
    return plot_sample_attention(t.root, [s for s, _ in picks], geometry=t.geometry, reasons=[w for _, w in picks])


FIGURES = {
    "accuracy_vs_keep": lambda t: plot_accuracy_vs_keep(t.accuracy),
    "accuracy_vs_alpha": lambda t: plot_accuracy_vs_alpha(t.accuracy, t.num_heads),
    "category_accuracy": lambda t: plot_category_accuracy(t.predictions),
    "cost": lambda t: plot_cost(t.accuracy),
    "overlap_heatmap": lambda t: plot_overlap_heatmap(t.overlap_summary, n_tokens=sample_token_counts(t)),
    "head_statistics": lambda t: plot_head_statistics(t.heads, t.num_heads),
    "keep_frequency": lambda t: None if why_missing("keep_frequency", t) else plot_keep_frequency(
        t.selections, samples=t.samples, architecture=t.architecture),
    "examples": lambda t: None if why_missing("examples", t) else plot_examples(
        t.selections, t.samples, predictions=t.predictions, geometry=t.geometry, architecture=t.architecture),
    "sample_attention": _attention_examples,
    "relations": lambda t: plot_relations(t.relations),
    "object_coverage": lambda t: plot_object_coverage(t.predictions),
    "positional_bias": lambda t: plot_positional_bias(t.selections, t.samples),
    "attention_sinks": lambda t: _sinks_figure(t),
    "query_choice": lambda t: plot_query_choice(query_agreement(t.overlap_summary, t.accuracy,
                                                                n_tokens=n_image_tokens(t))),
    "layer_dynamics": lambda t: plot_layer_dynamics(run_layer_dynamics(t), n_tokens=n_image_tokens(t)),
}
NEEDS = {"accuracy_vs_keep": "accuracy", "accuracy_vs_alpha": "accuracy", "category_accuracy": "predictions",
         "cost": "accuracy", "overlap_heatmap": "overlap_summary", "head_statistics": "heads",
         "keep_frequency": "selections", "examples": "selections", "sample_attention": "selections",
         "relations": "relations", "object_coverage": "predictions", "positional_bias": "selections",
         "attention_sinks": "heads", "query_choice": "overlap_summary", "layer_dynamics": "selections"}


def _base_method(config: str) -> str:
    return config.split(" then ")[0].split("@")[0].split("(")[0]


def config_colors(configs) -> dict[str, tuple]:
    """One hue family per method (:data:`PALETTE`), one shade per configuration within it:
    weighted_combination's alphas from light (alpha 0) to dark (alpha 1), query variants and
    schedules lighter than their method's own configuration; methods in METHOD_ORDER first."""
    from matplotlib.colors import to_rgb

    groups: dict[str, list[str]] = {}
    for config in configs:
        groups.setdefault(_base_method(config), []).append(config)
    def shade(base, t):  # mix with white (t < 0) or black (t > 0)
        return tuple(np.clip(base + (1 - base) * -t if t < 0 else base * (1 - t), 0, 1))

    out = {}
    for method, members in groups.items():
        base = np.array(to_rgb(PALETTE.get(method, "0.4")))
        plain = sorted(c for c in members if "@" not in c and " then " not in c)
        variants = sorted(c for c in members if c not in plain)
        steps = np.linspace(-0.5, 0.4, len(plain)) if len(plain) > 1 else [0.0]
        out.update({c: shade(base, t) for c, t in zip(plain, steps)})
        out.update({c: shade(base, -0.3 - 0.3 * i / max(len(variants) - 1, 1)) for i, c in enumerate(variants)})
    return out


def _ordered(configs) -> list[str]:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(configs, key=lambda c: (rank.get(_base_method(c), len(rank)), _base_method(c), c))


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
    configs = _ordered(summary["config"].unique().to_list())
    colors = config_colors(configs)
    fig, axes = _figure(width=6.2 * 2 + 3.2, height=4.8, ncols=2)
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
                      markeredgewidth=0.4, label=_method_label(c)) for c in configs]
    handles += [Line2D([], [], marker=markers[k], linestyle="", color="black", markerfacecolor="none",
                       label=f"keep {k}") for k in keeps]
    fig.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
               title=f"{len(configs)} configurations\n(one hue per method)", title_fontsize=8)
    axes[0, 0].set_title(f"Objects touched vs accuracy (K={layer}, one marker per configuration and keep)")
    axes[0, 1].set_title("Kept tokens on objects vs accuracy")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# Analyses as report sections (issue 15.5). Each is a pure function of tables or tensors
# (data in, table or figure out); the few that read the run's stored tensors have a loader
# beside them, and :func:`why_missing` gives the one line a section shows when the run
# lacks its inputs (an older run, a capture without that --store option, no eval).
# ----------------------------------------------------------------------------------------

POSITION_CONFIGS = ("avg_all_heads", "no_rope", "random", "uniform")
"""What the positional-bias section compares: FastV's ranking, the same ranking of rows
computed without RoPE (FEATHER's diagnosis: RoPE's long-term decay makes the last prompt
token favour late, i.e. bottom, image tokens) and the two position-blind controls."""

QUERY_VARIANTS = ("text_mean", "all_mean")
"""The query rows compared with FastV's last prompt token (strategies.QUERIES less ``last``)."""
QUERY_COLORS = {"last": PALETTE["avg_all_heads"], "text_mean": "#ff7f0e", "all_mean": "#2ca02c"}
SIGNIFICANCE = 0.05


def _smallest_keep(frame: pl.DataFrame) -> int | None:
    keeps = [k for k in frame["keep"].unique().to_list() if k > 0]
    return min(keeps) if keeps else None


def _config_color(config: str) -> str:
    return PALETTE.get(config.split("(")[0].split("@")[0], "0.4")


def strategy_configs(frame: pl.DataFrame) -> list[str]:
    """Every strategy's configuration on the last token's rows (no ``@query`` variants),
    weighted_combination at its alpha nearest 0.5; the original five methods first."""
    from .strategies import ALL_METHODS

    alpha = _primary_alpha(frame)
    configs = frame.filter(_primary_only(alpha))["config"].unique().sort().to_list()
    configs = [c for c in configs if "@" not in c and c != "full"]
    order = list(METHOD_ORDER) + [m for m in ALL_METHODS if m not in METHOD_ORDER]
    rank = {m: i for i, m in enumerate(order)}
    return sorted(configs, key=lambda c: (rank.get(c.split("(")[0], len(order)), c))


# -- 1. positional bias ---------------------------------------------------------------------


def kept_positions(selections: pl.DataFrame, samples: pl.DataFrame, configs=POSITION_CONFIGS,
                   keep: int | None = None, agg_layer: int | None = None):
    """Where the kept tokens sit: ``({config: (rows, cols)}, layer, keep)`` with ``rows`` /
    ``cols`` the cell centres of every kept on-grid token as fractions of its own sample's
    grid (``(row + 0.5) / grid_rows``: 0 = top / left, 1 = bottom / right; the grid from
    samples' ``token_cells``, so off-grid base-tile and newline tokens are left out), pooled
    over samples, at one layer and keep (default: the first layer, the smallest keep > 0)."""
    from .select import sample_layouts

    layer = agg_layer if agg_layer is not None else selections["agg_layer"].min()
    sel = selections.filter(pl.col("agg_layer") == layer)
    keep = keep if keep is not None else _smallest_keep(sel)
    sel = sel.filter(pl.col("keep") == keep, pl.col("config").is_in(list(configs)))
    layouts = sample_layouts(samples.filter(pl.col("sample_id").is_in(sel["sample_id"].unique().implode())))
    out = {}
    for (config,), d in sel.group_by(["config"], maintain_order=True):
        rows, cols = [np.zeros(0)], [np.zeros(0)]
        for sid, kept in d.select("sample_id", "kept").iter_rows():
            lay = layouts.get(int(sid))
            if lay is None or lay.rows == 0 or kept is None:
                continue
            cells = lay.cells[np.asarray(kept, dtype=np.int64)]
            r, c = np.divmod(cells[cells >= 0], lay.cols)
            rows.append((r + 0.5) / lay.rows)
            cols.append((c + 0.5) / lay.cols)
        out[config] = (np.concatenate(rows), np.concatenate(cols))
    return {c: out[c] for c in configs if c in out}, layer, keep


def _common_grid(samples: pl.DataFrame) -> tuple[int, int] | None:
    """(rows, cols) of the grid most samples have (None when no sample is on a grid)."""
    from .select import sample_layouts

    shapes = [(lay.rows, lay.cols) for lay in sample_layouts(samples).values() if lay.rows > 0]
    if not shapes:
        return None
    values, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    rows, cols = values[int(np.argmax(counts))]
    return int(rows), int(cols)


def position_profile(selections: pl.DataFrame, samples: pl.DataFrame, configs=POSITION_CONFIGS,
                     keep: int | None = None, agg_layer: int | None = None,
                     bins: tuple[int, int] | None = None) -> pl.DataFrame | None:
    """The distribution of kept tokens over normalised row and column position
    (:func:`kept_positions`): one row per (config, axis, bin) with the bin's centre and
    ``share``, the fraction of that configuration's kept on-grid tokens in the bin (each
    axis sums to 1). ``bins`` (rows, cols) defaults to the most common grid's rows and
    columns, at most 12 each (24 rows: two per bin, so a few hundred kept tokens still give
    a smooth line). None when nothing is on a grid."""
    positions, layer, keep = kept_positions(selections, samples, configs, keep, agg_layer)
    grid = _common_grid(samples)
    if grid is None or not any(r.size for r, _ in positions.values()):
        return None
    bins = bins or (min(grid[0], 12), min(grid[1], 12))
    out = []
    for config, (rows, cols) in positions.items():
        for axis, pos, n_bins in (("row", rows, bins[0]), ("column", cols, bins[1])):
            counts, edges = np.histogram(pos, bins=n_bins, range=(0.0, 1.0))
            share = counts / max(pos.size, 1)
            out += [{"agg_layer": layer, "keep": keep, "config": config, "axis": axis, "bin": i,
                     "centre": float((edges[i] + edges[i + 1]) / 2), "share": float(share[i])}
                    for i in range(n_bins)]
    return pl.DataFrame(out)


def position_summary(selections: pl.DataFrame, samples: pl.DataFrame, configs=POSITION_CONFIGS,
                     keep: int | None = None, agg_layer: int | None = None) -> pl.DataFrame | None:
    """Per configuration: samples, kept on-grid tokens, their mean row and column (fractions of
    each sample's grid, 0 = top / left, 0.5 = centred) and the share in the bottom half."""
    positions, layer, keep = kept_positions(selections, samples, configs, keep, agg_layer)
    sel = selections.filter(pl.col("agg_layer") == layer, pl.col("keep") == keep)
    rows = []
    for config, (r, c) in positions.items():
        rows.append({"agg_layer": layer, "keep": keep, "config": config,
                     "samples": sel.filter(pl.col("config") == config).height, "kept_on_grid": int(r.size),
                     "mean_row": round(float(r.mean()), 3) if r.size else float("nan"),
                     "mean_col": round(float(c.mean()), 3) if c.size else float("nan"),
                     "bottom_half_%": round(100 * float((r >= 0.5).mean()), 1) if r.size else float("nan")})
    return pl.DataFrame(rows) if rows else None


def plot_positional_bias(selections: pl.DataFrame, samples: pl.DataFrame, keep: int | None = None,
                         agg_layer: int | None = None, configs=POSITION_CONFIGS):
    """Positional bias: the distribution of kept tokens over normalised row (left) and column
    (right) position at the smallest keep, one line per configuration (its mean position in
    the legend), the flat level a position-blind strategy gives dotted. None without a grid."""
    profile = position_profile(selections, samples, configs, keep, agg_layer)
    if profile is None:
        return None
    summary = position_summary(selections, samples, configs, keep, agg_layer)
    layer, keep = int(profile["agg_layer"][0]), int(profile["keep"][0])
    present = [c for c in configs if c in profile["config"].unique().to_list()]
    fig, axes = _figure(width=13, height=5.6, ncols=2)
    for ax, axis, mean_col, where in zip(axes[0], ("row", "column"), ("mean_row", "mean_col"),
                                         ("0 = top, 1 = bottom", "0 = left, 1 = right")):
        d = profile.filter(pl.col("axis") == axis)
        n_bins = d["bin"].max() + 1
        # uniform's lattice puts all its tokens in a few bins: its peaks are cut off rather
        # than squashing the other lines flat
        top = 100 * float(d.filter(pl.col("config") != "uniform")["share"].max() or 1 / n_bins)
        top = max(top, 100 / n_bins) * 1.35
        for config in present:
            dd = d.filter(pl.col("config") == config).sort("bin")
            mean = summary.filter(pl.col("config") == config)[mean_col][0]
            label = f"{config} (mean {axis} {mean:.2f})"
            y = 100 * dd["share"].to_numpy()
            if config == "uniform" and y.max() > top:  # a lattice: markers at its bins, capped at the top
                hit = y > 0
                ax.plot(dd["centre"].to_numpy()[hit], np.minimum(y[hit], 0.96 * top), linestyle="none", marker="v",
                        markersize=8, color=_config_color(config),
                        label=f"{label}: lattice bins, {y.max():.0f}% each")
                continue
            control = config in ("random", "uniform")
            ax.plot(dd["centre"], y, marker="o", markersize=3, linewidth=1.2 if control else 2,
                    linestyle="--" if control else "-", color=_config_color(config), label=label)
        ax.axhline(100 / n_bins, color="black", linestyle=":", linewidth=1,
                   label=f"flat: {100 / n_bins:.1f}% per bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, top)
        ax.set_xlabel(f"{axis} position on the sample's own grid ({where})")
        ax.set_ylabel("kept on-grid tokens in this bin (%)")
        ax.set_title(f"Along the image's {axis}s ({n_bins} equal bins)", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)  # below: clear of the lines
    missing = [c for c in configs if c not in present]
    note = f"; not in this run: {', '.join(missing)}" if missing else ""
    n = int(summary["samples"].max())
    fig.suptitle(f"Where kept tokens sit: keep {keep}, K={layer}, {n} samples{note}")
    fig.tight_layout()
    return fig


# -- 2. attention sinks ---------------------------------------------------------------------


def sink_ratio() -> float:
    """The sink rule's ratio: a token whose hidden-state norm exceeds this multiple of its
    sample's median is a sink (select.SINK_RATIO, sink_excluded's default)."""
    from .select import SINK_RATIO

    return float(SINK_RATIO)


def sink_masks(run_dir: str | Path, agg_layer: int | None = None) -> dict[int, np.ndarray] | None:
    """``{sample_id: [N] bool}``: the attention sinks among each sample's image tokens at layer
    K-1 (default: the first K > 0), by the rule select's head statistics use
    (:func:`strategies.sink_mask` of the stored ``hidden_norm``, ratio :func:`sink_ratio`).
    None when capture did not store ``hidden_norm`` or recorded no layer K > 0."""
    from .store import open_run
    from .strategies import sink_mask

    run = open_run(run_dir)
    layers = [k for k in run.agg_layers if k > 0]
    if "hidden_norm" not in (run.config.get("store") or []) or not layers:
        return None
    layer = agg_layer if agg_layer is not None else layers[0]
    ratio = sink_ratio()
    out: dict[int, np.ndarray] = {}
    for _, d in run.samples.group_by(["n_image_tokens"]):  # one N per stack
        ids = d["sample_id"].to_list()
        for i in range(0, len(ids), 256):
            chunk = ids[i: i + 256]
            norms = run.inputs(layer, chunk, ["hidden_norm"])["hidden_norm"]
            out.update(zip(chunk, sink_mask(norms, ratio).numpy()))
    return out


def sink_keep_share(selections: pl.DataFrame, masks: dict[int, np.ndarray], agg_layer: int | None = None,
                    configs: list[str] | None = None) -> pl.DataFrame:
    """How often each strategy keeps the sinks: per (keep, config) at one layer, ``sinks`` (over
    the samples), ``kept_sinks`` (those in the kept set), ``share_kept`` = kept_sinks / sinks
    (null without sinks) and ``flat``, the mean keep / N a position- and norm-blind strategy
    keeps of them."""
    layer = agg_layer if agg_layer is not None else selections["agg_layer"].min()
    sel = selections.filter(pl.col("agg_layer") == layer, pl.col("keep") > 0)
    if configs is not None:
        sel = sel.filter(pl.col("config").is_in(list(configs)))
    rows = []
    for sid, config, keep, kept in sel.select("sample_id", "config", "keep", "kept").iter_rows():
        mask = masks.get(int(sid))
        if mask is None:
            continue
        rows.append((config, keep, int(mask.sum()), int(mask[np.asarray(kept, dtype=np.int64)].sum()),
                     keep / mask.size))
    frame = pl.DataFrame(rows, schema={"config": pl.Utf8, "keep": pl.Int64, "sinks": pl.Int64,
                                       "kept_sinks": pl.Int64, "flat": pl.Float64}, orient="row")
    return (frame.group_by("keep", "config").agg(pl.len().alias("samples"), pl.col("sinks").sum(),
                                                 pl.col("kept_sinks").sum(), pl.col("flat").mean())
            .with_columns(pl.when(pl.col("sinks") > 0).then(pl.col("kept_sinks") / pl.col("sinks"))
                          .otherwise(None).alias("share_kept"), pl.lit(layer, dtype=pl.Int64).alias("agg_layer"))
            .select("agg_layer", "keep", "config", "samples", "sinks", "kept_sinks", "share_kept", "flat")
            .sort(["keep", "config"], descending=[True, False]))


def sink_map(samples: pl.DataFrame, masks: dict[int, np.ndarray]):
    """Where sinks sit: ``(frequency [rows, cols], samples, off_grid)`` over the samples of the
    most common grid, ``frequency`` the fraction of them with a sink in each cell and
    ``off_grid`` how many of their sinks are off it (base tile, newline tokens). None when no
    sample with a mask is on a grid."""
    from .select import sample_layouts

    sub = samples.filter(pl.col("sample_id").is_in(list(masks)))
    grid = _common_grid(sub)
    if grid is None:
        return None
    freq = np.zeros(grid[0] * grid[1])
    n = off = 0
    for sid, lay in sample_layouts(sub).items():
        if (lay.rows, lay.cols) != grid:
            continue
        cells = lay.cells[np.asarray(masks[sid], dtype=bool)]
        n += 1
        off += int((cells < 0).sum())
        freq[np.unique(cells[cells >= 0])] += 1
    return freq.reshape(grid) / max(n, 1), n, off


def sink_note(masks: dict[int, np.ndarray] | None, heads: pl.DataFrame | None = None,
              agg_layer: int | None = None) -> str:
    """One line on the run's sinks: how many samples have any and how much attention they
    take, or that there are none (with the rule), or why the section cannot say."""
    ratio = sink_ratio()
    rule = (f"a token whose hidden-state norm entering layer K-1 exceeds {ratio:g}x its sample's median image-token "
            f"norm (strategies.sink_mask, select.SINK_RATIO = {ratio:g})")
    if masks is None:
        return ("No sink section: capture did not store the image tokens' hidden-state norms "
                "(capture with --store hidden_norm).")
    counts = np.array([int(m.sum()) for m in masks.values()])
    if counts.sum() == 0:
        return f"No attention sinks in this run's {len(counts)} samples: none has {rule}."
    mass = ""
    if heads is not None and "sink_mass" in heads.columns:
        h = heads.filter(pl.col("agg_layer") == (agg_layer if agg_layer is not None else heads["agg_layer"].min()))
        mass = (f"; they take {100 * h['sink_mass'].mean():.1f}% of the head-mean last-token image attention "
                f"on average (median {100 * h['sink_mass'].median():.1f}%)")
    with_sinks = counts[counts > 0]
    return (f"Attention sinks ({rule}) in {with_sinks.size} of {counts.size} samples, "
            f"{np.median(with_sinks):g} per sample with any (max {with_sinks.max()}){mass}.")


def plot_attention_sinks(heads: pl.DataFrame | None, masks: dict[int, np.ndarray], samples: pl.DataFrame,
                         selections: pl.DataFrame, agg_layer: int | None = None):
    """Attention sinks (:func:`sink_masks`), four panels: sinks per sample; the share of the
    head-mean last-token image attention they take (heads' ``sink_mass``, samples with a
    sink); where they sit on the most common grid; and the share of them each strategy keeps,
    per keep, against the flat keep / N. None when no sample has a sink."""
    import seaborn as sns

    counts = np.array([int(m.sum()) for m in masks.values()])
    if counts.sum() == 0:
        return None
    layer = agg_layer if agg_layer is not None else selections["agg_layer"].min()
    fig, axes = _figure(width=13, height=9.5, ncols=2, nrows=2)
    ax = axes[0, 0]
    if counts.max() <= 40:
        share = np.bincount(counts) / counts.size * 100
        ax.bar(np.arange(share.size), share, color="#e377c2", edgecolor="black", linewidth=0.5)
    else:
        sns.histplot(counts, ax=ax, bins=20, stat="percent", color="#e377c2")
    ax.set_xlabel("attention sinks among the sample's image tokens (count)")
    ax.set_ylabel("samples (%)")
    ax.set_title(f"Sinks per sample ({int((counts > 0).sum())} of {counts.size} samples have any)", fontsize=10)
    ax = axes[0, 1]
    if heads is not None and "sink_mass" in heads.columns:
        h = heads.filter(pl.col("agg_layer") == layer, pl.col("sink_count") > 0)
        mass = 100 * h["sink_mass"].to_numpy()
        sns.histplot(mass, ax=ax, bins=20, binrange=(0, 100), stat="percent", color="#e377c2")
        ax.set_title(f"Attention the sinks take ({h.height} samples with a sink; mean {mass.mean():.1f}%)",
                     fontsize=10)
        ax.set_xlim(0, 100)
    else:
        ax.text(0.5, 0.5, "select predates sink_mass (re-run select)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_title("Attention the sinks take", fontsize=10)
    ax.set_xlabel("sinks' share of the head-mean last-token image attention (%)")
    ax.set_ylabel("samples with a sink (%)")
    ax = axes[1, 0]
    where = sink_map(samples, masks)
    if where is not None:
        freq, n, off = where
        _grid_map(ax, 100 * freq, "rocket_r", "samples with a sink in this cell (%)", vmin=0)
        extra = f"; {off} sinks off the grid (base tile / newlines)" if off else ""
        ax.set_title(f"Where sinks sit ({n} samples on the {freq.shape[0]} x {freq.shape[1]} grid{extra})",
                     fontsize=10)
    else:
        ax.set_title("Where sinks sit (no sample on a grid)", fontsize=10)
    ax.set_xlabel("image column (patch)")
    ax.set_ylabel("image row (patch)")
    ax = axes[1, 1]
    share = sink_keep_share(selections, masks, layer, strategy_configs(selections))
    for config in strategy_configs(selections):
        d = share.filter(pl.col("config") == config).sort("keep")
        if d.height:
            control = config in ("random", "uniform")
            ax.plot(d["keep"], 100 * d["share_kept"], marker="o", linestyle="--" if control else "-",
                    color=_config_color(config), label=_method_label(config))
    flat = share.group_by("keep").agg(pl.col("flat").mean()).sort("keep")
    ax.plot(flat["keep"], 100 * flat["flat"], color="black", linestyle=":", label="flat: keep / N")
    ax.set_xscale("log", base=2)
    ax.set_xticks(flat["keep"].to_list(), [str(k) for k in flat["keep"].to_list()])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("image tokens kept after layer K (count, log scale)")
    ax.set_ylabel("sinks kept (% of all sinks)")
    ax.set_title("How often each strategy keeps the sinks", fontsize=10)
    ax.legend(fontsize=7, loc="best", ncols=2)
    fig.suptitle(f"Attention sinks at layer K-1={layer - 1}: image tokens with hidden-state norm > "
                 f"{sink_ratio():g}x the sample's median")
    fig.tight_layout()
    return fig


# -- 3. query choice --------------------------------------------------------------------------


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
    fig, axes = _figure(width=13, height=4.8, ncols=2)
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


# -- 4. layer dynamics ---------------------------------------------------------------------


def _mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and its 95% t interval (NaN bounds for fewer than two values)."""
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if values.size else float("nan")
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = float(student_t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return mean, mean - half, mean + half


def layer_dynamics(layer_attention, k: int, ref_layer: int) -> pl.DataFrame:
    """How the ranking moves through the layers. ``layer_attention``: per sample the last
    prompt token's image attention at every layer ``[L, H, N]`` (``Run.layer_attention``).
    Per layer l: ``jaccard``, the mean over samples of the Jaccard index between the top-``k``
    image tokens of the head-mean attention at l and at ``ref_layer`` (K-1, what FastV ranks
    by; 1 there by construction), and ``entropy``, the mean normalised entropy of the
    head-mean image attention renormalised over the image (0 = one token, 1 = flat), each
    with a 95% t interval over samples. Ties in the top-k go to the earlier token."""
    jaccards, entropies = [], []
    for att in layer_attention:
        a = np.asarray(att, dtype=np.float64).mean(axis=1)  # [L, N] head mean
        n = a.shape[1]
        top = np.argsort(-a, axis=1, kind="stable")[:, : min(k, n)]
        member = np.zeros(a.shape, dtype=bool)
        np.put_along_axis(member, top, True, axis=1)
        ref = member[ref_layer]
        jaccards.append((member & ref).sum(1) / (member | ref).sum(1))
        p = a / np.clip(a.sum(1, keepdims=True), 1e-30, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
        entropies.append(h / math.log(n) if n > 1 else np.zeros(a.shape[0]))
    jac, ent = np.array(jaccards), np.array(entropies)  # [S, L]
    rows = []
    for layer in range(jac.shape[1]):
        j, jl, jh = _mean_interval(jac[:, layer])
        e, el, eh = _mean_interval(ent[:, layer])
        rows.append({"layer": layer, "n": jac.shape[0], "jaccard": j, "jaccard_lo": jl, "jaccard_hi": jh,
                     "entropy": e, "entropy_lo": el, "entropy_hi": eh})
    return pl.DataFrame(rows).with_columns(pl.lit(k, dtype=pl.Int64).alias("k"),
                                           pl.lit(ref_layer, dtype=pl.Int64).alias("ref_layer"))


def run_layer_dynamics(t: RunTables, agg_layer: int | None = None, max_samples: int = 2000) -> pl.DataFrame | None:
    """:func:`layer_dynamics` of the run's stored per-layer attention (``--store layers``) with
    k = the run's smallest keep > 0 and the reference layer K-1 (K: the first agg layer > 0),
    over its first ``max_samples`` samples. None without per-layer attention."""
    if "layers" not in t.store or t.selections is None:
        return None
    layers = [k for k in t.selections["agg_layer"].unique().sort().to_list() if k > 0]
    keep = _smallest_keep(t.selections)
    if (agg_layer is None and not layers) or keep is None:
        return None
    key = ("layer_dynamics", agg_layer, max_samples)
    if key not in t.cache:
        from .store import open_run

        run = open_run(t.root)
        layer = agg_layer if agg_layer is not None else layers[0]
        ids = run.sample_ids[:max_samples]
        frame = layer_dynamics((run.layer_attention(s).numpy() for s in ids), keep, layer - 1)
        t.cache[key] = frame.with_columns(pl.lit(layer).alias("agg_layer"),
                                          pl.lit(len(run.sample_ids)).alias("samples_in_run"))
    return t.cache[key]


def plot_layer_dynamics(dynamics: pl.DataFrame | None, n_tokens: int | None = None):
    """Left: per layer, the mean Jaccard between its top-k image tokens (head mean) and layer
    K-1's, chance dotted (needs ``n_tokens``). Right: the mean normalised entropy of the
    head-mean image attention per layer. Bands: 95% intervals over samples."""
    if dynamics is None or dynamics.height == 0:
        return None
    d = dynamics.sort("layer")
    k, ref = int(d["k"][0]), int(d["ref_layer"][0])
    layer = int(d["agg_layer"][0]) if "agg_layer" in d.columns else ref + 1
    x = d["layer"].to_numpy()
    fig, axes = _figure(width=13, height=4.6, ncols=2)
    for ax, col, color, ylabel, title in (
            (axes[0, 0], "jaccard", "#1f77b4", "mean Jaccard with layer K-1's set",
             f"Top-{k} image tokens (head mean) at each layer vs at layer K-1={ref}"),
            (axes[0, 1], "entropy", "#d62728", "mean normalised entropy",
             "Spread of the head-mean image attention (0 = one token, 1 = flat)")):
        ax.plot(x, d[col], marker="o", color=color, label=f"mean over {int(d['n'][0])} samples")
        lo, hi = d[f"{col}_lo"].to_numpy(), d[f"{col}_hi"].to_numpy()
        if np.isfinite(lo).all():
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, label="95% interval")
        ax.axvline(ref, color="black", linestyle="--", linewidth=1, label=f"layer K-1={ref} (FastV ranks here)")
        ax.set_xticks(x)
        ax.set_xlabel("decoder layer (its last-token attention)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    if n_tokens:
        chance = chance_jaccard(n_tokens, k)
        axes[0, 0].axhline(chance, color="black", linestyle=":", linewidth=1,
                           label=f"chance ({chance:.3f}: two random {k}-subsets of {n_tokens})")
    axes[0, 0].set_ylim(0, 1.05)
    low = np.fmin(d["entropy_lo"].to_numpy(), d["entropy"].to_numpy())  # fmin: a NaN bound gives the mean
    axes[0, 1].set_ylim(max(0.0, float(np.nanmin(low)) - 0.05), 1.02)
    for ax in axes[0]:
        ax.legend(fontsize=8, loc="best")
    shown = int(d["n"][0])
    total = int(d["samples_in_run"][0]) if "samples_in_run" in d.columns else shown
    of = f" (first {shown} of {total} samples)" if shown < total else ""
    fig.suptitle(f"Layer dynamics of the last token's image attention (k = {k}, the run's smallest keep; "
                 f"K={layer}){of}")
    fig.tight_layout()
    return fig


# -- 5. what beats random where ---------------------------------------------------------------


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
    return table.with_columns(_sci("p_vs_random"), _sci("p_vs_random_holm"))


# -- 6. adaptive choice ---------------------------------------------------------------------


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
        "n_rule_only", "n_best_single_only", _sci(p), _sci("p_holm"), "rule",
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


# -- what each section needs ---------------------------------------------------------------


def run_sink_masks(t: RunTables) -> dict[int, np.ndarray] | None:
    """:func:`sink_masks` of the run behind ``t`` (read once; None without ``hidden_norm``)."""
    if "sinks" not in t.cache:
        t.cache["sinks"] = sink_masks(t.root) if "hidden_norm" in t.store else None
    return t.cache["sinks"]


def why_missing(name: str, t: RunTables) -> str | None:
    """The one line a section shows instead of its figure or table when the run lacks its
    inputs (None when it has them)."""
    if name in ("keep_frequency", "examples", "sample_attention"):
        return _spatial_missing(name, t)
    if name == "positional_bias":
        if t.selections is None or _smallest_keep(t.selections) is None:
            return "No positional-bias section: select has not run, or kept no pruned set (keep > 0)."
        if _common_grid(t.samples) is None:
            return "No positional-bias section: no sample's image tokens lie on a grid."
        return None
    if name == "attention_sinks":
        masks = run_sink_masks(t)
        if masks is None or not any(m.any() for m in masks.values()):
            return sink_note(masks, t.heads)
        return None
    if name == "query_choice":
        if t.overlap_summary is None or query_agreement(t.overlap_summary) is None:
            return ("No query-choice section: select compared no query variant (capture with --store "
                    "attention_text_mean,attention_all_mean, then select --queries last,text_mean,all_mean).")
        return None
    if name == "layer_dynamics":
        if "layers" not in t.store:
            return "No layer-dynamics section: capture did not store per-layer attention (capture with --store layers)."
        if run_layer_dynamics(t) is None:
            return "No layer-dynamics section: the run has no agg layer K > 0 or no pruned keep."
        return None
    if name == "beats_random":
        return None if beats_random(t.accuracy) is not None else beats_random_summary(None)
    if name == "adaptive":
        ready = t.oracle is not None and t.adaptive is not None and t.oracle.height and t.adaptive.height
        return None if ready else adaptive_note(t.oracle, t.adaptive)
    raise ValueError(f"unknown section {name!r}")


SPATIAL_TITLES = {"keep_frequency": "keep-frequency", "examples": "examples", "sample_attention": "attention-map"}


def _spatial_missing(name: str, t: RunTables) -> str | None:
    """Why a figure drawn on the samples' grids cannot be drawn (None when it can)."""
    what = f"No {SPATIAL_TITLES[name]} figure"
    if t.selections is None or t.samples is None or t.samples.height == 0:
        return f"{what}: select has not run."
    if name == "sample_attention":
        if not (t.selections["agg_layer"] > 0).any():
            return (f"{what}: capture recorded the attention of no layer K > 0 (agg layers "
                    f"{sorted(t.selections['agg_layer'].unique().to_list())}; capture with --agg-layers 2 or another "
                    "K > 0).")
    elif _smallest_keep(t.selections) is None:
        return f"{what}: select kept no pruned set (keep > 0)."
    if name != "examples" and not any(lay.rows > 0 for lay in _layouts(t.samples, t.selections).values()):
        return f"{what}: no sample's image tokens lie on a grid (their layout is unknown: capture predates layouts)."
    return None


def _sinks_figure(t: RunTables):
    masks = run_sink_masks(t)
    return None if masks is None else plot_attention_sinks(t.heads, masks, t.samples, t.selections)


def figure(name: str, tables: RunTables, save: bool = True):
    """Draw figure ``name`` from ``tables`` and save it as RUN/figures/<name>.png (None, and no
    PNG, where the run lacks its stage or has nothing to draw, e.g. no question categories)."""
    if getattr(tables, NEEDS[name]) is None:
        return None
    fig = FIGURES[name](tables)
    if save:
        import os

        out = tables.root / "figures"
        if fig is None:
            (out / f"{name}.png").unlink(missing_ok=True)  # a stale PNG would claim what this run lacks
            return None
        out.mkdir(exist_ok=True)
        tmp = out / f".{name}.tmp-{os.getpid()}.png"
        try:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
            os.replace(tmp, out / f"{name}.png")
        finally:
            tmp.unlink(missing_ok=True)
    return fig


def save_all(run_dir: str | Path) -> list[Path]:
    """Every figure the run's tables allow, as PNGs under RUN/figures/."""
    import matplotlib.pyplot as plt

    tables = load_tables(run_dir)
    written = []
    for name in FIGURES:
        fig = figure(name, tables)
        if fig is not None:
            written.append(tables.root / "figures" / f"{name}.png")
            plt.close(fig)
    return written


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "report.ipynb"
ERROR_LOG = "report-error.log"
# Lines the kernel process prints on every headless run that say nothing about the report:
# ipykernel's notice that the (local, loopback) ZMQ sockets are unencrypted, and the
# KeyboardInterrupt that jupyter_client's shutdown (interrupt, then shutdown request) can
# leave in the kernel's log. Every other line of the kernel's stderr is passed on.
KERNEL_NOISE = ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel")
REQUIRED = (("run.json", "capture"), ("samples.parquet", "capture"), ("select/selections.parquet", "select"),
            ("select/overlap_summary.parquet", "select"), ("select/heads.parquet", "select"))


class ReportError(ValueError):
    """The report could not be made; the message is one line (the CLI prints it as is)."""


def check_ready(run_dir: str | Path) -> Path:
    """Raise :class:`ReportError` naming what is missing unless ``run_dir`` has finished capture
    and select (eval is optional: its sections then say it has not run)."""
    root = Path(run_dir)
    if not (root / "run.json").exists():
        raise ReportError(f"{root} is not a run directory: {root / 'run.json'} is missing")
    for stage in ("capture", "select"):
        missing = [p for p, s in REQUIRED if s == stage and not (root / p).exists()]
        if missing:
            how = f"fastv-analyze select {root}" if stage == "select" else f"fastv-analyze capture ... --out {root}"
            raise ReportError(f"{root} has no finished {stage} stage: {', '.join(missing)} missing "
                              f"(run `{how}` first)")
    from .provenance import stale_stages
    from .store import open_run

    stale = stale_stages(open_run(root))
    if stale:  # accuracy of one grid beside overlap of another must never be shown together
        raise ReportError(next(iter(stale.values())))
    return root


def _kernel_manager_class(stderr):
    """A jupyter kernel manager whose kernel process writes its stderr to ``stderr`` (a file)."""
    from jupyter_client.manager import AsyncKernelManager

    class _CapturedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw.setdefault("stderr", stderr)
            return await super().start_kernel(**kw)

    return _CapturedKernelManager


def _read_kernel_stderr(stream) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().decode("utf-8", "replace").splitlines()


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def _one_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _source_cell_number(notebook: Path, source: str, executed_index: int) -> int:
    """1-based position of the failing cell in the notebook as written (papermill's index counts
    the parameters cell it injects)."""
    try:
        import nbformat

        cells = nbformat.read(notebook, as_version=4).cells
        return next(i for i, c in enumerate(cells, start=1) if c.source == source)
    except Exception:  # unreadable or not found: the executed notebook's position
        return int(executed_index) + 1


def _report_failure(root: Path, notebook: Path, err: BaseException, kernel_lines: list[str],
                    verbose: bool) -> ReportError:
    """Write RUN/report-error.log (the full traceback, the kernel's stderr) and return the one-line error."""
    import sys
    import time
    import traceback

    from .store import atomic_write_bytes

    log = root / ERROR_LOG
    if hasattr(err, "ename") and hasattr(err, "traceback"):  # papermill: a cell raised
        cell = f"cell {_source_cell_number(notebook, getattr(err, 'source', ''), err.cell_index)} of {notebook.name}"
        source = _one_line(getattr(err, "source", ""), 60)
        line = (f"report notebook failed in {cell} (`{source}`): {err.ename}: {_one_line(err.evalue)}"
                f" [full traceback: {log}, or rerun with --verbose]")
        detail = _strip_ansi("\n".join(err.traceback))
        detail = f"{cell} ({notebook}):\n{getattr(err, 'source', '')}\n\n{detail}"
    else:
        line = (f"report notebook could not run: {type(err).__name__}: {_one_line(err)}"
                f" [details: {log}, or rerun with --verbose]")
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    kernel_lines = [ln for ln in kernel_lines if not any(n in ln for n in KERNEL_NOISE)]
    text = (f"fastv-analyze report {root} failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{detail}\n"
            + ("\nkernel stderr:\n" + "\n".join(kernel_lines) + "\n" if kernel_lines else ""))
    atomic_write_bytes(log, text.encode("utf-8"))
    if verbose:
        print(text, file=sys.stderr)
    return ReportError(line)


def render(run_dir: str | Path, out: str | Path | None = None, notebook: str | Path | None = None,
           progress: bool = False, verbose: bool = False) -> Path:
    """Execute the report notebook headless on ``run_dir`` (papermill) and export HTML.

    Writes RUN/report.ipynb (executed), RUN/figures/*.png and the HTML report (images
    embedded, code hidden) to ``out`` (default RUN/report.html), via temporary names.
    Refuses (:class:`ReportError`, nothing written) a run without finished capture and select.
    A failing notebook raises :class:`ReportError` with one line naming the cell and its
    error, writes the full traceback to RUN/report-error.log (also printed with ``verbose``)
    and leaves no temporary file. The kernel's stderr is captured: its constant
    "running over TCP without encryption" notice is dropped, any other line passed on.
    """
    import os
    import sys
    import tempfile

    root = check_ready(run_dir)
    notebook = Path(notebook) if notebook is not None else NOTEBOOK
    if not notebook.exists():
        raise ReportError(f"report notebook {notebook} is missing (install fastv-analysis with `pip install -e .`)")
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    out = Path(out) if out else root / "report.html"
    executed = root / f".report.tmp-{os.getpid()}.ipynb"
    html_tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tempfile.TemporaryFile() as kernel_stderr:
            try:
                pm.execute_notebook(str(notebook), str(executed), parameters={"run_dir": str(root.resolve())},
                                    kernel_name="python3", progress_bar=progress, cwd=str(root),
                                    kernel_manager_class=_kernel_manager_class(kernel_stderr))
            except Exception as err:  # a cell raised, the kernel died or did not start
                raise _report_failure(root, notebook, err, _read_kernel_stderr(kernel_stderr), verbose) from None
            noise = [ln for ln in _read_kernel_stderr(kernel_stderr) if not any(n in ln for n in KERNEL_NOISE)]
            if noise:
                print("\n".join(noise), file=sys.stderr)
        os.replace(executed, root / "report.ipynb")
        exporter = HTMLExporter(template_name="lab")
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
        body, _ = exporter.from_notebook_node(nbformat.read(root / "report.ipynb", as_version=4))
        html_tmp.write_text(body, encoding="utf-8")
        os.replace(html_tmp, out)
    finally:
        executed.unlink(missing_ok=True)
        html_tmp.unlink(missing_ok=True)
    (root / ERROR_LOG).unlink(missing_ok=True)  # the last report worked: an older failure log is stale
    _write_provenance(root, out, notebook)
    return out


def _write_provenance(root: Path, html: Path, notebook: Path) -> None:
    """RUN/report.json: what the report was made from (stage files, fingerprints, versions)."""
    import json

    from .provenance import file_sha256, versions
    from .store import atomic_write_json

    config = json.loads((root / "run.json").read_text())
    inputs = [p for p in ("samples.parquet", "select/select.json", "eval/eval.json") if (root / p).exists()]
    atomic_write_json(root / "report.json", {
        "stage": "report",
        "notebook": str(notebook),
        "notebook_sha256": file_sha256(notebook),
        "html": str(html),
        "figures": sorted(p.name for p in (root / "figures").glob("*.png")),
        "inputs_sha256": {p: file_sha256(root / p) for p in inputs},
        "model_fingerprint": config.get("model_fingerprint"),
        "data_sha256": config.get("data_sha256"),
        "versions": versions(),
    })
