"""Section 6: which head is the max head, and how spread head importance is.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .style import new_figure


def plot_head_statistics(heads: pl.DataFrame, num_heads: int | None = None):
    """How often each head is the max head, and the spread of head-importance entropy, per layer."""
    import seaborn as sns

    fig, axes = new_figure(width=11, height=4.2, ncols=2)
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
