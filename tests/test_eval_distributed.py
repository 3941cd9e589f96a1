"""eval under 2 CPU processes (torchrun, gloo) writes the tables one process writes."""

import polars as pl

from fastv_analysis.cli.main import main

from conftest import write_questions


def _torchrun_eval(run, *extra, timeout=180):
    from test_capture_distributed import torchrun_cli

    return torchrun_cli("eval", run, *extra, timeout=timeout)


def test_two_process_eval_equals_single_process(checkpoints, tmp_path):
    import shutil

    data = write_questions(tmp_path / "d", n=5)
    run = tmp_path / "run"
    assert main(["capture", "--model", str(checkpoints["gqa"]), "--data", str(data), "--out", str(run),
                 "--agg-layers", "0,2", "--max-new-tokens", "3", "--quiet"]) == 0
    assert main(["select", str(run), "--keep", "64,8", "--alphas", "0.5", "--quiet"]) == 0
    shutil.copytree(run, tmp_path / "one")
    proc = _torchrun_eval(run, "--timing-samples", "1")
    assert proc.returncode == 0, f"torchrun eval failed:\n{proc.stdout}\n{proc.stderr}"
    parts = sorted(p.name for p in (run / ".eval-parts").glob("*/answers-*.parquet"))
    assert {name.split("-")[1] for name in parts} == {"000", "001"}  # each process wrote its own parts
    assert main(["eval", str(tmp_path / "one"), "--timing-samples", "1", "--quiet"]) == 0
    cols = ["sample_id", "agg_layer", "config", "keep", "selection_id", "prediction", "correct"]
    two = pl.read_parquet(run / "eval" / "predictions.parquet").select(cols)
    one = pl.read_parquet(tmp_path / "one" / "eval" / "predictions.parquet").select(cols)
    assert two.height == one.height > 0 and two.equals(one)
    acc_cols = ["agg_layer", "config", "keep", "n", "accuracy", "delta_vs_full", "mcnemar_p_vs_full"]
    assert pl.read_parquet(run / "eval" / "accuracy.parquet").select(acc_cols).equals(
        pl.read_parquet(tmp_path / "one" / "eval" / "accuracy.parquet").select(acc_cols))
    from conftest import assert_same_tables  # every table, not only these columns

    assert_same_tables(run / "eval", tmp_path / "one" / "eval")
