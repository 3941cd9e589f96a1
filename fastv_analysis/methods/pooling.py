"""Pooling: average pooling of each sample's image grid to ``keep`` cells, the downsampling
baseline (VTC-Bench; UniPruneBench's ``pool_pre_llm``).

UniPruneBench (TianfanPeng/VLMUniPruneBench@f93768f, methods/Pool_PreLLM.py) pools the
vision tokens with ``F.adaptive_avg_pool2d`` to a square ``s x s`` output (s^2 in {4, 16,
25}) and puts the pooled tokens first in the image span, the rest of the sequence following
them (compact positions). Here the output grid is ``h' x w'`` with ``h' * w' == keep`` (a
ragged lattice for a keep with no such grid, :func:`pool_shape`), and a slot is the plain
mean of its cell's tokens: on a grid whose sides the output divides, that
is exactly adaptive average pooling (fidelity: tests/test_merge.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..layout import TokenLayout
from ..strategies import Merge, _Ctx, _Result, register


def pool_shape(rows: int, cols: int, keep: int) -> tuple[int, list[int]]:
    """The output grid of ``keep`` cells for a ``rows x cols`` grid: ``(h', [w'_0, ..., w'_{h'-1}])``,
    the number of cell rows and the cells in each.

    Among the factorisations ``h' * w' == keep`` with ``h' <= rows`` and ``w' <= cols``, the one
    whose aspect ``h'/w'`` is closest to ``rows/cols`` in log ratio (ties: the smaller h'),
    every cell row holding w'. A keep with no such factorisation (a prime above both sides,
    ...) gets a ragged lattice instead: h' in ``ceil(keep/cols)..min(rows, keep)`` closest to
    ``sqrt(keep * rows / cols)``, the first ``keep % h'`` cell rows one cell wider than the others.
    """
    target = math.log(rows / cols)
    fits = [h for h in range(1, min(rows, keep) + 1) if keep % h == 0 and keep // h <= cols]
    if fits:
        h = min(fits, key=lambda h: (abs(math.log(h * h / keep) - target), h))
        return h, [keep // h] * h
    heights = range(-(-keep // cols), min(rows, keep) + 1)
    h = min(heights, key=lambda h: (abs(math.log(h * h / keep) - target), h))
    return h, [keep // h + (i < keep % h) for i in range(h)]


def _bins(n: int, out: int) -> np.ndarray:
    """``[n]`` the output bin of each of n input rows (or columns): bin i covers
    ``floor(i n / out) .. floor((i + 1) n / out) - 1``. When ``out`` divides ``n`` these are
    adaptive pooling's windows; otherwise adaptive pooling's windows ``floor(i n / out) ..
    ceil((i + 1) n / out) - 1`` overlap by a row, which no partition can hold."""
    bounds = (np.arange(out + 1) * n) // out
    return np.searchsorted(bounds, np.arange(n), side="right") - 1


def pooling_plan(layout: TokenLayout, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices [keep], assign [N], weight [N])``: each on-grid token's cell of the output
    grid (:func:`pool_shape`), weight 1 / the cell's token count; slot j's anchor is
    the first token (lowest index, the cell's top-left on a raster grid) of its cell, slots
    ordered by anchor. Tokens off the grid (anyres base tile, newlines) are dropped (-1)."""
    n = layout.n_tokens
    if keep == 0:
        return np.zeros(0, np.int64), np.full(n, -1, np.int64), np.zeros(n)
    if layout.rows == 0:
        raise ValueError(f"pooling needs the image's grid; these {n} tokens have none")
    h, widths = pool_shape(layout.rows, layout.cols, keep)
    on = np.flatnonzero(layout.cells >= 0)
    r, c = np.divmod(layout.cells[on], layout.cols)
    band = _bins(layout.rows, h)[r]
    offset = np.concatenate([[0], np.cumsum(widths)])
    col_bin = np.stack([_bins(layout.cols, w) for w in widths])  # [h', cols]
    cell = offset[band] + col_bin[band, c]
    first = np.full(keep, n, np.int64)
    np.minimum.at(first, cell, on)
    if (first == n).any():
        raise ValueError(f"pooling: the {layout.rows} x {layout.cols} grid leaves an output cell empty (tokens missing)")
    order = np.argsort(first, kind="stable")
    slot_of_cell = np.empty(keep, np.int64)
    slot_of_cell[order] = np.arange(keep)
    assign = np.full(n, -1, np.int64)
    assign[on] = slot_of_cell[cell]
    count = np.bincount(cell, minlength=keep)
    weight = np.zeros(n)
    weight[on] = 1.0 / count[cell]
    return first[order], assign, weight


@register("pooling", "set", where="input", positions="compact", merges=True,
          doc="Average pooling of the image grid to keep = h' x w' cells (aspect closest to the image's, a ragged "
              "lattice for awkward keeps); slot at its cell's first token; off-grid tokens (anyres base tile, "
              "newlines) dropped; positions: compact, as UniPruneBench's pool_pre_llm; no grid: refused.")
def _pooling(ctx: _Ctx, keep: int | None) -> _Result:
    """:func:`pooling_plan` on the batch's layout (default: the square grid of N)."""
    if keep is None:
        raise ValueError("'pooling' has no keep-independent score; use select")
    attention = ctx.attention
    batch_shape, n = attention.shape[:-2], attention.shape[-1]
    layout = ctx.layout if ctx.layout is not None else TokenLayout.for_tokens(n)
    indices, assign, weight = pooling_plan(layout, keep)
    device = attention.device
    idx = torch.from_numpy(indices).to(device)
    scores = torch.zeros(batch_shape + (n,), dtype=attention.dtype, device=device)
    scores[..., idx] = 1.0
    merge = Merge(torch.from_numpy(assign).to(device).expand(*batch_shape, n).clone(),
                  torch.from_numpy(weight).to(device, torch.float32).expand(*batch_shape, n).clone())
    return _Result(scores, indices=idx.expand(*batch_shape, keep).clone(), merge=merge)
