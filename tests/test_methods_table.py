"""The methods side by side (issue 23, section 4): each method's own cost, the KV cache, and the
table eval writes, all against hand-computed numbers."""

import json

import polars as pl
import pytest

from fastv_analysis import flops
from fastv_analysis.evaluate.methods import ModelDims, benchmark_rows, methods_table


def test_kv_cache_bytes_by_hand():
    # LLaVA-1.5-7B sizes: 32 layers, 32 kv heads x 128, fp16; a 600-token prompt with 576 image
    # tokens, K = 2, keep 64. Per token and layer: 2 (K, V) x 32 x 128 x 2 bytes = 16,384.
    # Layers 0-1 hold 600 tokens: 2 x 600 x 16,384 = 19,660,800; layers 2-31 hold 600 - 576 + 64
    # = 88: 30 x 88 x 16,384 = 43,253,760; total 62,914,560.
    assert flops.kv_cache_bytes(600, 576, 64, 32, 2, 32, 128, 2) == 62_914_560
    # the full model: 32 x 600 x 16,384
    assert flops.kv_cache_bytes(600, 576, 576, 32, 2, 32, 128, 2) == 314_572_800
    # a schedule: K = 2 keep 288, then K = 16 keep 64: 2 x 600 + 14 x 312 + 16 x 88 = 6,976 token-layers
    assert flops.kv_cache_bytes(600, 576, 288, 32, 2, 32, 128, 2, [(16, 64)]) == 6_976 * 16_384
    with pytest.raises(ValueError, match="cut layers must rise"):
        flops.kv_cache_bytes(600, 576, 64, 32, 40, 32, 128, 2)


def _shape(**kw):
    base = {"n": 576, "keep": 64, "hidden": 4096, "heads": 32, "text": 40, "prompt": 651}
    return flops.CostShape(**{**base, **kw})


def test_method_costs_by_hand():
    # DivPrune: N^2 d + N d + N keep = 576^2 x 4096 + 576 x 4096 + 576 x 64
    assert flops.method_cost("divprune", _shape())[0] == 1_358_954_496 + 2_359_296 + 36_864
    # DART: (4 + 4 + 2) N d + T d = 10 x 576 x 4096 + 40 x 4096
    assert flops.method_cost("dart", _shape(params={"pivot_image": 4, "pivot_text": 4}))[0] == 23_592_960 + 163_840
    # CDPruner: N^2 d + N T d + N keep (keep - 1) / 2 + N keep
    assert flops.method_cost("cdpruner", _shape())[0] == 1_358_954_496 + 94_371_840 + 1_161_216 + 36_864
    # FastV: H Q N with the last token (Q = 1), and with the text mean (Q = T = 40)
    assert flops.method_cost("avg_all_heads", _shape(params={"query": "last"}))[0] == 32 * 576
    assert flops.method_cost("avg_all_heads", _shape(params={"query": "text_mean"}))[0] == 32 * 40 * 576
    assert flops.method_cost("random", _shape()) == (0, "0 (a seeded draw)")
    # VisionZip: CLS row N_v d_v + (N - keep) keep d_v + N d_v, CLIP-L (1024) at 576 patches
    assert flops.method_cost("visionzip", _shape(vision_hidden=1024))[0] == (576 + 512 * 64 + 576) * 1024


def test_a_method_without_a_formula_is_not_counted_never_zero():
    assert flops.method_cost("no_such_method", _shape()) == (None, "not counted")
    value, text = flops.method_cost("visionzip", _shape())  # the vision tower's width unknown
    assert value is None and text.startswith("not counted")


# tiny model for the table: 4 layers, d = 8, MLP 16, 2 heads, 2 kv heads x 4, float32
DIMS = ModelDims(num_layers=4, hidden=8, intermediate=16, heads=2, kv_heads=2, head_dim=4, dtype_bytes=4)


def _benchmark(correct: dict, metric: dict | None = None, prefill: dict | None = None):
    """(predictions, accuracy, samples) of one benchmark: 2 samples of 20 prompt tokens, 16 image
    tokens from position 2, at K = 1: full, divprune and dart at keep 4."""
    pred, acc = [], []
    for config, values in correct.items():
        keep = 16 if config == "full" else 4
        for sid, c in enumerate(values):
            pred.append({"sample_id": sid, "agg_layer": 1, "config": config, "method": config, "keep": keep,
                         "n_kept": keep, "prompt_tokens": 20, "n_image_tokens": 16, "stages": "[]", "correct": c})
        acc.append({"agg_layer": 1, "config": config, "method": config, "alpha": None, "keep": keep, "n": 2,
                    "accuracy": sum(values) / 2, "prefill_ms": (prefill or {}).get(config),
                    "prefill_speedup_vs_full": None,
                    **({"metric_value": metric[config]} if metric else {})})
    samples = pl.DataFrame({"sample_id": [0, 1], "image_start": [2, 2]})
    return pl.DataFrame(pred), pl.DataFrame(acc, schema_overrides={"alpha": pl.Float64, "prefill_ms": pl.Float64,
                                                                   "prefill_speedup_vs_full": pl.Float64}), samples


def test_methods_table_by_hand(monkeypatch):
    monkeypatch.delitem(flops.METHOD_COSTS, "dart")  # a registered method without a formula
    a = benchmark_rows(*_benchmark({"full": [1, 1], "divprune": [1, 0], "dart": [0, 0]},
                                   metric={"full": 0.8, "divprune": 0.6, "dart": 0.2}, prefill={"divprune": 3.0}),
                       DIMS)
    b = benchmark_rows(*_benchmark({"full": [1, 0], "divprune": [1, 0], "dart": [1, 1]}), DIMS)
    table = methods_table({"A": a, "B": b})
    row = {r["config"]: r for r in table.iter_rows(named=True)}
    d = row["divprune"]
    # A's headline is its metric: 0.6 / 0.8 = 75 %; B's is accuracy: 0.5 / 0.5 = 100 %
    assert d["retained[A]"] == pytest.approx(75.0) and d["retained[B]"] == pytest.approx(100.0)
    assert d["retained_avg"] == pytest.approx(87.5)  # mean of the ratios
    assert d["accuracy_avg"] == pytest.approx(0.5) and d["headline[A]"] == pytest.approx(0.6)
    # dart: A 0.2 / 0.8 = 25 %, B 1.0 / 0.5 = 200 %: mean 112.5 (the ratio of means would be 1.2/1.3)
    assert row["dart"]["retained_avg"] == pytest.approx(112.5)
    # FastV's formula, n = 20 full, 20 - 16 + 4 = 8 kept from K = 1, d = 8, m = 16:
    # full layer 4 x 20 x 64 + 2 x 400 x 8 + 2 x 20 x 8 x 16 = 16,640 (x 4 = 66,560);
    # pruned layer 4 x 8 x 64 + 2 x 64 x 8 + 2 x 8 x 8 x 16 = 5,120: 16,640 + 3 x 5,120 = 32,000
    assert d["flops_ratio"] == pytest.approx(32_000 / 66_560)
    # DivPrune's own cost at N = 16, keep 4, d = 8: 256 x 8 + 16 x 8 + 16 x 4 = 2,240
    assert d["method_macs"] == 2_240 and d["flops_ratio_total"] == pytest.approx(34_240 / 66_560)
    assert d["prefill_ms"] == pytest.approx(3.0)  # A's only: the mean over the benchmarks that have it
    # KV: 2 x 2 x 4 x 4 = 64 bytes a token and layer; layer 0: 20, layers 1-3: 8 -> 44 x 64 = 2,816
    assert d["kv_cache_bytes"] == 2_816 and d["kv_cache_ratio"] == pytest.approx(2_816 / (4 * 20 * 64))
    # no formula: marked, never a silent 0
    assert row["dart"]["method_macs"] is None and row["dart"]["flops_ratio_total"] is None
    assert row["dart"]["method_cost"] == "not counted" and row["dart"]["flops_ratio"] == pytest.approx(32_000 / 66_560)
    f = row["full"]
    assert f["retained_avg"] == pytest.approx(100.0) and f["method_macs"] == 0 and f["flops_ratio_total"] == 1.0
    assert f["kv_cache_ratio"] == 1.0
    assert json.loads(row["dart"]["params"]) == {"pivot_image": 4, "pivot_text": 4}
    assert d["where"] == "input" and d["positions"] == "original" and row["dart"]["where"] == "llm"
    assert table["config"].to_list()[:2] == ["full", "dart"]  # by budget, then retained_avg


def test_methods_table_refuses_a_configuration_missing_from_accuracy():
    pred, acc, samples = _benchmark({"full": [1, 1], "divprune": [1, 0]})
    with pytest.raises(ValueError, match="0 accuracy rows for configuration 'divprune'"):
        benchmark_rows(pred, acc.filter(pl.col("config") != "divprune"), samples, DIMS)


def test_selection_statistics_by_hand():
    import itertools

    import numpy as np

    from fastv_analysis.evaluate.selection_stats import (instruction_relevance, mean_pairwise_cosine_distance,
                                                         region_coverage)
    from fastv_analysis.layout import TokenLayout

    grid = TokenLayout.grid(8, 8)  # 4 x 4 regions of 2 x 2 cells
    assert region_coverage(np.array([0, 1, 8, 9]), grid) == 1 / 16  # one region
    assert region_coverage(np.array([0, 7, 56, 63]), grid) == 4 / 16  # the four corners
    assert region_coverage(np.arange(0, 64, 2), grid) == 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3))
    brute = np.mean([1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.combinations(x, 2)])
    assert mean_pairwise_cosine_distance(x) == pytest.approx(brute)
    assert mean_pairwise_cosine_distance(np.array([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(0.0)
    assert mean_pairwise_cosine_distance(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)
    assert np.isnan(mean_pairwise_cosine_distance(x[:1]))
    # relevance: the mean cosine over (kept token, instruction token) pairs, from the stored mean of unit vectors
    kept, words = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    pairs = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a in kept for b in words])
    mean_unit = (words / np.linalg.norm(words, axis=1, keepdims=True)).mean(axis=0)
    assert instruction_relevance(kept, mean_unit) == pytest.approx(pairs)


def test_report_section_names_every_configuration_and_says_what_it_cannot_count(monkeypatch):
    import matplotlib.pyplot as plt

    from fastv_analysis import report
    from fastv_analysis.strategies import ALL_METHODS

    monkeypatch.delitem(flops.METHOD_COSTS, "dart")
    names = [m for m in ALL_METHODS if m != "weighted_combination"]
    correct = {"full": [1, 1], **{m: [i % 2, 1] for i, m in enumerate(names)}}
    table = methods_table({"A": benchmark_rows(*_benchmark(correct), DIMS)})
    note = report.methods_note(table)
    assert "mean of ratios" in note and "keep 4: best" in note and "not counted" in note and "dart" in note
    view = report.methods_view(table)
    assert {"retained_A_%", "retained_avg_%", "flops_ratio_total", "kv_cache_MB", "method_cost"} <= set(view.columns)
    fig = report.plot_methods_cost(table)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert all(m in labels for m in names) and [t.get_text() for t in fig.axes[1].get_yticklabels()] == names
    assert " not counted" in [t.get_text() for t in fig.axes[1].texts]
    plt.close(fig)
    zero = methods_table({"A": benchmark_rows(*_benchmark({"full": [0, 0], "divprune": [0, 0]}), DIMS)})
    assert "no % retained (the full control scored 0)" in report.methods_note(zero)
    assert "re-run `fastv-analyze eval`" in report.methods_note(None)


def test_a_schedule_counts_every_cut_and_its_ranking():
    pred, acc, samples = _benchmark({"full": [1, 1], "divprune": [1, 0]})
    then = "divprune then max_head K=3 keep 2"
    pred = pl.concat([pred, pred.filter(pl.col("config") == "divprune").with_columns(
        pl.lit(then).alias("config"), pl.lit('[[3, 2, "max_head"]]').alias("stages"))])
    acc = pl.concat([acc, acc.filter(pl.col("config") == "divprune").with_columns(pl.lit(then).alias("config"))])
    table = methods_table({"A": benchmark_rows(pred, acc, samples, DIMS)})
    row = table.filter(pl.col("config") == then).row(0, named=True)
    # layer 0 at 20 tokens, layers 1-2 at 8, layer 3 at 20 - 16 + 2 = 6:
    # 16,640 + 2 x 5,120 + (4 x 6 x 64 + 2 x 36 x 8 + 2 x 6 x 8 x 16 = 3,648) = 30,528 of 66,560
    assert row["flops_ratio"] == pytest.approx(30_528 / 66_560)
    # DivPrune's 2,240 + the stage's max_head ranking, H Q N = 2 x 1 x 4 (the 4 tokens the first cut kept)
    assert row["method_macs"] == 2_248 and "then" in row["method_cost"]
    assert row["kv_cache_bytes"] == (20 + 8 + 8 + 6) * 64


def test_every_registered_method_has_its_own_hue_and_a_compact_label_keeps_it():
    from fastv_analysis import strategies
    from fastv_analysis.report.style import PALETTE, base_method, config_colors, where_marker

    assert set(strategies.STRATEGIES) <= set(PALETTE)
    hues = [PALETTE[m] for m in strategies.STRATEGIES]
    assert len(set(hues)) == len(hues)
    assert base_method("pooling positions=compact") == "pooling"
    assert base_method("avg_all_heads@text_mean then max_head K=8 keep 32") == "avg_all_heads"
    colors = config_colors(["pooling positions=compact", "dart"])
    assert colors["pooling positions=compact"] == config_colors(["pooling"])["pooling"]
    assert (where_marker("dart"), where_marker("divprune positions=compact"), where_marker("visionzip")) == \
        ("o", "s", "^")
