"""The one-command demo on the embedded default (toy LLaVA + toy VQA), on a few samples."""

import json

import polars as pl

from conftest import assert_one_pair_per_sample

from fastv_analysis.cli.main import main


def test_demo_runs_every_stage_on_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "demo finished" in printed and "avg_all_heads" in printed
    config = json.loads((out / "run.json").read_text())
    assert config["model"].endswith("toy-llava") and config["agg_layers"] == [2]
    acc = pl.read_parquet(out / "eval" / "accuracy.parquet")
    assert sorted(acc["keep"].unique().to_list()) == [16, 64, 192, 576]  # 576: the full control
    assert set(acc["method"].unique()) >= {"avg_all_heads", "max_head", "weighted_combination", "random", "full"}
    assert acc["n"].unique().to_list() == [8]
    assert (out / "report.html").stat().st_size > 50_000
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    # object_coverage: the toy knows its objects; the critiques' analyses from the demo's --store
    # data (no sinks figure: the toy has no attention sinks, the section says so in one line)
    assert {"object_coverage", "positional_bias", "query_choice", "layer_dynamics"} <= figures
    assert len(figures) == 16 and "attention_sinks" not in figures
    # the methods side by side: every registered strategy in the table, the section rendered
    from fastv_analysis.strategies import ALL_METHODS

    methods = pl.read_parquet(out / "eval" / "methods.parquet")
    assert set(methods["method"]) == set(ALL_METHODS) | {"full"}
    assert methods["retained_avg"].null_count() == 0 and methods["kv_cache_bytes"].min() > 0
    assert {"methods_cost", "methods_statistics"} <= figures
    html = (out / "report.html").read_text()
    assert "The field&#39;s methods side by side" in html or "The field's methods side by side" in html
    assert "r_within" in html and "retained_avg_%" in html
    # the demo answers every strategy and FastV's other two queries
    # (divprune and pooling under their authors' compact positions, the eval default)
    assert {"diverse", "no_rope", "hybrid_uniform", "avg_all_heads@text_mean", "divprune positions=compact", "dart",
            "pooling positions=compact"} <= set(acc["config"].unique())
    # every p from exactly one pair per sample, the query variants against avg_all_heads too
    pred = pl.read_parquet(out / "eval" / "predictions.parquet")
    assert assert_one_pair_per_sample(pred, acc) > 3 * acc.height - 10
    variant = acc.filter(pl.col("config") == "avg_all_heads@text_mean", pl.col("keep") == 64).row(0, named=True)
    assert variant["mcnemar_p_vs_avg"] is not None and variant["n_units"] == 4  # 8 questions on 4 scenes


def test_demo_never_deletes_a_run_it_did_not_make_and_grows_with_the_limit(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "3", "--no-report", "--keep", "64", "--quiet"]) == 0
    assert main(["demo", "--out", str(out), "--limit", "4", "--no-report", "--keep", "64", "--quiet"]) == 0
    assert pl.read_parquet(out / "eval" / "accuracy.parquet")["n"].unique().to_list() == [4]  # grew, 3 reused
    assert "note:" not in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--limit", "2", "--no-report", "--keep", "64", "--quiet"]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
    assert len(notes) == 1 and "already holds 4 samples; --limit 2 does not shrink a run" in notes[0]
    assert pl.read_parquet(out / "eval" / "accuracy.parquet")["n"].unique().to_list() == [4]  # as the note says
    assert main(["demo", "--out", str(out), "--agg-layer", "3", "--limit", "4", "--no-report", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert json.loads((out / "run.json").read_text())["agg_layers"] == [2]  # untouched
    assert main(["demo", "--out", str(out), "--agg-layer", "3", "--limit", "2", "--no-report", "--keep", "64",
                 "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["agg_layers"] == [3]
