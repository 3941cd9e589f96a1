"""capture -> select -> eval -> report on standard-benchmark layouts (issue 14), tiny model."""

import json

import polars as pl
import pytest

from fastv_analysis.cli.main import main
from test_tasks import make_pope, make_scienceqa


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fastv_analysis.toy.checkpoint import save_tiny_random_checkpoint

    root = tmp_path_factory.mktemp("bm")
    return save_tiny_random_checkpoint(root / "m", seed=4, text={"num_hidden_layers": 3})


@pytest.mark.parametrize("make, name, headline", [(make_pope, "pope", "mean/f1"),
                                                  (make_scienceqa, "scienceqa_img", "img_accuracy")])
def test_benchmark_run_end_to_end(tiny_model, tmp_path, make, name, headline, capsys):
    data = make(tmp_path)
    run = tmp_path / "run"
    # the layout is detected (no --benchmark)
    assert main(["capture", "--model", str(tiny_model), "--data", str(data), "--out", str(run),
                 "--max-new-tokens", "3", "--quiet"]) == 0, capsys.readouterr().err
    config = json.loads((run / "run.json").read_text())
    assert config["benchmark"] == name
    assert main(["select", str(run), "--keep", "64,8", "--methods", "avg_all_heads,random", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "1", "--quiet"]) == 0, capsys.readouterr().err
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet")
    assert (acc["benchmark"] == name).all() and (acc["metric"] == headline).all()
    metrics = pl.read_parquet(run / "eval" / "metrics.parquet")
    assert metrics.select("agg_layer", "config", "keep").unique().height == acc.height
    # an independent route: the official-rule scorer on the answers file eval wrote for a configuration
    for row in acc.iter_rows(named=True):
        answers = run / "eval" / "answers" / f"K{row['agg_layer']}_keep{row['keep']}_{row['config']}.jsonl"
        out = tmp_path / f"{row['config']}-{row['keep']}.json"
        assert main(["score", "--benchmark", name, "--data", str(data), "--answers", str(answers),
                     "--out", str(out)]) == 0, capsys.readouterr().err
        scored = json.loads(out.read_text())
        assert scored["headline"]["name"] == headline
        assert scored["headline"]["value"] == pytest.approx(row["metric_value"])
        if row["metric_ci_lo"] is not None:
            assert row["metric_ci_lo"] <= row["metric_value"] <= row["metric_ci_hi"]
    # the methods table reads the benchmark's headline, and its % of the full control's
    methods = pl.read_parquet(run / "eval" / "methods.parquet").join(acc, on=["agg_layer", "config", "keep"])
    assert methods[f"headline[{name}]"].to_list() == methods["metric_value"].to_list()
    full = acc.filter(pl.col("config") == "full")["metric_value"][0]
    if full:
        assert methods[f"retained[{name}]"].to_list() == pytest.approx((100 * methods["metric_value"] / full).to_list())
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    html = (run / "report.html").read_text()
    assert headline in html  # the benchmark's metric per configuration is in the main table


def test_evaluating_twice_gives_identical_tables(tiny_model, tmp_path):
    # POPE's mean-F1 interval came from a bootstrap iterating group_by("category") in no fixed
    # order: two evals of the same selections printed different intervals.
    import shutil

    from conftest import assert_same_tables

    data = make_pope(tmp_path)
    run = tmp_path / "run"
    assert main(["capture", "--model", str(tiny_model), "--data", str(data), "--out", str(run),
                 "--max-new-tokens", "3", "--quiet"]) == 0
    assert main(["select", str(run), "--keep", "64,8", "--methods", "avg_all_heads,random", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "1", "--quiet"]) == 0
    first = tmp_path / "first"
    shutil.copytree(run / "eval", first)
    for _ in range(2):  # again from scratch (no cached parts), then from the cached parts
        shutil.rmtree(run / "eval")
        if _ == 0:
            shutil.rmtree(run / ".eval-parts")
        assert main(["eval", str(run), "--timing-samples", "1", "--quiet"]) == 0
        assert "accuracy.parquet" in assert_same_tables(first, run / "eval")
    assert pl.read_parquet(first / "accuracy.parquet")["metric_ci_lo"].is_not_null().all()


def test_subsample_is_seeded_and_grows(tiny_model, tmp_path):
    data = make_pope(tmp_path)
    run = tmp_path / "run"
    assert main(["capture", "--model", str(tiny_model), "--data", str(data), "--out", str(run), "--benchmark", "pope",
                 "--subsample", "3", "--max-new-tokens", "2", "--quiet"]) == 0
    first = pl.read_parquet(run / "samples.parquet")["sample_id"].to_list()
    assert len(first) == 3
    assert main(["capture", "--model", str(tiny_model), "--data", str(data), "--out", str(run), "--benchmark", "pope",
                 "--subsample", "5", "--max-new-tokens", "2", "--quiet"]) == 0
    grown = pl.read_parquet(run / "samples.parquet")["sample_id"].to_list()
    assert len(grown) == 5 and set(first) <= set(grown)


def test_subsample_and_limit_take_whole_groups():
    """A circular group missing rotations (or an MME image missing a question) scores higher
    than the benchmark does: subsets are drawn in whole groups."""
    from pathlib import Path

    from fastv_analysis.benchmark import complete_groups, sample_order
    from fastv_analysis.data import Question

    qs = [Question(str(i), Path("x.png"), "q", "A", meta={"group": i % 5}) for i in range(20)]  # 5 groups of 4
    group = {i: i % 5 for i in range(20)}
    small = sample_order(qs, subsample=6, seed=3)
    assert len(small) == 8 and all(sum(group[j] == group[i] for j in small) == 4 for i in small)
    large = sample_order(qs, subsample=10, seed=3)
    assert len(large) == 12 and set(small) <= set(large)
    assert sample_order(qs, limit=5) == sorted([0, 5, 10, 15, 1, 6, 11, 16])  # groups 0 and 1, first seen first
    assert complete_groups([0], qs, list(range(20))) == [0, 5, 10, 15]
    plain = [Question(str(i), Path("x.png"), "q", "A") for i in range(7)]
    assert sample_order(plain, limit=3) == [0, 1, 2] and len(sample_order(plain, subsample=4, seed=1)) == 4
