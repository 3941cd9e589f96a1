"""Where a sample's image tokens sit: one patch grid per sample, tiles and newlines explicit.

LLaVA-1.5 has one 24 x 24 grid for every image; Qwen2-VL's grid follows each image's size
(``image_grid_thw`` / the 2 x 2 merge); LLaVA-NeXT and OneVision put a low-resolution base
tile first and then the high-resolution tiles as one unpadded grid, each grid row ended by
an ``image_newline`` token. A :class:`TokenLayout` says, for every image token, its cell on
the sample's *spatial grid* (the finest grid covering the whole image: the unpadded
high-resolution grid for anyres, the only grid otherwise), -1 for a token off that grid
(the anyres base tile) and -2 for a newline token. The uniform control and the spatial
statistics are defined on it, so they mean the same thing for every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OFF_GRID = -1
NEWLINE = -2

NEWLINE_POLICIES = ("prune", "keep")
"""What pruning does with LLaVA-NeXT / OneVision ``image_newline`` tokens: ``prune`` ranks
them like every image token (the default: the budget counts every visual token the model
sees, as FastV and the papers reporting LLaVA-NeXT at 2,880 tokens count them); ``keep``
always keeps them, outside the budget, and ranks only the patch tokens (the newlines mark
the grid's row ends, which the language model may rely on to read 2-D structure)."""


@dataclass(frozen=True)
class TokenLayout:
    """rows x cols spatial grid and ``cells[i]``: token i's raster cell, OFF_GRID or NEWLINE."""

    rows: int
    cols: int
    cells: np.ndarray  # [N] int64

    def __post_init__(self) -> None:
        cells = np.asarray(self.cells, dtype=np.int64)
        object.__setattr__(self, "cells", cells)
        on = cells[cells >= 0]
        if on.size and (on.max() >= self.rows * self.cols or np.unique(on).size != on.size):
            raise ValueError(f"layout cells must be distinct and < rows x cols = {self.rows * self.cols}")

    @classmethod
    def grid(cls, rows: int, cols: int) -> "TokenLayout":
        """Every token on one raster grid (LLaVA-1.5, Qwen2-VL)."""
        return cls(rows, cols, np.arange(rows * cols))

    @classmethod
    def anyres(cls, base_tokens: int, rows: int, cols: int, newline: bool = True) -> "TokenLayout":
        """A base tile of ``base_tokens`` (off the grid), then ``rows`` rows of ``cols`` tokens,
        each followed by a newline token when ``newline``."""
        row = np.arange(cols)
        body = [np.concatenate([r * cols + row, [NEWLINE]]) if newline else r * cols + row for r in range(rows)]
        return cls(rows, cols, np.concatenate([np.full(base_tokens, OFF_GRID), *body]).astype(np.int64))

    @classmethod
    def for_tokens(cls, n_tokens: int) -> "TokenLayout":
        """Without more knowledge: a square grid when N is a square, else no grid at all
        (spatial statistics NaN, uniform an even stride over the token order)."""
        side = math.isqrt(n_tokens)
        return cls.grid(side, side) if side * side == n_tokens else cls(0, 0, np.full(n_tokens, OFF_GRID))

    def key(self) -> tuple:
        """Hashable identity: samples with equal keys share every spatial computation."""
        return self.rows, self.cols, self.cells.tobytes()

    @property
    def n_tokens(self) -> int:
        return int(self.cells.shape[0])

    @property
    def newline(self) -> np.ndarray:
        """Indices of the newline tokens."""
        return np.flatnonzero(self.cells == NEWLINE)

    def patches(self) -> tuple[np.ndarray, "TokenLayout"]:
        """``(indices of the non-newline tokens, their layout)``: what ``keep`` ranks."""
        idx = np.flatnonzero(self.cells != NEWLINE)
        return idx, TokenLayout(self.rows, self.cols, self.cells[idx])

    def to_row(self) -> dict:
        """The samples.parquet columns that store it."""
        return {"grid_rows": self.rows, "grid_cols": self.cols, "token_cells": self.cells.astype(np.int32).tolist()}

    @classmethod
    def from_row(cls, row: dict) -> "TokenLayout":
        return cls(int(row["grid_rows"]), int(row["grid_cols"]), np.asarray(row["token_cells"], dtype=np.int64))


def lattice_cells(rows: int, cols: int, keep: int) -> np.ndarray:
    """``keep`` raster cells spread evenly over a rows x cols grid (ascending).

    An r x c lattice of cell centres with r/c close to rows/cols (r = ceil(sqrt(keep)) on a
    square grid), any surplus points left out evenly along the raster order.
    """
    if keep == 0:
        return np.zeros(0, dtype=np.int64)
    if keep > rows * cols:
        raise ValueError(f"a uniform lattice of {keep} cells does not fit a {rows} x {cols} grid")
    r = min(rows, max(1, math.ceil(math.sqrt(keep * rows / cols))))
    c = math.ceil(keep / r)
    if c > cols:
        c = cols
        r = math.ceil(keep / c)
    rr = np.floor((np.arange(r) + 0.5) * rows / r).astype(np.int64)
    cc = np.floor((np.arange(c) + 0.5) * cols / c).astype(np.int64)
    lattice = (rr[:, None] * cols + cc[None, :]).ravel()
    chosen = np.floor((np.arange(keep) + 0.5) * lattice.size / keep).astype(np.int64)
    return np.sort(lattice[chosen])


def uniform_tokens(layout: TokenLayout, keep: int) -> np.ndarray:
    """``keep`` token indices spread evenly over the sample's image (ascending).

    A lattice on the spatial grid; when ``keep`` exceeds the grid's tokens, every grid token
    and then the off-grid ones (base tile, newlines) at an even stride.
    """
    cells = layout.cells
    on_grid = np.flatnonzero(cells >= 0)
    if keep <= on_grid.size:
        token_of_cell = np.full(layout.rows * layout.cols, -1, dtype=np.int64)
        token_of_cell[cells[on_grid]] = on_grid
        grid_tokens = token_of_cell[lattice_cells(layout.rows, layout.cols, keep)] if on_grid.size == \
            layout.rows * layout.cols else on_grid[np.floor((np.arange(keep) + 0.5) * on_grid.size / keep).astype(int)]
        return np.sort(grid_tokens)
    off = np.flatnonzero(cells < 0)
    extra = keep - on_grid.size
    if extra > off.size:
        raise ValueError(f"keep {keep} exceeds the {layout.n_tokens} image tokens")
    more = off[np.floor((np.arange(extra) + 0.5) * off.size / extra).astype(np.int64)]
    return np.sort(np.concatenate([on_grid, more]))
