"""InternVL with dynamic tiling (tiles + thumbnail, as the released checkpoints run): a CLI run
capture -> select -> eval -> report on five image sizes giving different tile counts, each
sample laid out on its thumbnail's grid (the tiles before it off the grid)."""

import numpy as np
import polars as pl

from conftest import write_sized_questions
from fastv_analysis.loading import load_model
from fastv_analysis.toy.families import save_tiny_internvl_checkpoint

MIXED = [(56, 56), (120, 80), (80, 120), (56, 56), (200, 90)]


def test_cli_run_with_several_tiles_per_image(tmp_path):
    from fastv_analysis.cli.main import main

    model = save_tiny_internvl_checkpoint(tmp_path / "m", seed=1, max_patches=6)
    image_processor = load_model(str(model), device="cpu", dtype="float32").processor.image_processor
    # the processor's own count: 1 tile, or R x C tiles + the thumbnail (16 tokens each)
    expected = [16 * image_processor.get_number_of_image_patches(h, w) for w, h in MIXED]
    assert len(set(expected)) >= 3 and max(expected) > 16 * 3  # e.g. 1, 3 and 6 tiles + thumbnail
    data = tmp_path / "d"
    write_sized_questions(data, MIXED)
    run = tmp_path / "run"
    assert main(["capture", "--model", str(model), "--data", str(data / "questions.jsonl"), "--out", str(run),
                 "--agg-layers", "0,2", "--max-new-tokens", "2", "--batch-size", "2", "--quiet"]) == 0
    samples = pl.read_parquet(run / "samples.parquet").sort("sample_id")
    assert samples["n_image_tokens"].to_list() == expected
    for row in samples.iter_rows(named=True):  # the thumbnail (the last 16 tokens) is the 4 x 4 grid
        cells = np.asarray(row["token_cells"])
        assert (row["grid_rows"], row["grid_cols"]) == (4, 4)
        assert cells[-16:].tolist() == list(range(16)) and (cells[:-16] == -1).all()
    assert main(["select", str(run), "--keep", "4,2", "--alphas", "0.5", "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    uniform = sel.filter(pl.col("method") == "uniform").join(samples.select("sample_id", "n_image_tokens"),
                                                             on="sample_id")
    assert (uniform["on_grid_share"] == 1.0).all()  # a lattice on the thumbnail
    assert all(min(k) >= n - 16 for k, n in zip(uniform["kept"].to_list(), uniform["n_image_tokens"].to_list()))
    assert main(["eval", str(run), "--timing-samples", "1", "--compare-mask", "2", "--quiet"]) == 0
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet")
    assert (acc["n"] == 5).all()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()
