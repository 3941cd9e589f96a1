"""InternVL with dynamic tiling (tiles + thumbnail, as the released checkpoints run): a CLI run
capture -> select -> eval -> report on five image sizes giving different tile counts and
arrangements, every tile's tokens placed on one grid over the whole image (the thumbnail off
it), and online pruning laying the tiles out as capture did."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from conftest import write_sized_questions
from fastv_analysis.adapters.internvl import infer_tile_grid, tile_grid, tiles_layout
from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.toy.families import save_tiny_internvl_checkpoint

MIXED = [(56, 56), (120, 80), (80, 120), (56, 56), (200, 90)]
# GotOcr2's rule with max_patches=6 on 112 px tiles: 1 tile; 3 x 2 (w / h = 1.5); 2 x 3; 1; 2 x 1
GRIDS = [(1, 1), (2, 3), (3, 2), (1, 1), (1, 2)]  # (rows, cols)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    model = save_tiny_internvl_checkpoint(root / "m", seed=1, max_patches=6)
    return root, model, load_model(str(model), device="cpu", dtype="float32")


def test_tile_grid_is_the_processors(tiled):
    _, _, loaded = tiled
    ip = loaded.processor.image_processor
    for (w, h), grid in zip(MIXED + [(300, 100), (100, 300)], GRIDS + [(1, 3), (3, 1)]):
        rows, cols = tile_grid(w, h, ip)
        assert (rows, cols) == grid, (w, h)
        assert rows * cols + (rows * cols > 1) == ip.get_number_of_image_patches(h, w)  # the processor's count
        image = Image.fromarray((np.random.default_rng(w).random((h, w, 3)) * 255).astype("uint8"))
        pixels = ip(images=[image], return_tensors="pt")["pixel_values"]
        assert pixels.shape[0] == rows * cols + (rows * cols > 1)
        if rows * cols > 1:  # the arrangement read off the pixels is the rule's
            assert infer_tile_grid(pixels) == (rows, cols)


def test_token_boxes_of_a_2_by_3_tile_image_by_hand():
    from fastv_analysis import report

    layout = tiles_layout(2, 2, 3)  # 6 tiles of 2 x 2 tokens on a 4 x 6 grid, then the 4-token thumbnail
    assert (layout.rows, layout.cols) == (4, 6)
    # tile 0: cells 0, 1, 6, 7; tile 1 (row 0, col 1): 2, 3, 8, 9; tile 4 (row 1, col 1): 14, 15, 20, 21
    assert layout.cells[:8].tolist() == [0, 1, 6, 7, 2, 3, 8, 9] and layout.cells[16:20].tolist() == [14, 15, 20, 21]
    assert layout.cells[24:].tolist() == [-1] * 4
    grid, base, off = report.kept_boxes([0, 5, 19, 25], layout, (300, 200), None, "InternVLForConditionalGeneration")
    # 50 x 50 px cells on the 300 x 200 image: token 5 = tile 1's top right (cell 3), token 19 = tile 4's
    # bottom right (cell 21, row 3, col 3); token 25 is the thumbnail's cell 1: the top right of a 2 x 2 base tile
    assert grid.tolist() == [[0, 0, 50, 50], [150, 0, 200, 50], [150, 150, 200, 200]]
    assert base.tolist() == [[150, 0, 300, 100]] and off == 0


def test_pooling_to_one_cell_per_tile_averages_each_tile():
    from fastv_analysis.methods.pooling import pooling_plan

    # keep 6 on the 4 x 6 grid of 2 x 3 tiles: 2 bands of 3 cells, each cell one tile's 4 tokens (anchored at
    # the tile's first token); the thumbnail's 4 tokens are off the grid and dropped
    indices, assign, weight = pooling_plan(tiles_layout(2, 2, 3), 6)
    assert indices.tolist() == [0, 4, 8, 12, 16, 20]
    assert assign.tolist() == [t for t in range(6) for _ in range(4)] + [-1] * 4
    assert weight.tolist() == [0.25] * 24 + [0.0] * 4


def test_cli_run_with_several_tiles_per_image(tiled):
    from fastv_analysis.cli.main import main
    from fastv_analysis.pruning import apply_fastv

    root, model, loaded = tiled
    image_processor = loaded.processor.image_processor
    # the processor's own count: 1 tile, or R x C tiles + the thumbnail (16 tokens each)
    expected = [16 * image_processor.get_number_of_image_patches(h, w) for w, h in MIXED]
    assert len(set(expected)) >= 3 and max(expected) > 16 * 3  # e.g. 1, 2 and 6 tiles + thumbnail
    data = root / "d"
    write_sized_questions(data, MIXED)
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data / "questions.jsonl"), "--out", str(run),
                 "--agg-layers", "0,2", "--max-new-tokens", "2", "--batch-size", "2", "--quiet"]) == 0
    samples = pl.read_parquet(run / "samples.parquet").sort("sample_id")
    assert samples["n_image_tokens"].to_list() == expected
    for row, (rows, cols) in zip(samples.iter_rows(named=True), GRIDS):  # the tiles span the grid
        cells = np.asarray(row["token_cells"])
        assert (row["grid_rows"], row["grid_cols"]) == (4 * rows, 4 * cols)
        on = cells[:16 * rows * cols]
        assert sorted(on.tolist()) == list(range(16 * rows * cols)) and (cells[16 * rows * cols:] == -1).all()
    assert main(["select", str(run), "--keep", "4,2", "--alphas", "0.5", "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    uniform = sel.filter(pl.col("method") == "uniform").sort("sample_id", "keep")
    assert (uniform["on_grid_share"] == 1.0).all()  # a lattice over the tiles, none on the thumbnail
    questions = [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines()]
    proc = loaded.processor
    for row in uniform.iter_rows(named=True):  # select's replay == online pruning, which reads the pixels
        q = questions[row["sample_id"]]
        image = Image.open(data / q["image"]).convert("RGB")
        inputs = dict(proc(text=[build_prompt(proc, q["text"])], images=[image], return_tensors="pt"))
        with torch.no_grad(), apply_fastv(loaded.model, agg_layer=2, keep=row["keep"], method="uniform") as m:
            m(**inputs)
            assert m.last_selection_metadata["kept_indices"][0].tolist() == row["kept"], row["sample_id"]
    assert main(["eval", str(run), "--timing-samples", "1", "--compare-mask", "2", "--quiet"]) == 0
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet")
    assert (acc["n"] == 5).all()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()


def test_generate_lays_out_the_tiles_from_the_pixels_it_encoded(tiled):
    """generate encodes the image before its first forward, whose kwargs then lack pixel_values:
    the layout reads the pixels the vision tower was given (else it fell back to the thumbnail)."""
    from fastv_analysis.pruning import apply_fastv

    _, _, loaded = tiled
    proc = loaded.processor
    image = Image.fromarray((np.random.default_rng(1).random((80, 120, 3)) * 255).astype("uint8"))  # 2 x 3 tiles
    inputs = dict(proc(text=[build_prompt(proc, "what?")], images=[image], return_tensors="pt"))
    # keep 4 on the 8 x 12 grid of 2 x 3 tiles: lattice rows 2, 6 and cols 3, 9 -> tile 0's (2, 3) = token 11,
    # tile 2's (2, 1) = 2 * 16 + 9 = 41, tile 3's (2, 3) = 48 + 11 = 59, tile 5's (2, 1) = 80 + 9 = 89
    lattice = [11, 41, 59, 89]
    with torch.no_grad(), apply_fastv(loaded.model, agg_layer=2, keep=4, method="uniform") as m:
        m(**inputs)
        assert m.last_selection_metadata["kept_indices"][0].tolist() == lattice
        m.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert m.last_selection_metadata["kept_indices"][0].tolist() == lattice
