"""The eval stage: replaying the select stage's kept sets with the pruned model."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from conftest import write_questions
from fastv_analysis.cli.main import main


@pytest.fixture(scope="module")
def selected_run(checkpoints, tmp_path_factory):
    """capture (float32 storage) -> select on a tiny random 3-layer model, 4 samples, K = 0, 1, 2."""
    root = tmp_path_factory.mktemp("evalrun")
    model = root / "model"
    shutil.copytree(checkpoints["gqa"], model)
    data = write_questions(root / "d", n=4)
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data), "--out", str(run), "--agg-layers", "0,1,2",
                 "--max-new-tokens", "3", "--quiet"]) == 0
    assert main(["select", str(run), "--methods", "avg_all_heads,max_head,weighted_combination,random,uniform",
                 "--alphas", "0.25,0.5,1", "--keep", "64,8,0", "--quiet"]) == 0
    return run


def test_eval_end_to_end(selected_run, capsys):
    assert main(["eval", str(selected_run), "--quiet", "--compare-mask", "2"]) == 0
    out = capsys.readouterr().out
    assert "configurations asked" in out and "mask check: identical answers on 2 samples" in out
    ev = selected_run / "eval"
    pred = pl.read_parquet(ev / "predictions.parquet")
    sel = pl.read_parquet(selected_run / "select" / "selections.parquet")
    full = pred.filter(pl.col("method") == "full")
    n_image = pl.read_parquet(selected_run / "samples.parquet")["n_image_tokens"][0]
    assert full.height == 4 * 3 and (full["keep"] == n_image).all()  # one full control per sample and layer
    assert pred.height == sel.height + full.height  # every configuration answered
    info = json.loads((ev / "eval.json").read_text())
    asked = pl.concat([sel.select("sample_id", "agg_layer", "keep", "selection_id"),
                       full.select("sample_id", "agg_layer", "keep", "selection_id")])
    distinct = asked.unique().height
    assert info["distinct_kept_sets"] == distinct < info["configurations_asked"] == pred.height
    assert info["shared_prefills"] == asked.select("sample_id", "agg_layer", "keep").unique().height
    # the full control answers exactly as capture's generate did (CPU, float32)
    assert info["full_vs_capture"] == {"compared": 12, "differ": 0, "examples": []}
    assert info["timing"]["threads"] >= 1 and info["timing"]["repeats"] == 3
    # configurations with the same kept set got the same answer
    same = pred.group_by(["sample_id", "agg_layer", "keep", "selection_id"]).agg(pl.col("prediction").n_unique())
    assert (same["prediction"] == 1).all()
    acc = pl.read_parquet(ev / "accuracy.parquet")
    assert acc.height == sel.select("agg_layer", "config", "keep").unique().height + 3
    for col in ("accuracy", "n", "ci_lo", "ci_hi", "delta_vs_full", "mcnemar_p_vs_full", "mcnemar_p_vs_full_holm",
                "mcnemar_p_vs_avg", "mcnemar_p_vs_avg_bh", "flops_ratio", "equivalent_image_tokens", "prefill_ms",
                "prefill_ms_p25", "prefill_ms_p75", "decode_ms_per_token", "prefill_speedup_vs_full",
                "batched_prefill_ms_per_set"):
        assert col in acc.columns
    timed = pl.read_parquet(ev / "config_timing.parquet")
    assert timed["sample_id"].n_unique() == 4  # --timing-samples defaults to 5; the run has 4
    # choosing the strategy per sample: the oracle bound and the cross-validated rule, per layer and keep
    oracle, adaptive = pl.read_parquet(ev / "oracle.parquet"), pl.read_parquet(ev / "adaptive.parquet")
    layer_keeps = sel.select("agg_layer", "keep").unique().height
    assert oracle.height == adaptive.height == layer_keeps
    assert (oracle["oracle_accuracy"] >= oracle["best_single_accuracy"]).all()
    assert timed.filter(pl.col("config") == "full").height == 4 * 3 * 3  # samples x layers x repeats
    assert (acc["timing_n"] == 4 * 3).all() and (acc["prefill_ms"] > 0).all()
    assert (acc["prefill_ms_p25"] <= acc["prefill_ms"]).all() and (acc["prefill_ms"] <= acc["prefill_ms_p75"]).all()
    assert (acc["ci_lo"] <= acc["accuracy"]).all() and (acc["accuracy"] <= acc["ci_hi"]).all()
    k0 = acc.filter(pl.col("agg_layer") == 0)
    assert set(k0["method"].to_list()) == {"random", "uniform", "full"}
    rel = pl.read_parquet(ev / "relations.parquet")
    assert set(rel["scope"].unique()) == {"within_sample", "configuration"}
    assert {"jaccard_vs_avg", "max_head_share", "head_entropy", "bottom_share"} <= set(rel["statistic"].unique())


def _evaluated(run):
    """(predictions, samples, the run's model, its processor) of an evaluated run."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (run / "eval" / "predictions.parquet").exists():
        assert main(["eval", str(run), "--quiet"]) == 0
    config = json.loads((run / "run.json").read_text())
    return (pl.read_parquet(run / "eval" / "predictions.parquet"), pl.read_parquet(run / "samples.parquet"),
            LlavaForConditionalGeneration.from_pretrained(config["model"]).eval(),
            AutoProcessor.from_pretrained(config["model"]))


def test_eval_answers_equal_online_fastv(selected_run):
    """capture -> select -> eval agree token for token with FastV ranking online in the model."""
    from PIL import Image

    from fastv_analysis.loading import build_prompt
    from fastv_analysis.pruning import apply_fastv

    pred, samples, model, proc = _evaluated(selected_run)
    checked = 0
    for row in pred.filter(pl.col("method").is_in(["avg_all_heads", "max_head", "weighted_combination"]),
                           pl.col("keep") > 0).iter_rows(named=True):
        s = samples.filter(pl.col("sample_id") == row["sample_id"]).row(0, named=True)
        inputs = proc(text=[build_prompt(proc, s["question"])], images=[Image.open(s["image"]).convert("RGB")],
                      return_tensors="pt")
        alpha = 0.5 if row["alpha"] is None else row["alpha"]
        with torch.no_grad(), apply_fastv(model, agg_layer=row["agg_layer"], keep=row["keep"], method=row["method"],
                                          alpha=alpha) as fast:
            out = fast.generate(**inputs, max_new_tokens=3, do_sample=False)
        online = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert online == row["prediction"], row
        checked += 1
    assert checked >= 10


def test_eval_without_select_is_refused(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=1)
    run = tmp_path / "run"
    assert main(["capture", "--model", str(checkpoints["mha"]), "--data", str(data), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "selections.parquet is missing" in err and len(err.splitlines()) == 1
    assert not (run / "eval").exists()


def test_eval_of_unselected_layer_is_refused(selected_run, capsys):
    before = sorted(p.name for p in selected_run.iterdir())
    assert main(["eval", str(selected_run), "--agg-layer", "3", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--agg-layer [3]" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in selected_run.iterdir()) == before


def test_eval_with_a_different_model_is_refused(selected_run, checkpoints, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(selected_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    config = json.loads((run / "run.json").read_text())
    config["model"] = str(checkpoints["mha"])  # same shape family, other weights
    (run / "run.json").write_text(json.dumps(config))
    assert main(["eval", str(run), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "is not the model of" in err and len(err.splitlines()) == 1
    assert not (run / "eval").exists()


def test_interrupted_eval_resumes(selected_run, tmp_path, monkeypatch):
    """Answers of finished samples are kept in parts; a re-run only does the rest."""
    from fastv_analysis.evaluate import answer, parts

    run = tmp_path / "run"
    shutil.copytree(selected_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    shutil.rmtree(run / ".eval-parts", ignore_errors=True)
    monkeypatch.setattr(parts, "PART_SAMPLES", 1)  # the modules the answer loop reads
    real = answer.evaluate_sample
    seen = []

    def dying(loaded, prepared, *args, **kwargs):
        seen.append(prepared.sample_id)
        if len(seen) == 3:
            raise RuntimeError("killed")
        return real(loaded, prepared, *args, **kwargs)

    monkeypatch.setattr(answer, "evaluate_sample", dying)
    with pytest.raises(RuntimeError, match="killed"):
        main(["eval", str(run), "--quiet"])
    assert not (run / "eval").exists()
    seen.clear()
    assert main(["eval", str(run), "--quiet"]) == 0
    assert seen == [2, 3]  # samples 0 and 1 came from the parts
    resumed = pl.read_parquet(run / "eval" / "predictions.parquet").sort(["sample_id", "agg_layer", "config", "keep"])
    shutil.rmtree(run / ".eval-parts")
    monkeypatch.setattr(answer, "evaluate_sample", real)
    assert main(["eval", str(run), "--quiet"]) == 0
    fresh = pl.read_parquet(run / "eval" / "predictions.parquet").sort(["sample_id", "agg_layer", "config", "keep"])
    assert resumed.select("sample_id", "config", "keep", "prediction").equals(
        fresh.select("sample_id", "config", "keep", "prediction"))


def test_selections_from_an_overwritten_capture_are_refused(selected_run, tmp_path, capsys):
    """select/ made from the old capture must not be replayed against a new one."""
    run = tmp_path / "run"
    shutil.copytree(selected_run, run)
    info = json.loads((run / "select" / "select.json").read_text())
    info["run_model_fingerprint"] = "0" * 16  # as if select ran on another capture
    (run / "select" / "select.json").write_text(json.dumps(info))
    assert main(["eval", str(run), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "was made from another capture" in err and len(err.splitlines()) == 1


def test_capture_overwrite_removes_derived_stages(selected_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(selected_run, run)
    config = json.loads((run / "run.json").read_text())
    data = config["data"]
    assert main(["capture", "--model", config["model"], "--data", data, "--out", str(run), "--agg-layers", "1",
                 "--store-dtype", "float32", "--max-new-tokens", "3", "--overwrite", "--quiet"]) == 0
    assert not (run / "select").exists() and not (run / "eval").exists() and not (run / ".eval-parts").exists()


def test_eval_in_another_dtype_is_the_same_model(selected_run, tmp_path):
    """The fingerprint identifies the checkpoint, not the dtype it is loaded in."""
    run = tmp_path / "run"
    shutil.copytree(selected_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    assert main(["eval", str(run), "--dtype", "bfloat16", "--keep", "64", "--methods", "avg_all_heads", "--quiet"]) == 0
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet")
    assert sorted(acc.select("agg_layer", "config").rows()) == [(1, "avg_all_heads"), (1, "full"), (2, "avg_all_heads"),
                                                                (2, "full")]  # K = 0 has no avg_all_heads


def test_eval_at_k0_prunes_the_input_as_apply_fastv_does(selected_run):
    """K = 0 offline (select's per-sample random sets, eval's input pruning) == online FastV at K = 0."""
    from PIL import Image

    from fastv_analysis.loading import build_prompt
    from fastv_analysis.pruning import apply_fastv

    pred, samples, model, proc = _evaluated(selected_run)
    rows = pred.filter(pl.col("agg_layer") == 0, pl.col("method") == "random", pl.col("keep") == 8)
    assert rows.height == 4
    for row in rows.iter_rows(named=True):
        s = samples.filter(pl.col("sample_id") == row["sample_id"]).row(0, named=True)
        inputs = proc(text=[build_prompt(proc, s["question"])], images=[Image.open(s["image"]).convert("RGB")],
                      return_tensors="pt")
        with torch.no_grad(), apply_fastv(model, agg_layer=0, keep=8, method="random", seed=0,
                                          sample_ids=[row["sample_id"]]) as fast:
            out = fast.generate(**inputs, max_new_tokens=3, do_sample=False)
            kept = fast.last_selection_metadata["kept_indices"][0].tolist()
        chosen = pl.read_parquet(selected_run / "select" / "selections.parquet").filter(
            pl.col("agg_layer") == 0, pl.col("method") == "random", pl.col("keep") == 8,
            pl.col("sample_id") == row["sample_id"])
        assert chosen["kept"].to_list() == [kept]
        online = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert online == row["prediction"], row
    sel = pl.read_parquet(selected_run / "select" / "selections.parquet")
    k0 = sel.filter(pl.col("agg_layer") == 0)
    assert set(k0["method"].unique().to_list()) == {"random", "uniform"}
    # the same sample keeps the same random set whatever K (keyed by seed and sample only)
    k2 = sel.filter(pl.col("agg_layer") == 2, pl.col("method") == "random")
    assert k0.filter(pl.col("method") == "random").sort("sample_id", "keep")["kept"].to_list() == \
        k2.sort("sample_id", "keep")["kept"].to_list()


def _hand_predictions() -> pl.DataFrame:
    """Six samples at layer 2: full, avg_all_heads and random at keep 8, correctness by hand."""
    correct = {"full": [1, 1, 1, 1, 0, 0], "avg_all_heads": [1, 0, 0, 0, 0, 0], "random": [1, 1, 1, 0, 0, 1]}
    rows = []
    for method, values in correct.items():
        for sid, c in enumerate(values):
            rows.append({"sample_id": sid, "agg_layer": 2, "method": method, "config": method, "alpha": None,
                         "keep": 16 if method == "full" else 8, "correct": bool(c), "prompt_tokens": 30,
                         "n_image_tokens": 16})
    return pl.DataFrame(rows, schema_overrides={"alpha": pl.Float64})


def test_accuracy_table_against_hand_computed_values():
    from fastv_analysis.evaluate import accuracy_table

    timing = pl.DataFrame({"agg_layer": [2, 2], "keep": [16, 8], "n_sets": [1, 2], "prefill_seconds": [0.1, 0.1],
                           "decode_seconds": [0.1, 0.1], "decode_tokens": [1, 2]})
    acc = accuracy_table(_hand_predictions(), timing, {"num_layers": 4, "hidden": 32, "intermediate": 64})
    row = {r["config"]: r for r in acc.iter_rows(named=True)}
    assert row["full"]["accuracy"] == pytest.approx(4 / 6) and row["full"]["mcnemar_p_vs_full"] is None
    avg, rnd = row["avg_all_heads"], row["random"]
    assert avg["accuracy"] == pytest.approx(1 / 6) and avg["delta_vs_full"] == pytest.approx(1 / 6 - 4 / 6)
    assert rnd["delta_vs_full"] == pytest.approx(0.0)
    # avg vs full: 0 pairs only avg right, 3 only full right -> 2 * (1/2)^3
    assert avg["mcnemar_p_vs_full"] == pytest.approx(0.25)
    # random vs full: one discordant pair each way -> 1
    assert rnd["mcnemar_p_vs_full"] == pytest.approx(1.0)
    # random vs avg: 3 only random right, 0 only avg right -> 0.25
    assert rnd["mcnemar_p_vs_avg"] == pytest.approx(0.25) and avg["mcnemar_p_vs_avg"] is None
    # Holm over the column's two tests: 0.25 * 2 = 0.5; max(0.5, 1.0 * 1) = 1.0
    assert avg["mcnemar_p_vs_full_holm"] == pytest.approx(0.5) and rnd["mcnemar_p_vs_full_holm"] == pytest.approx(1.0)
    # BH: 1.0 * 2/2 = 1.0; min(0.25 * 2/1, 1.0) = 0.5
    assert avg["mcnemar_p_vs_full_bh"] == pytest.approx(0.5)
    # avg vs random: 0 pairs only avg right, 3 only random right -> 2 * (1/2)^3 = 0.25; random has none
    assert avg["mcnemar_p_vs_random"] == pytest.approx(0.25) and rnd["mcnemar_p_vs_random"] is None
    assert avg["delta_vs_random"] == pytest.approx(1 / 6 - 4 / 6) and row["full"]["mcnemar_p_vs_random"] is None
    # Wilson 95% of 1/6 (closed form)
    z, n, p = 1.959963984540054, 6, 1 / 6
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert (avg["ci_lo"], avg["ci_hi"]) == (pytest.approx(centre - half), pytest.approx(centre + half))


def test_prefill_speedup_is_the_median_of_paired_ratios():
    from fastv_analysis.evaluate import _config_times

    rows = []
    for sid, (full, pruned) in enumerate([((10, 20, 30), (5, 10, 30)), ((8, 8, 8), (4, 2, 8))]):
        for rep in range(3):
            rows.append({"sample_id": sid, "agg_layer": 2, "config": "full", "keep": 16, "repeat": rep,
                         "prefill_seconds": full[rep] / 1e3, "decode_seconds": 0.0, "decode_tokens": 0})
            rows.append({"sample_id": sid, "agg_layer": 2, "config": "random", "keep": 8, "repeat": rep,
                         "prefill_seconds": pruned[rep] / 1e3, "decode_seconds": 3e-3, "decode_tokens": 3})
    out = _config_times(pl.DataFrame(rows), {"agg_layer": 2, "config": "random", "keep": 8})
    # ratios 2, 2, 1, 2, 4, 1 -> median 2; prefill ms 5, 10, 30, 4, 2, 8 -> median 6.5
    assert out["prefill_speedup_vs_full"] == pytest.approx(2.0)
    assert out["prefill_ms"] == pytest.approx(6.5) and out["timing_n"] == 6
    assert out["decode_ms_per_token"] == pytest.approx(1.0)


def test_relations_pool_within_sample_and_correct_for_many_tests():
    from fastv_analysis import stats
    from fastv_analysis.evaluate import STATISTICS, relations_table

    frame = _hand_predictions().filter(pl.col("method") != "full")
    rng = __import__("numpy").random.default_rng(0)
    frame = frame.with_columns(**{s: pl.Series(rng.random(frame.height)) for s in STATISTICS})
    frame = frame.with_columns(max_head_share=pl.col("sample_id").cast(pl.Float64) / 10)  # a sample property
    rel = relations_table(frame, n_permutations=200)
    pooled = rel.filter(pl.col("scope") == "within_sample")
    # only random is pooled (avg_all_heads is the reference): one row per stratum -> nothing varies within
    assert (pooled["n_strata"] == 0).all() and pooled["r_within"].is_null().all()
    per = rel.filter(pl.col("scope") == "configuration")
    p = per["p_value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    assert per["p_holm"].fill_null(float("nan")).to_numpy() == pytest.approx(stats.holm(p), nan_ok=True)
    head = per.filter(pl.col("statistic") == "max_head_share", pl.col("config") == "random").row(0, named=True)
    # correctness of random [1,1,1,0,0,1] by share 0..0.5: quartile bins {0,0.1}, {0.2}, {0.3}, {0.4,0.5}
    assert [head[f"accuracy_q{i}"] for i in range(1, 5)] == [1.0, 1.0, 0.0, 0.5]


def test_eval_configs_flag_answers_only_those_selection_labels(selected_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(selected_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    assert main(["eval", str(run), "--configs", "avg_all_heads,random", "--timing-samples", "0", "--quiet"]) == 0
    pred = pl.read_parquet(run / "eval" / "predictions.parquet")
    assert set(pred["config"].unique()) == {"avg_all_heads", "random", "full"}
    assert main(["eval", str(run), "--configs", "avg_all_heads@text_mean", "--quiet"]) != 0
    assert "--configs avg_all_heads@text_mean: not in" in capsys.readouterr().err


def test_every_configuration_is_paired_once_per_sample_with_each_reference_by_configuration_id():
    # Query variants and schedules keep their base method's name (avg_all_heads): joining the
    # references by method gave each sample two or three reference rows (and no p vs
    # avg_all_heads at all for the variants). Every p here is scipy's exact binomial test on
    # the discordant pairs of one (configuration, reference) pair per sample.
    from scipy.stats import binomtest

    from fastv_analysis.evaluate import accuracy_table

    rng = np.random.default_rng(4)
    n = 40
    configs = {"full": ("full", 16), "avg_all_heads": ("avg_all_heads", 8),
               "avg_all_heads@text_mean": ("avg_all_heads", 8), "avg_all_heads@all_mean": ("avg_all_heads", 8),
               "avg_all_heads then max_head K=4 keep 4": ("avg_all_heads", 8), "random": ("random", 8),
               "max_head": ("max_head", 8)}
    truth = {c: rng.random(n) < p for c, p in zip(configs, (0.9, 0.4, 0.6, 0.5, 0.3, 0.7, 0.5))}
    rows = [{"sample_id": sid, "agg_layer": 2, "method": m, "config": c, "alpha": None, "keep": keep,
             "correct": bool(truth[c][sid]), "prompt_tokens": 30, "n_image_tokens": 16, "unit": f"img{sid // 2}"}
            for c, (m, keep) in configs.items() for sid in range(n)]
    pred = pl.DataFrame(rows, schema_overrides={"alpha": pl.Float64})
    timing = pl.DataFrame({"agg_layer": [2, 2], "keep": [16, 8], "n_sets": [1, 6], "prefill_seconds": [0.1, 0.1],
                           "decode_seconds": [0.1, 0.1], "decode_tokens": [1, 2]})
    acc = accuracy_table(pred, timing, {"num_layers": 4, "hidden": 32, "intermediate": 64})
    assert acc.height == len(configs)

    def exact(a, b):
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        return 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue

    for row in acc.iter_rows(named=True):
        c = row["config"]
        assert row["n"] == n and row["n_units"] == n // 2
        for ref, col in (("full", "vs_full"), ("avg_all_heads", "vs_avg"), ("random", "vs_random")):
            if c == ref or c == "full":
                assert row[f"mcnemar_p_{col}"] is None, (c, ref)
                continue
            assert row[f"mcnemar_p_{col}"] == pytest.approx(exact(truth[c], truth[ref]), rel=1e-12), (c, ref)
            # the unit-level test sums each image's two questions: never the per-question p here
            d = (truth[c].astype(int) - truth[ref].astype(int)).reshape(-1, 2).sum(1)
            assert row[f"unit_p_{col}"] == pytest.approx(stats_unit_p(d), rel=1e-9), (c, ref)
        if c != "full":
            assert row["delta_vs_random"] == (None if c == "random" else pytest.approx(
                truth[c].mean() - truth["random"].mean()))


def stats_unit_p(d):
    """Exact sign-flip p of unit sums d, counting the 2^k sign patterns of the non-zero ones
    (by their sums, with integer counts; not through the code under test)."""
    from collections import Counter

    nz = d[d != 0]
    if nz.size == 0:
        return 1.0
    dist = Counter({0: 1})
    for v in nz:
        nxt = Counter()
        for t, w in dist.items():
            nxt[t + v] += w
            nxt[t - v] += w
        dist = nxt
    total = 2 ** nz.size
    return sum(w for t, w in dist.items() if abs(t) >= abs(nz.sum())) / total
