"""Section 5: overlap of kept sets between strategies, against the chance Jaccard of two
random subsets.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from .style import method_label, new_figure


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


def mean_chance_jaccard(n_tokens, keep=None, ratio: float | None = None) -> float:
    """The chance Jaccard of a run whose samples have different N: the mean over samples of
    :func:`chance_jaccard` of two random k_b-subsets of their own N_b (``n_tokens``: one N per
    sample, or one N for all), with k_b = ``keep``, or a ``ratio`` of N_b as select rounds it."""
    from ..select import ratio_keep

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
    from ..select import ratio_keep

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
    fig, axes = new_figure(width=(side + 1.0) * len(panels), height=side, ncols=len(panels))
    for ax, (keep, ratio, d, configs) in zip(axes[0], panels):
        m = np.eye(len(configs))
        idx = {c: i for i, c in enumerate(configs)}
        for a, b, j in d.select("config_a", "config_b", "jaccard_mean").iter_rows():
            if a in idx and b in idx:
                m[idx[a], idx[b]] = m[idx[b], idx[a]] = j
        suffix = "" if ratio is None else f" ratio {ratio:g}"
        labels = [method_label(c.removesuffix(suffix)) for c in configs]
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
