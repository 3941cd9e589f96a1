"""Where each image token sits, for every family: the samples' own token grids (stored layouts),
the anyres base tile and what a grid spans on the image (from the adapters), and why a
spatial figure cannot be drawn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from .. import grid as image_grid
from .configs import smallest_keep

if TYPE_CHECKING:
    from .tables import RunTables

DEFAULT_ARCHITECTURE = "LlavaForConditionalGeneration"
"""The architecture of a run whose run.json predates ``architecture`` (LLaVA-1.5's: a square grid
over the processor's center crop); every other family's geometry comes from the adapters."""


def grid_side(selections: pl.DataFrame) -> int:
    """Side of the square image-token grid (24 for LLaVA-1.5's 576), from keep / keep_ratio."""
    row = selections.filter(pl.col("keep") > 0).head(1)
    return math.isqrt(round(row["keep"][0] / row["keep_ratio"][0])) if row.height else 24


def token_layouts(samples: pl.DataFrame | None, selections: pl.DataFrame | None = None) -> dict:
    """sample_id -> :class:`~fastv_analysis.layout.TokenLayout` (samples.parquet's stored layout;
    without samples, a square grid of N from the selections' keep / keep_ratio)."""
    from ..layout import TokenLayout
    from ..select import sample_layouts

    if samples is not None and ("token_cells" in samples.columns or "n_image_tokens" in samples.columns):
        return sample_layouts(samples)
    side = grid_side(selections)
    return {int(s): TokenLayout.grid(side, side) for s in selections["sample_id"].unique().to_list()}


def base_tile_tokens(layout, architecture: str) -> np.ndarray:
    """Token indices of the base tile, a square block of off-grid tokens covering the whole image:
    before the grid (anyres, ``Family(base_tile=True)``) or after it (InternVL's thumbnail,
    ``base_tile="last"``); empty where the family declares none or the block is not square."""
    from ..adapters import registry
    from ..layout import OFF_GRID

    family = registry().get(architecture)
    cells = layout.cells
    if family is None or not family.base_tile or not (cells != OFF_GRID).any():
        return np.zeros(0, dtype=np.int64)
    on = cells != OFF_GRID
    last = family.base_tile == "last"
    n = int(np.argmax(on[::-1] if last else on))
    side = math.isqrt(n)
    if not side or side * side != n:
        return np.zeros(0, dtype=np.int64)
    return np.arange(layout.n_tokens - n, layout.n_tokens) if last else np.arange(n)


def base_tile(layout, architecture: str) -> int:
    """Side of the base tile (:func:`base_tile_tokens`; 0 where there is none)."""
    return math.isqrt(len(base_tile_tokens(layout, architecture)))


def grid_extent(architecture: str) -> str:
    """``crop`` or ``image``: what the spatial grid spans (the family's ``grid_extent``; ``crop``,
    the geometry's fallback, for an architecture no family declares)."""
    from ..adapters import registry

    family = registry().get(architecture)
    return family.grid_extent if family else "crop"


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


def grid_note(samples: pl.DataFrame | None, architecture: str = DEFAULT_ARCHITECTURE) -> str:
    """One line: the image-token grids of the run's samples (the spatial figures draw on these)."""
    if samples is None or samples.height == 0:
        return "No samples."
    layouts = token_layouts(samples)
    shapes: dict[tuple[int, int], int] = {}
    for lay in layouts.values():
        shapes[(lay.rows, lay.cols)] = shapes.get((lay.rows, lay.cols), 0) + 1
    ranked = sorted(shapes.items(), key=lambda kv: (-kv[1], kv[0]))
    named = ", ".join(("no grid" if r == 0 else f"{r} x {c}") + f" ({n})" for (r, c), n in ranked[:6])
    more = f" and {len(ranked) - 6} more shapes" if len(ranked) > 6 else ""
    where = "the processor's center crop" if grid_extent(architecture) == "crop" else "the whole image"
    tiles = sorted({base_tile(lay, architecture) for lay in layouts.values()} - {0})
    base = f"; beside it a base tile of {' / '.join(f'{s} x {s}' for s in tiles)} tokens (the whole image: " \
        "anyres' base tile, InternVL's thumbnail)" if tiles else ""
    off = sum(int((lay.cells < 0).sum()) for lay in layouts.values())
    extra = f"; {off} of the {sum(lay.n_tokens for lay in layouts.values())} image tokens are off the grid " \
            "(base tiles, tiles, newlines)" if off else ""
    return (f"Image-token grids of this run's {samples.height} samples (rows x columns, samples): {named}{more}, "
            f"each over {where}{base}{extra}.")


def most_common_grid(layouts: dict, ids) -> tuple[int, int] | None:
    shapes = [(layouts[s].rows, layouts[s].cols) for s in ids if s in layouts and layouts[s].rows > 0]
    if not shapes:
        return None
    values, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    return tuple(int(v) for v in values[int(np.argmax(counts))])


def common_grid(samples: pl.DataFrame) -> tuple[int, int] | None:
    """(rows, cols) of the grid most samples have (None when no sample is on a grid)."""
    from ..select import sample_layouts

    shapes = [(lay.rows, lay.cols) for lay in sample_layouts(samples).values() if lay.rows > 0]
    if not shapes:
        return None
    values, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    rows, cols = values[int(np.argmax(counts))]
    return int(rows), int(cols)


SPATIAL_TITLES = {"keep_frequency": "keep-frequency", "examples": "examples", "sample_attention": "attention-map"}


def spatial_missing(name: str, t: RunTables) -> str | None:
    """Why a figure drawn on the samples' grids cannot be drawn (None when it can)."""
    what = f"No {SPATIAL_TITLES[name]} figure"
    if t.selections is None or t.samples is None or t.samples.height == 0:
        return f"{what}: select has not run."
    if name == "sample_attention":
        if not (t.selections["agg_layer"] > 0).any():
            return (f"{what}: capture recorded the attention of no layer K > 0 (agg layers "
                    f"{sorted(t.selections['agg_layer'].unique().to_list())}; capture with --agg-layers 2 or another "
                    "K > 0).")
    elif smallest_keep(t.selections) is None:
        return f"{what}: select kept no pruned set (keep > 0)."
    if name != "examples" and not any(lay.rows > 0 for lay in token_layouts(t.samples, t.selections).values()):
        return f"{what}: no sample's image tokens lie on a grid (their layout is unknown: capture predates layouts)."
    return None
