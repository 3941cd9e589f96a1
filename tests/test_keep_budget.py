"""Runs whose images give different numbers of image tokens N: a --keep-ratio keeps that
fraction of each sample's own N through select and eval, and the overlap heatmap's chance
level is the mean of each sample's own."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from fastv_analysis import report
from fastv_analysis.cli.main import main
from fastv_analysis.select import ratio_keep, resolve_keeps
from fastv_analysis.adapters import registry


def test_ratio_keep_rounds_half_up_in_decimal():
    assert ratio_keep(0.25, 58) == 15  # 14.5 -> 15 (Python's round gives 14)
    assert ratio_keep(0.35, 10) == 4  # float 0.35 * 10 = 3.4999999999999996
    assert ratio_keep(0.25, 256) == 64 and ratio_keep(0.25, 1280) == 320
    assert ratio_keep(0.0, 576) == 0 and ratio_keep(1.0, 576) == 576
    assert resolve_keeps([16, 15], [0.25], 58) == [16, 15]
    with pytest.raises(ValueError, match="keep 64 is outside 0..58"):
        resolve_keeps([64], [0.25], 58)
    with pytest.raises(ValueError, match="keep ratio 1.5 is outside"):
        resolve_keeps([], [1.5], 58)


def _summary(rows):
    return pl.DataFrame(rows, schema={"agg_layer": pl.Int64, "keep": pl.Int64, "ratio": pl.Float64,
                                      "config_a": pl.Utf8, "config_b": pl.Utf8, "jaccard_mean": pl.Float64})


def test_overlap_heatmap_chance_is_the_mean_of_each_samples_own():
    """keep 64 of N = 256 and 1280 (half the samples each): chance 0.143 and 0.026, so the
    panel is centred on their mean, not on N = 1280's; a ratio panel on R_b = ratio x N_b."""
    import matplotlib.pyplot as plt

    n_tokens = [256, 256, 1280, 1280]
    summary = _summary([
        {"agg_layer": 2, "keep": 64, "ratio": None, "config_a": "avg_all_heads", "config_b": "random",
         "jaccard_mean": 0.1},
        {"agg_layer": 2, "keep": None, "ratio": 0.25, "config_a": "avg_all_heads ratio 0.25",
         "config_b": "random ratio 0.25", "jaccard_mean": 0.2},
    ])
    fig = report.plot_overlap_heatmap(summary, n_tokens=n_tokens)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2
    at_64 = (report.chance_jaccard(256, 64) + report.chance_jaccard(1280, 64)) / 2
    assert report.chance_jaccard(256, 64) == pytest.approx(0.1437, abs=1e-4)
    assert report.chance_jaccard(1280, 64) == pytest.approx(0.0258, abs=1e-4)
    at_ratio = (report.chance_jaccard(256, 64) + report.chance_jaccard(1280, 320)) / 2
    for ax, chance, head in ((panels[0], at_64, "keep 64 of N = 256-1280"),
                             (panels[1], at_ratio, "keep 0.25 x N (64-320 of 256-1280)")):
        assert ax.collections[0].norm.vcenter == pytest.approx(chance)
        assert ax.get_title().startswith(head) and f"chance Jaccard {chance:.3f}" in ax.get_title()
        assert "mean over samples" in ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["avg_all_heads", "random"]
    plt.close(fig)
    one_n = report.plot_overlap_heatmap(summary.filter(pl.col("ratio").is_null()), n_tokens=[576] * 3)
    assert one_n.axes[0].get_title() == f"keep 64 of 576: chance Jaccard {report.chance_jaccard(576, 64):.3f} (white)"
    plt.close(one_n)


SIZES = [(56, 56), (120, 80), (196, 112), (56, 56)]  # Qwen2-VL: 4, 12, 28, 4 image tokens


def test_keep_ratio_is_each_samples_own_n_through_select_and_eval(tmp_path, capsys):
    model = registry()["Qwen2VLForConditionalGeneration"].tiny(tmp_path / "m", seed=1)
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(data / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"images/{i}.png", "text": "<image>\nwhat color?",
                                 "answer": "red"}))
    (data / "questions.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["capture", "--model", str(model), "--data", str(data / "questions.jsonl"), "--out", str(run),
                 "--agg-layers", "2", "--max-new-tokens", "2", "--batch-size", "2", "--quiet"]) == 0
    n_of = dict(pl.read_parquet(run / "samples.parquet").select("sample_id", "n_image_tokens").iter_rows())
    assert sorted(set(n_of.values())) == [4, 12, 28]
    assert main(["select", str(run), "--keep", "2", "--keep-ratio", "0.5", "--methods", "avg_all_heads,random",
                 "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    ratio_rows = sel.filter(pl.col("ratio") == 0.5)
    assert ratio_rows.height == 2 * len(SIZES)
    for sid, keep, kept, config in ratio_rows.select("sample_id", "keep", "kept", "config").iter_rows():
        assert keep == len(kept) == n_of[sid] // 2  # today: 2 for every sample (half the smallest N)
        assert config.endswith(" ratio 0.5")
    counts = sel.filter(pl.col("ratio").is_null())
    assert (counts["keep"] == 2).all() and counts.height == 2 * len(SIZES)
    summary = pl.read_parquet(run / "select" / "overlap_summary.parquet")
    at_ratio = summary.filter(pl.col("ratio") == 0.5)
    assert at_ratio.height == 1 and at_ratio["keep"].is_null().all() and at_ratio["n"].item() == len(SIZES)
    assert json.loads((run / "select" / "select.json").read_text())["keep_ratios"] == [0.5]

    capsys.readouterr()
    assert main(["eval", str(run), "--keep-ratio", "0.25", "--timing-samples", "0", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "--keep-ratio 0.25: not in" in err and "(there: 0.5)" in err
    assert main(["eval", str(run), "--keep-ratio", "0.5", "--timing-samples", "1", "--timing-repeats", "1",
                 "--quiet"]) == 0
    pred = pl.read_parquet(run / "eval" / "predictions.parquet").filter(pl.col("method") != "full")
    assert set(pred["config"]) == {"avg_all_heads ratio 0.5", "random ratio 0.5"}
    assert pred["keep"].is_null().all()
    assert all(n == n_of[sid] // 2 for sid, n in pred.select("sample_id", "n_kept").iter_rows())
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet").filter(pl.col("method") != "full")
    assert acc.height == 2 and acc["keep"].is_null().all() and (acc["n"] == len(SIZES)).all()
    assert acc["prefill_ms"].is_not_null().all()  # the batch-1 timing found its configuration
    # a ratio configuration is paired with the references at the same ratio, one pair per sample
    rnd = acc.filter(pl.col("config") == "random ratio 0.5").row(0, named=True)
    assert rnd["mcnemar_p_vs_avg"] is not None and rnd["mcnemar_p_vs_random"] is None
    from conftest import assert_one_pair_per_sample

    assert assert_one_pair_per_sample(pl.read_parquet(run / "eval" / "predictions.parquet"),
                                      pl.read_parquet(run / "eval" / "accuracy.parquet")) >= 3
    rel = pl.read_parquet(run / "eval" / "relations.parquet")
    jac = rel.filter(pl.col("statistic") == "jaccard_vs_avg", pl.col("config") == "random ratio 0.5")
    assert jac["n"].item() == len(SIZES)  # measured for every sample at its own count
    assert main(["report", str(run)]) == 0


def test_the_pooled_relations_leave_out_the_reference_at_every_budget():
    # avg_all_heads at a keep ratio is named "avg_all_heads ratio 0.5": its Jaccard with itself is
    # 1 by construction, so it must stay out of the pooled test as the plain one does
    import polars as pl

    from fastv_analysis.evaluate import STATISTICS, relations_table

    rows = []
    for sid in range(6):
        for config, ratio in (("avg_all_heads ratio 0.5", 0.5), ("random ratio 0.5", 0.5)):
            rows.append({"sample_id": sid, "agg_layer": 2, "keep": None, "ratio": ratio, "method": config.split()[0],
                         "config": config, "correct": bool((sid + len(config)) % 2),
                         **{s: float((sid * 7 + len(config)) % 5) for s in STATISTICS}})
    rel = relations_table(pl.DataFrame(rows, schema_overrides={"keep": pl.Int64}), n_permutations=50)
    pooled = rel.filter(pl.col("scope") == "within_sample")
    assert (pooled["n"] == 6).all()  # only random's six rows, one per sample
