"""The eval stage: replaying the select stage's kept sets with the pruned model."""

import json
import shutil

import polars as pl
import pytest
import torch

from conftest import write_questions
from fastv_analysis.cli.main import main


@pytest.fixture(scope="module")
def selected_run(checkpoints, tmp_path_factory):
    """capture (float32 storage) -> select on a tiny random 3-layer model, 4 samples."""
    root = tmp_path_factory.mktemp("evalrun")
    model = root / "model"
    shutil.copytree(checkpoints["gqa"], model)
    data = write_questions(root / "d", n=4)
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data), "--out", str(run), "--agg-layers", "1,2",
                 "--store-dtype", "float32", "--max-new-tokens", "3", "--quiet"]) == 0
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
    assert pred.height == sel.height  # every configuration answered
    info = json.loads((ev / "eval.json").read_text())
    distinct = sel.select("sample_id", "agg_layer", "keep", "selection_id").unique().height
    assert info["distinct_kept_sets"] == distinct < info["configurations_asked"] == sel.height
    assert info["shared_prefills"] == sel.select("sample_id", "agg_layer", "keep").unique().height
    # configurations with the same kept set got the same answer
    same = pred.group_by(["sample_id", "agg_layer", "keep", "selection_id"]).agg(pl.col("prediction").n_unique())
    assert (same["prediction"] == 1).all()
    acc = pl.read_parquet(ev / "accuracy.parquet")
    assert acc.height == sel.select("agg_layer", "config", "keep").unique().height
    for col in ("accuracy", "n", "ci_lo", "ci_hi", "delta_vs_full", "mcnemar_p_vs_avg", "flops_ratio",
                "equivalent_image_tokens", "prefill_ms", "decode_ms_per_token", "prefill_speedup_vs_full",
                "batched_prefill_ms_per_set"):
        assert col in acc.columns
    timed = pl.read_parquet(ev / "config_timing.parquet")
    assert timed["sample_id"].n_unique() == 4  # --timing-samples defaults to 5; the run has 4
    assert timed.filter(pl.col("config") == "full model").height == 4
    assert (acc["timing_n"] == 4).all() and (acc["prefill_ms"] > 0).all()
    assert (acc["ci_lo"] <= acc["accuracy"]).all() and (acc["accuracy"] <= acc["ci_hi"]).all()
    rel = pl.read_parquet(ev / "relations.parquet")
    assert set(rel["scope"].unique()) == {"pooled", "configuration"}
    assert {"jaccard_vs_avg", "max_head_share", "head_entropy", "bottom_share"} <= set(rel["statistic"].unique())


def test_eval_answers_equal_online_fastv(selected_run):
    """capture -> select -> eval agree token for token with FastV ranking online in the model."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from fastv_analysis.loading import build_prompt
    from fastv_analysis.pruning import apply_fastv

    if not (selected_run / "eval" / "predictions.parquet").exists():
        assert main(["eval", str(selected_run), "--quiet"]) == 0
    pred = pl.read_parquet(selected_run / "eval" / "predictions.parquet")
    samples = pl.read_parquet(selected_run / "samples.parquet")
    config = json.loads((selected_run / "run.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(config["model"]).eval()
    proc = AutoProcessor.from_pretrained(config["model"])
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
    from fastv_analysis import evaluate

    run = tmp_path / "run"
    shutil.copytree(selected_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    shutil.rmtree(run / ".eval-parts", ignore_errors=True)
    monkeypatch.setattr(evaluate, "PART_SAMPLES", 1)
    real = evaluate.evaluate_sample
    seen = []

    def dying(loaded, prepared, *args, **kwargs):
        seen.append(prepared.sample_id)
        if len(seen) == 3:
            raise RuntimeError("killed")
        return real(loaded, prepared, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_sample", dying)
    with pytest.raises(RuntimeError, match="killed"):
        main(["eval", str(run), "--quiet"])
    assert not (run / "eval").exists()
    seen.clear()
    assert main(["eval", str(run), "--quiet"]) == 0
    assert seen == [2, 3]  # samples 0 and 1 came from the parts
    resumed = pl.read_parquet(run / "eval" / "predictions.parquet").sort(["sample_id", "agg_layer", "config", "keep"])
    shutil.rmtree(run / ".eval-parts")
    monkeypatch.setattr(evaluate, "evaluate_sample", real)
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
    assert pl.read_parquet(run / "eval" / "accuracy.parquet").height == 2  # layers 1 and 2
