"""Section 8: how often each image patch is kept, per method, on the samples' own grids.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .configs import one_config_per_method
from .grids import DEFAULT_ARCHITECTURE, base_tile, base_tile_tokens, most_common_grid, token_layouts
from .style import grid_map, method_label, new_figure


def keep_frequency(selections: pl.DataFrame, n_tokens: int) -> dict[str, np.ndarray]:
    """Per configuration: fraction of samples in which each image token was kept ``[N]``."""
    out = {}
    for (config,), d in selections.group_by(["config"], maintain_order=True):
        kept = d["kept"].explode().drop_nulls().to_numpy()
        out[config] = np.bincount(kept, minlength=n_tokens) / max(d.height, 1)
    return out


def grid_keep_frequency(sel: pl.DataFrame, layouts: dict, architecture: str = DEFAULT_ARCHITECTURE):
    """Keep frequency on the samples' own grids: ``(grid, base, n_grid, n_base)`` with ``grid``
    ``{config: [rows, cols]}`` the fraction of the samples of the most common grid in which each
    cell was kept, ``base`` ``{config: [s, s]}`` the same on the anyres base tile (empty where
    there is none) and the number of samples each pools. None when no sample is on a grid."""
    shape = most_common_grid(layouts, sel["sample_id"].unique().to_list())
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
                b[np.flatnonzero(np.isin(base_tile_tokens(lay, architecture), kept))] += 1
        grid[config] = g.reshape(rows, cols) / max(n_grid, 1)
        if side:
            base[config] = b.reshape(side, side) / max(n_base, 1)
    return grid, base, n_grid, n_base


def plot_keep_frequency(selections: pl.DataFrame, keep: int | None = None, agg_layer: int | None = None,
                        samples: pl.DataFrame | None = None, architecture: str = DEFAULT_ARCHITECTURE):
    """Where kept tokens sit: keep frequency of every cell of the samples' own grid (the most
    common one where samples differ: 24 x 24 for LLaVA-1.5, each image's own for Qwen2-VL and
    anyres), one panel per method; anyres runs add the base tile under it. The methods share
    one colour scale (0 to their largest cell) except ``uniform``, which keeps the same
    lattice in every sample (100 % cells) and has its own 0-100 % scale: on a single scale it
    would wash the others out. Each title names its scale and the flat level keep / N. None
    when no sample's tokens lie on a grid."""
    sel, layer, keep, configs = one_config_per_method(selections, keep, agg_layer)
    layouts = token_layouts(samples, sel)
    found = grid_keep_frequency(sel, layouts, architecture)
    if found is None:
        return None
    grid, base, n_grid, n_base = found
    n_tok = np.mean([layouts[s].n_tokens for s in sel["sample_id"].unique().to_list() if s in layouts])
    flat = 100 * keep / n_tok
    panels = [("grid", grid)] + ([("base tile", base)] if base else [])
    fig, axes = new_figure(width=3.9 * len(configs), height=4.0 * len(panels), ncols=len(configs), nrows=len(panels))
    for r, (where, freq) in enumerate(panels):
        freq = {c: 100 * f for c, f in freq.items()}
        shared = [c for c in configs if c != "uniform"]
        shared_top = max([float(freq[c].max()) for c in shared] or [100.0]) or 1.0
        for ax, config in zip(axes[r], configs):
            top = shared_top if config in shared else (float(freq[config].max()) or 100.0)
            grid_map(ax, freq[config], "rocket_r", "kept in % of samples", vmin=0, vmax=top)
            scale = "shared" if config in shared else "own"
            head = method_label(config) if where == "grid" else f"{method_label(config)}: base tile"
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
