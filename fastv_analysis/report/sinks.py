"""Section 12: attention sinks (image tokens with outsized hidden-state norms), read from the
run, and how often each strategy keeps them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .configs import strategy_configs
from .grids import common_grid
from .style import grid_map, method_color, method_label, new_figure
from .tables import RunTables


def sink_ratio() -> float:
    """The sink rule's ratio: a token whose hidden-state norm exceeds this multiple of its
    sample's median is a sink (select.SINK_RATIO, sink_excluded's default)."""
    from ..select import SINK_RATIO

    return float(SINK_RATIO)


def sink_masks(run_dir: str | Path, agg_layer: int | None = None) -> dict[int, np.ndarray] | None:
    """``{sample_id: [N] bool}``: the attention sinks among each sample's image tokens at layer
    K-1 (default: the first K > 0), by the rule select's head statistics use
    (:func:`strategies.sink_mask` of the stored ``hidden_norm``, ratio :func:`sink_ratio`).
    None when capture did not store ``hidden_norm`` or recorded no layer K > 0."""
    from ..store import open_run
    from ..strategies import sink_mask

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
    from ..select import sample_layouts

    sub = samples.filter(pl.col("sample_id").is_in(list(masks)))
    grid = common_grid(sub)
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
    fig, axes = new_figure(width=13, height=9.5, ncols=2, nrows=2)
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
        grid_map(ax, 100 * freq, "rocket_r", "samples with a sink in this cell (%)", vmin=0)
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
                    color=method_color(config), label=method_label(config))
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


def run_sink_masks(t: RunTables) -> dict[int, np.ndarray] | None:
    """:func:`sink_masks` of the run behind ``t`` (read once; None without ``hidden_norm``)."""
    if "sinks" not in t.cache:
        t.cache["sinks"] = sink_masks(t.root) if "hidden_norm" in t.store else None
    return t.cache["sinks"]


def sinks_figure(t: RunTables):
    """:func:`plot_attention_sinks` of the run's sink masks (None without ``hidden_norm``)."""
    masks = run_sink_masks(t)
    return None if masks is None else plot_attention_sinks(t.heads, masks, t.samples, t.selections)


def sinks_missing(t: RunTables) -> str | None:
    """Why the sink section has no figure: no ``hidden_norm`` stored, or no sink (None when it has one)."""
    masks = run_sink_masks(t)
    if masks is None or not any(m.any() for m in masks.values()):
        return sink_note(masks, t.heads)
    return None
