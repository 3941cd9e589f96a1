"""The select stage: replay, overlap and head statistics, and the CLI around them."""

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats as sps

from fastv_analysis import stats
from fastv_analysis.cli.main import main
from fastv_analysis.select import heads, overlap, replay, score_configs
from fastv_analysis.store import open_run, write_synthetic_run
from fastv_analysis.strategies import select, uniform_indices

METHODS = ["avg_all_heads", "max_head", "weighted_combination", "random", "uniform"]


@pytest.fixture
def attention():
    g = torch.Generator().manual_seed(0)
    return torch.softmax(torch.randn(12, 4, 64, generator=g) * 2, dim=-1)


def test_replay_rows_equal_per_sample_selection(attention):
    frame = replay(attention, METHODS, [0.0, 0.5, 1.0], [32, 8, 0], seed=3)
    # 4 single configs + 3 alphas = 7 configs x 3 keeps x 12 samples
    assert frame.height == 7 * 3 * 12
    for row in frame.filter(pl.col("method").is_in(["avg_all_heads", "max_head", "weighted_combination"])).iter_rows(named=True):
        alpha = row["alpha"] if row["alpha"] is not None else 0.5
        expected = select(attention[row["sample_id"]], row["method"], row["keep"], alpha=alpha)
        assert row["kept"] == expected.indices.tolist()
        assert row["max_head"] == int(expected.max_head)
    uni = frame.filter(pl.col("method") == "uniform", pl.col("keep") == 8)
    assert all(k == uniform_indices(64, 8).tolist() for k in uni["kept"].to_list())


def test_replay_alpha_only_varies_weighted(attention):
    frame = replay(attention, METHODS, [0.2, 0.4], [8])
    per_method = frame.group_by("method").agg(pl.col("alpha").n_unique().alias("n"), pl.len())
    counts = dict(zip(per_method["method"], per_method["len"]))
    assert counts == {"avg_all_heads": 12, "max_head": 12, "weighted_combination": 24, "random": 12, "uniform": 12}


def test_selection_id_identifies_equal_sets(attention):
    frame = replay(attention, ["avg_all_heads", "weighted_combination"], [0.25], [16])  # H=4: alpha 1/H == avg
    a = frame.filter(pl.col("method") == "avg_all_heads")["selection_id"].to_list()
    w = frame.filter(pl.col("method") == "weighted_combination")["selection_id"].to_list()
    assert a == w
    assert len(set(a)) == len(a)  # different samples -> different sets here


def test_random_control_is_independent_of_chunking(attention):
    whole = replay(attention, ["random"], [], [10], seed=7)
    first = replay(attention[:5], ["random"], [], [10], seed=7, sample_ids=range(5))
    rest = replay(attention[5:], ["random"], [], [10], seed=7, sample_ids=range(5, 12))
    assert whole["kept"].to_list() == pl.concat([first, rest])["kept"].to_list()
    assert whole["kept"].to_list() != replay(attention, ["random"], [], [10], seed=8)["kept"].to_list()


def test_random_keep_sets_are_nested(attention):
    frame = replay(attention, ["random"], [], [20, 10])
    big = frame.filter(pl.col("keep") == 20)["kept"].to_list()
    small = frame.filter(pl.col("keep") == 10)["kept"].to_list()
    assert all(set(s) <= set(b) for s, b in zip(small, big))


def test_spatial_statistics_by_hand():
    kept = np.array([[0, 23, 575], [552, 553, 554]])  # (0,0),(0,23),(23,23) / bottom row
    s = stats.spatial_stats(kept, 576)
    # cell centres as a fraction of the 24-cell side: rows 0, 0, 23 -> (0.5 + 0.5 + 23.5) / 3 / 24
    np.testing.assert_allclose(s["mean_row"], [24.5 / 72, 23.5 / 24])
    np.testing.assert_allclose(s["mean_col"], [47.5 / 72, 4.5 / 72])
    np.testing.assert_allclose(s["bottom_share"], [1 / 3, 1.0])
    np.testing.assert_allclose(s["on_grid_share"], [1.0, 1.0])


def test_overlap_matches_independent_computation(attention):
    frame = overlap(attention, ["avg_all_heads", "max_head", "uniform"], [], [16, 4])
    row = frame.filter(pl.col("sample_id") == 3, pl.col("keep") == 16, pl.col("config_a") == "avg_all_heads",
                       pl.col("config_b") == "max_head").row(0, named=True)
    a = select(attention[3], "avg_all_heads", 16)
    m = select(attention[3], "max_head", 16)
    sa, sm = set(a.indices.tolist()), set(m.indices.tolist())
    assert row["intersection"] == len(sa & sm)
    assert math.isclose(row["jaccard"], len(sa & sm) / len(sa | sm))
    assert math.isclose(row["kendall_tau"], sps.kendalltau(a.scores, m.scores).statistic, rel_tol=1e-9)
    assert math.isclose(row["spearman"], sps.spearmanr(a.scores, m.scores).statistic, rel_tol=1e-6)
    uni = frame.filter(pl.col("config_b") == "uniform")
    assert uni["kendall_tau"].is_nan().all()  # uniform has a set, not a ranking
    assert frame.height == 12 * 2 * 3  # samples x keeps x pairs


def test_head_stats_by_hand():
    imp = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    s = stats.head_stats(imp)
    assert s["max_head"].tolist() == [0, 0, 1]
    np.testing.assert_allclose(s["max_head_share"], [0.25, 1.0, 0.75])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(4)
    np.testing.assert_allclose(s["head_entropy"], [1.0, 0.0, h], atol=1e-12)
    # Gini via the mean absolute difference definition
    def gini(x):
        return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    np.testing.assert_allclose(s["head_gini"], [gini(r) for r in imp])


def test_heads_frame_uses_attention_sums(attention):
    frame = heads(attention, agg_layer=2)
    assert frame["max_head"].to_list() == attention.sum(-1).argmax(-1).tolist()
    assert frame["agg_layer"].unique().to_list() == [2]


def test_score_configs_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'best'"):
        score_configs(["best"], [0.5])


# --- the stage through the CLI ------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, attention):
    write_synthetic_run(tmp_path / "run", {2: attention, 3: attention.flip(-1)}, part_size=5)
    return tmp_path / "run"


def test_select_cli_end_to_end(run_dir, attention):
    rc = main(["select", str(run_dir), "--alphas", "0:1:0.5", "--keep", "16,8", "--keep-ratio", "0.5",
               "--chunk-size", "5", "--quiet"])
    assert rc == 0
    out = run_dir / "select"
    sel = pl.read_parquet(out / "selections.parquet")
    # 2 layers x 12 samples x (4 + 3 alphas) configs x 3 keeps (32 from the ratio)
    assert sel.height == 2 * 12 * 7 * 3
    assert sorted(sel["keep"].unique().to_list()) == [8, 16, 32]
    # chunked streaming gives the same rows as one replay over the whole cache
    whole = replay(attention, METHODS, [0.0, 0.5, 1.0], [32, 16, 8], sample_ids=range(12), agg_layer=2)
    got = sel.filter(pl.col("agg_layer") == 2).with_columns(pl.col("config").str.replace(" ratio 0.5", "",
                                                                                        literal=True))
    got = got.sort(["config", "keep", "sample_id"])
    want = whole.sort(["config", "keep", "sample_id"])
    assert got["kept"].to_list() == want["kept"].to_list()
    assert got["selection_id"].to_list() == want["selection_id"].to_list()
    assert pl.read_parquet(out / "heads.parquet").height == 24
    summary = pl.read_parquet(out / "overlap_summary.parquet")
    assert {"jaccard_mean", "jaccard_lo", "jaccard_hi", "kendall_tau_mean"} <= set(summary.columns)
    info = json.loads((out / "select.json").read_text())
    assert info["keeps"] == [16, 8] and info["keep_ratios"] == [0.5]
    assert info["agg_layers"] == [2, 3] and "versions" in info


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alphas", "0:1.5:0.5"], "--alphas"),
        (["--alphas", "a,b"], "--alphas"),
        (["--keep", "12,x"], "--keep"),
        (["--keep", "9999"], "keep 9999"),
        (["--methods", "avg_all_heads,best"], "--methods"),
        (["--agg-layer", "7"], "agg layer 7 was not captured"),
        (["--keep-ratio", "2"], "--keep-ratio"),
    ],
)
def test_select_bad_flag_is_one_line_and_writes_nothing(run_dir, capsys, args, message):
    rc = main(["select", str(run_dir), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert message in err and len(err.splitlines()) == 1
    assert not (run_dir / "select").exists() and not (run_dir / ".select.tmp").exists()


def test_select_on_missing_run_names_the_file(tmp_path, capsys):
    assert main(["select", str(tmp_path / "nope"), "--quiet"]) != 0
    assert "run.json is missing" in capsys.readouterr().err


def test_select_help_documents_every_flag(capsys):
    rc = main(["select", "--help"])
    assert rc == 0
    text = capsys.readouterr().out
    for flag in ("--methods", "--alphas", "--keep", "--keep-ratio", "--agg-layer", "--seed", "--chunk-size"):
        assert flag in text


def test_open_run_reads_what_was_written(run_dir, attention):
    run = open_run(run_dir)
    assert run.agg_layers == [2, 3]
    torch.testing.assert_close(run.last_token_attention(4, 2), attention[4])
    torch.testing.assert_close(run.last_token_attention(4, 3), attention[4].flip(-1))
    with pytest.raises(ValueError, match="agg layer 5 was not captured"):
        run.last_token_attention(0, 5)


def test_overlap_summary_interval_matches_scipy(attention):
    from fastv_analysis.select import summarize_overlap

    frame = overlap(attention, ["avg_all_heads", "max_head", "uniform"], [], [16], agg_layer=2)
    summary = summarize_overlap(frame)
    row = summary.filter(pl.col("config_a") == "avg_all_heads", pl.col("config_b") == "max_head").row(0, named=True)
    values = frame.filter(pl.col("config_a") == "avg_all_heads", pl.col("config_b") == "max_head")["jaccard"].to_numpy()
    m = values.mean()  # independent reference: scipy's t interval of the mean
    lo, hi = sps.t.interval(0.95, len(values) - 1, loc=m, scale=sps.sem(values))
    assert math.isclose(row["jaccard_mean"], m) and math.isclose(row["jaccard_lo"], lo) and math.isclose(row["jaccard_hi"], hi)
    uni = summary.filter(pl.col("config_b") == "uniform").row(0, named=True)
    assert uni["kendall_tau_mean"] is None and uni["n"] == 12  # NaN correlations are left out


def test_alpha_grid_is_inclusive_and_never_passes_stop():
    from fastv_analysis.cli.params import FloatGrid

    grid = FloatGrid()
    assert grid.convert("0:1:0.1", None, None) == [round(0.1 * i, 10) for i in range(11)]
    assert grid.convert("0:1:0.25", None, None) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid.convert("0:0.5:0.3", None, None) == [0.0, 0.3]
    assert grid.convert("0:1:0.6", None, None) == [0.0, 0.6]
    assert grid.convert("0.3,0.5", None, None) == [0.3, 0.5]


def test_replay_rejects_alpha_outside_unit_interval(attention):
    with pytest.raises(ValueError, match="alpha 1.5 is outside"):
        replay(attention, ["weighted_combination"], [1.5], [4])


def test_select_bad_seed_names_the_flag(run_dir, capsys):
    assert main(["select", str(run_dir), "--seed", "-1", "--quiet"]) != 0
    assert "--seed" in capsys.readouterr().err
    assert not (run_dir / ".select.tmp").exists()


def test_tie_margin_flags_boundaries_closer_than_the_stored_precision():
    """tie_margin = score of the last kept token - score of the first dropped; near_tie within rtol."""
    from fastv_analysis.select import TIE_RTOL, replay

    row = torch.tensor([[0.4, 0.3, 0.3 + 1e-7, 0.0, 0.0]])  # one head: scores are the row itself
    frame = replay(row[None], ["avg_all_heads", "random", "uniform"], keeps=[1, 2, 3, 5])
    avg = {r["keep"]: r for r in frame.filter(pl.col("method") == "avg_all_heads").iter_rows(named=True)}
    third = float(torch.tensor(0.3 + 1e-7))  # the float32 value actually stored
    assert avg[1]["tie_margin"] == pytest.approx(0.4 - third, rel=1e-6) and avg[1]["near_tie"] is False
    assert avg[2]["tie_margin"] == pytest.approx(third - float(torch.tensor(0.3)), rel=1e-3)
    assert avg[2]["near_tie"] is True  # 1.2e-7 apart: within 1e-6 of 0.3
    assert avg[3]["tie_margin"] == pytest.approx(float(torch.tensor(0.3))) and avg[3]["near_tie"] is False
    assert math.isnan(avg[5]["tie_margin"]) and avg[5]["near_tie"] is False  # keep = N: nothing dropped
    controls = frame.filter(pl.col("method") != "avg_all_heads")
    assert controls["tie_margin"].is_nan().all() and controls["near_tie"].is_null().all()
    # at float16 precision a 0.3 vs 0.3001 boundary is a near-tie too
    loose = replay(torch.tensor([[[0.4, 0.3, 0.3001, 0.0]]]), ["avg_all_heads"], keeps=[2],
                   tie_rtol=TIE_RTOL["float16"])
    assert loose["near_tie"].to_list() == [True]


def test_near_tie_flags_a_max_head_choice_within_the_stored_precision():
    """Two heads whose image attention sums differ by less than float16 resolution: h* may flip."""
    from fastv_analysis.select import TIE_RTOL, replay

    a = torch.tensor([[[0.40, 0.30, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0],          # head 0 sums to 0.85
                       [0.0, 0.0, 0.0, 0.0, 0.05, 0.05, 0.30, 0.4501]]])     # head 1 sums to 0.8501
    frame = replay(a, ["max_head", "avg_all_heads"], keeps=[2], tie_rtol=TIE_RTOL["float16"])
    rows = {r["method"]: r for r in frame.iter_rows(named=True)}
    assert rows["max_head"]["tie_margin"] == pytest.approx(0.25, abs=1e-6)  # the boundary itself is clear
    assert rows["max_head"]["near_tie"] is True and rows["avg_all_heads"]["near_tie"] is False
    assert replay(a, ["max_head"], keeps=[2], tie_rtol=TIE_RTOL["float32"])["near_tie"].to_list() == [False]


def test_head_statistics_count_sinks_and_their_attention_mass():
    from fastv_analysis.select import heads

    # one sample, 2 heads, 4 tokens; norms 1, 1, 1, 10: median (1 + 1) / 2 = 1, so token 3 is a
    # sink (10 > 5 x 1); head-mean attention [0.1, 0.2, 0.3, 0.4] -> sink mass 0.4 / 1.0
    att = torch.tensor([[[0.1, 0.1, 0.3, 0.5], [0.1, 0.3, 0.3, 0.3]]])
    out = heads(att, hidden_norm=torch.tensor([[1.0, 1.0, 1.0, 10.0]]))
    assert out["sink_count"].to_list() == [1] and out["sink_mass"].to_list() == [pytest.approx(0.4)]
    assert "sink_mass" not in heads(att).columns
