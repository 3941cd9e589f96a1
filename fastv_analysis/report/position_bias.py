"""Section 11: where along the image the kept tokens sit (RoPE's bias towards late tokens).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .configs import smallest_keep
from .grids import common_grid
from .style import method_color, new_figure
from .tables import RunTables


POSITION_CONFIGS = ("avg_all_heads", "no_rope", "random", "uniform")

"""What the positional-bias section compares: FastV's ranking, the same ranking of rows
computed without RoPE (FEATHER's diagnosis: RoPE's long-term decay makes the last prompt
token favour late, i.e. bottom, image tokens) and the two position-blind controls."""


def kept_positions(selections: pl.DataFrame, samples: pl.DataFrame, configs=POSITION_CONFIGS,
                   keep: int | None = None, agg_layer: int | None = None):
    """Where the kept tokens sit: ``({config: (rows, cols)}, layer, keep)`` with ``rows`` /
    ``cols`` the cell centres of every kept on-grid token as fractions of its own sample's
    grid (``(row + 0.5) / grid_rows``: 0 = top / left, 1 = bottom / right; the grid from
    samples' ``token_cells``, so off-grid base-tile and newline tokens are left out), pooled
    over samples, at one layer and keep (default: the first layer, the smallest keep > 0)."""
    from ..select import sample_layouts

    layer = agg_layer if agg_layer is not None else selections["agg_layer"].min()
    sel = selections.filter(pl.col("agg_layer") == layer)
    keep = keep if keep is not None else smallest_keep(sel)
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
    grid = common_grid(samples)
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
    fig, axes = new_figure(width=13, height=5.6, ncols=2)
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
                        markersize=8, color=method_color(config),
                        label=f"{label}: lattice bins, {y.max():.0f}% each")
                continue
            control = config in ("random", "uniform")
            ax.plot(dd["centre"], y, marker="o", markersize=3, linewidth=1.2 if control else 2,
                    linestyle="--" if control else "-", color=method_color(config), label=label)
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


def positional_bias_missing(t: RunTables) -> str | None:
    """Why the positional-bias section has no figure (None when it has one)."""
    if t.selections is None or smallest_keep(t.selections) is None:
        return "No positional-bias section: select has not run, or kept no pruned set (keep > 0)."
    if common_grid(t.samples) is None:
        return "No positional-bias section: no sample's image tokens lie on a grid."
    return None
