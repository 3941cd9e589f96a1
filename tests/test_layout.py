"""Token layouts: each sample's own grid, tiles and newline tokens explicit (hand-computed)."""

import numpy as np
import pytest

from fastv_analysis import stats
from fastv_analysis.layout import NEWLINE, OFF_GRID, TokenLayout, lattice_cells, uniform_tokens


def test_anyres_layout_marks_base_tile_and_newlines():
    # base tile of 4 tokens, then 2 rows of 3 tokens each followed by a newline
    lay = TokenLayout.anyres(4, 2, 3)
    assert lay.cells.tolist() == [-1, -1, -1, -1, 0, 1, 2, NEWLINE, 3, 4, 5, NEWLINE]
    assert lay.newline.tolist() == [7, 11]


def test_lattice_on_a_rectangular_grid():
    # 2 x 4 grid, keep 2: r = ceil(sqrt(2 * 2 / 4)) = 1, c = 2 -> row floor(0.5 * 2) = 1,
    # cols floor(0.5 * 4 / 2) = 1 and floor(1.5 * 4 / 2) = 3 -> cells 5 and 7
    assert lattice_cells(2, 4, 2).tolist() == [5, 7]
    # 4 x 2 grid, keep 2: r = ceil(sqrt(2 * 4 / 2)) = 2, c = 1 -> rows 1, 3, col 1 -> cells 3, 7
    assert lattice_cells(4, 2, 2).tolist() == [3, 7]
    with pytest.raises(ValueError):
        lattice_cells(2, 2, 5)


def test_uniform_tokens_map_cells_back_to_token_indices_and_skip_newlines():
    lay = TokenLayout.anyres(4, 2, 3)  # grid 2 x 3; cell c sits at token 4 + c + c // 3
    # keep 2: r = ceil(sqrt(2 * 2 / 3)) = 2, c = 1 -> rows 0, 1, col 1 -> cells 1, 4 -> tokens 5, 9
    assert uniform_tokens(lay, 2).tolist() == [5, 9]
    # keep 8 > 6 grid tokens: all grid tokens + 2 of the 6 off-grid ones (-1 x 4, newline x 2)
    # at an even stride: off-grid tokens [0, 1, 2, 3, 7, 11], picks floor((i + 0.5) * 6 / 2) = 1, 4
    assert uniform_tokens(lay, 8).tolist() == [1, 4, 5, 6, 7, 8, 9, 10]


def test_unknown_layout_falls_back_to_a_stride_and_nan_statistics():
    lay = TokenLayout.for_tokens(10)  # not a square: no grid
    assert (lay.cells == OFF_GRID).all()
    assert uniform_tokens(lay, 2).tolist() == [2, 7]  # floor((i + 0.5) * 10 / 2)
    s = stats.spatial_stats(np.array([[0, 1]]), lay)
    assert np.isnan(s["mean_row"]).all() and s["on_grid_share"].tolist() == [0.0]


def test_spatial_stats_on_an_anyres_layout_by_hand():
    lay = TokenLayout.anyres(4, 2, 3)
    kept = np.array([[0, 4, 10], [7, 11, 5]])
    s = stats.spatial_stats(kept, lay)
    # row 0: token 0 off grid, token 4 = cell 0 (row 0, col 0), token 10 = cell 5 (row 1, col 2)
    #   mean_row = ((0.5 + 1.5) / 2) / 2 = 0.5, mean_col = ((0.5 + 2.5) / 3) / 2 = 0.5,
    #   bottom_share = 1 / 2, on_grid_share = 2 / 3
    # row 1: two newlines + token 5 = cell 1 (row 0, col 1): 0.25, 0.5, 0, 1 / 3
    np.testing.assert_allclose(s["mean_row"], [0.5, 0.25])
    np.testing.assert_allclose(s["mean_col"], [0.5, 0.5])
    np.testing.assert_allclose(s["bottom_share"], [0.5, 0.0])
    np.testing.assert_allclose(s["on_grid_share"], [2 / 3, 1 / 3])


def test_layout_round_trips_through_a_samples_row():
    lay = TokenLayout.anyres(4, 2, 3)
    back = TokenLayout.from_row(lay.to_row())
    assert back.key() == lay.key()


def test_internvl_layout_puts_the_thumbnail_on_the_grid_and_the_tiles_off_it():
    from fastv_analysis.adapters.internvl import thumbnail_layout

    one = thumbnail_layout(2, 4)  # one tile: a 2 x 2 grid, every token on it
    assert (one.rows, one.cols, one.cells.tolist()) == (2, 2, [0, 1, 2, 3])
    three = thumbnail_layout(2, 12)  # 2 tiles + the thumbnail (last 4 tokens): tiles off the grid
    assert three.cells.tolist() == [-1] * 8 + [0, 1, 2, 3]
    # keep 2 on the thumbnail's 2 x 2 grid: r = 2, c = 1 -> rows 0, 1, col 1 -> cells 1, 3 -> tokens 9, 11
    assert uniform_tokens(three, 2).tolist() == [9, 11]
    with pytest.raises(RuntimeError):
        thumbnail_layout(2, 8)  # 1 tile + thumbnail: the processor never makes it
    with pytest.raises(RuntimeError):
        thumbnail_layout(2, 6)  # not a whole number of tiles


def test_idefics3_layout_reads_the_tile_rows_off_the_span_gaps():
    """Idefics3 / SmolVLM: spans of s^2 image tokens (I = 9); two tokens (fake, row_col) between
    tiles of a row, three (newline, fake, row_col) before a new row; the last span is the global
    image, off the grid."""
    import torch

    from fastv_analysis.adapters.idefics3 import tiles_layout

    def prompt(rows, cols, side=1):
        ids = [1, 2]
        for r in range(rows):
            for c in range(cols):
                ids += [5, 6] + [9] * side * side
            ids += [7]
        return torch.tensor(ids + [7, 5, 8] + [9] * side * side + [5, 3])

    two_by_three = tiles_layout(prompt(2, 3), 9, 1)
    assert (two_by_three.rows, two_by_three.cols) == (2, 3)
    assert two_by_three.cells.tolist() == [0, 1, 2, 3, 4, 5, -1]
    # side 2, 1 row of 2 tiles: tile 0 holds cells (0, 0), (0, 1), (1, 0), (1, 1) of a 2 x 4 grid
    wide = tiles_layout(prompt(1, 2, side=2), 9, 2)
    assert (wide.rows, wide.cols, wide.cells.tolist()) == (2, 4, [0, 1, 4, 5, 2, 3, 6, 7, -1, -1, -1, -1])
    # 2 x 4: r = 1, c = 2 -> cells 5, 7 (row 1, cols 1, 3), tile 0 token 3 and tile 1 token 3
    assert uniform_tokens(wide, 2).tolist() == [3, 7]
    single = tiles_layout(torch.tensor([1, 5, 8, 9, 9, 9, 9, 5, 3]), 9, 2)  # no splitting: the global image only
    assert (single.rows, single.cols, single.cells.tolist()) == (2, 2, [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="expected 4 each"):
        tiles_layout(torch.tensor([1, 9, 9, 9, 5, 9, 9, 9, 9]), 9, 2)
    ragged = torch.tensor([5, 6, 9, 5, 6, 9, 7, 5, 6, 9, 7, 7, 5, 8, 9, 5])  # rows of 2 and 1 tiles
    with pytest.raises(RuntimeError, match="do not form rows of equal length"):
        tiles_layout(ragged, 9, 1)
