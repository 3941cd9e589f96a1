"""Runs a researcher can rely on (issue 12): paths, threads, stale stages, growing runs,
<image> in the question text, and the small defects."""

import json
import os

import polars as pl
import pytest
import torch

from conftest import make_llava_inputs, make_tiny_llava, write_questions
from fastv_analysis.cli.main import main
from fastv_analysis.store import open_run


def capture(model, data, out, *extra):
    return main(["capture", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet", *extra])


def test_relative_data_path_works_from_another_directory(checkpoints, tmp_path, monkeypatch, capsys):
    """capture with relative --data in one directory, select and eval from another."""
    write_questions(tmp_path / "work" / "d", n=2)
    monkeypatch.chdir(tmp_path / "work")
    assert capture(checkpoints["mha"], "d/questions.jsonl", "run", "--max-new-tokens", "2") == 0
    config = json.loads((tmp_path / "work" / "run" / "run.json").read_text())
    assert os.path.isabs(config["data"]) and config["data_relative"] == os.path.join("..", "d", "questions.jsonl")
    samples = pl.read_parquet(tmp_path / "work" / "run" / "samples.parquet")
    assert all(os.path.isabs(p) for p in samples["image"].to_list())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = str(tmp_path / "work" / "run")
    assert main(["select", run, "--keep", "8", "--methods", "avg_all_heads,random", "--quiet"]) == 0
    assert main(["eval", run, "--timing-samples", "0", "--quiet"]) == 0, capsys.readouterr().err
    assert main(["report", run]) == 0, capsys.readouterr().err  # the notebook opens the images by their paths
    assert (tmp_path / "work" / "run" / "report.html").exists()
    assert not list((tmp_path / "work" / "run").glob(".report.tmp-*"))
    # a run moved together with its data still finds the question file through data_relative
    (tmp_path / "work").rename(tmp_path / "moved")
    assert open_run(tmp_path / "moved" / "run").data_path == (tmp_path / "moved" / "d" / "questions.jsonl").resolve()


def test_threads_option_sets_torch_threads(tmp_path):
    from fastv_analysis.store import write_synthetic_run

    write_synthetic_run(tmp_path / "run", {2: torch.rand(3, 2, 16)})
    before = torch.get_num_threads()
    try:
        assert main(["select", str(tmp_path / "run"), "--keep", "4", "--threads", "2", "--quiet"]) == 0
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert main(["select", str(tmp_path / "run"), "--keep", "4", "--quiet"]) == 0
        assert torch.get_num_threads() == 1  # the default
    finally:
        torch.set_num_threads(before)
        os.environ["OMP_NUM_THREADS"] = "1"


def test_capture_grows_with_a_larger_limit(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=4)
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--limit", "2") == 0
    capsys.readouterr()
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--limit", "4") == 0
    out = capsys.readouterr().out
    assert "2 new samples (2 already done" in out
    assert open_run(tmp_path / "run").samples["sample_id"].to_list() == [0, 1, 2, 3]
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--limit", "1") == 0  # adds nothing, removes nothing
    assert open_run(tmp_path / "run").samples.height == 4


def test_stale_stages_are_refused(checkpoints, tmp_path, capsys):
    """select after eval -> the report's inputs changed; capture extended after select -> eval refuses."""
    from fastv_analysis.provenance import stale_stages

    data = write_questions(tmp_path / "d", n=3)
    run = tmp_path / "run"
    assert capture(checkpoints["mha"], data, run, "--limit", "2", "--max-new-tokens", "2") == 0
    assert main(["select", str(run), "--keep", "8", "--methods", "avg_all_heads,random", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0
    assert stale_stages(open_run(run)) == {}
    assert main(["select", str(run), "--keep", "4", "--methods", "avg_all_heads,random", "--quiet"]) == 0
    assert list(stale_stages(open_run(run))) == ["eval"]
    capsys.readouterr()
    assert main(["report", str(run)]) != 0  # accuracy of one grid beside overlap of another: refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fastv-analyze eval" in err and not (run / "report.html").exists()
    assert capture(checkpoints["mha"], data, run, "--max-new-tokens", "2") == 0  # extends to 3 samples
    assert "select" in stale_stages(open_run(run))
    capsys.readouterr()
    assert main(["eval", str(run), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fastv-analyze select" in err


def test_eval_filter_matching_nothing_says_so(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=1)
    run = tmp_path / "run"
    assert capture(checkpoints["mha"], data, run, "--max-new-tokens", "2") == 0
    assert main(["select", str(run), "--keep", "8", "--methods", "avg_all_heads,random", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--methods", "max_head", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--methods max_head: not in" in err and len(err.splitlines()) == 1
    assert main(["eval", str(run), "--keep", "5", "--quiet"]) != 0
    assert "--keep 5: not in" in capsys.readouterr().err


def _placeholder_first(lines, folder):
    rows = [json.loads(x) for x in lines]
    rows[0]["text"] = "<image>\n" + rows[0]["text"]
    return [json.dumps(r) for r in rows]


def test_image_placeholder_in_the_question_is_used_not_doubled(checkpoints, tmp_path):
    from transformers import AutoProcessor

    from fastv_analysis.loading import build_prompt

    proc = AutoProcessor.from_pretrained(checkpoints["mha"])
    assert build_prompt(proc, "<image>\nWhat color?") == build_prompt(proc, "What color?")
    assert build_prompt(proc, "<image>\nWhat color?", template="USER: <image>\n{question} ASSISTANT:") == \
        "USER: <image>\nWhat color? ASSISTANT:"
    data = write_questions(tmp_path / "d", n=2, broken=_placeholder_first)
    plain = write_questions(tmp_path / "p", n=2)
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--max-new-tokens", "2") == 0
    assert capture(checkpoints["mha"], plain, tmp_path / "plain", "--max-new-tokens", "2") == 0
    with_placeholder, without = open_run(tmp_path / "run").samples, open_run(tmp_path / "plain").samples
    assert with_placeholder["n_image_tokens"].to_list() == [576, 576]
    assert with_placeholder["prompt_tokens"].to_list() == without["prompt_tokens"].to_list()
    assert with_placeholder["prediction"].to_list() == without["prediction"].to_list()


def _two_placeholders(lines, folder):
    rows = [json.loads(x) for x in lines]
    rows[1]["text"] = "<image> and <image>: which is red?"
    return [json.dumps(r) for r in rows]


def test_processor_errors_name_the_sample_and_are_skippable(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=3, broken=_two_placeholders)
    assert capture(checkpoints["mha"], data, tmp_path / "run") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "question q1" in err and str(data) in err and "2 <image>" in err
    assert not (tmp_path / "run").exists()  # nothing written for a run that captured nothing
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--skip-bad") == 0
    out = capsys.readouterr().out
    errors = (tmp_path / "run" / "errors.jsonl").read_text().splitlines()
    assert f"{len(errors)} bad" in out and len(errors) == 1


def test_skip_bad_count_includes_malformed_lines(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=3, broken=lambda lines, folder: lines[:2] + ["{oops"] + lines[2:])
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--skip-bad") == 0
    out = capsys.readouterr().out
    errors = (tmp_path / "run" / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and "1 bad" in out
    assert "at at" not in errors[0] and "column" in errors[0]


def test_a_capture_where_every_sample_is_bad_leaves_nothing(checkpoints, tmp_path, capsys):
    def all_missing(lines, folder):
        return [json.dumps({**json.loads(x), "image": "images/none.png"}) for x in lines]

    data = write_questions(tmp_path / "d", n=2, broken=all_missing)
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--skip-bad") != 0
    err = capsys.readouterr().err.strip()
    assert "no sample could be captured" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_model_directory_is_named(tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=1)
    assert capture(tmp_path / "no-such-model", data, tmp_path / "run") != 0
    err = capsys.readouterr().err.strip()
    assert "no such directory" in err and len(err.splitlines()) == 1


def test_apply_fastv_takes_a_config_and_overrides():
    from fastv_analysis.pruning import FastVConfig, apply_fastv

    model = make_tiny_llava()
    inputs = make_llava_inputs(model)
    cfg = FastVConfig(agg_layer=2, keep=5)
    with torch.no_grad(), apply_fastv(model, cfg, mode="mask") as m:
        assert m.fastv.mode == "mask" and cfg.mode == "drop"  # a copy; the caller's config is untouched
        m(**inputs)
    with pytest.raises(ValueError, match="unknown FastV config key"):
        apply_fastv(model, cfg, colour="red")


def test_object_membership_and_coverage_by_hand():
    import numpy as np

    from fastv_analysis import stats

    tokens = np.array([[0, 0, 14, 14], [14, 0, 28, 14]])
    assert stats.object_membership(tokens, np.array([[7, 0, 28, 14]])).tolist() == [[True], [True]]  # 98 of 196 px
    assert stats.object_membership(tokens, np.array([[8, 0, 28, 14]])).tolist() == [[False], [True]]  # 84 of 196
    membership = np.zeros((2, 4, 2), dtype=bool)
    membership[0, 0, 0] = membership[0, 3, 1] = True
    valid = np.array([[True, True], [False, False]])
    cov = stats.object_coverage(np.array([[0, 1], [0, 1]]), membership, valid)
    assert cov["object_token_share"][0] == 0.5 and cov["objects_touched"][0] == 0.5
    assert np.isnan(cov["object_token_share"][1]) and np.isnan(cov["objects_touched"][1])
    cov = stats.object_coverage(np.array([[0, 3], [1, 2]]), membership, valid)
    assert cov["object_token_share"][0] == 1.0 and cov["objects_touched"][0] == 1.0


def _with_objects(lines, folder):
    rows = [json.loads(x) for x in lines]
    for r in rows:
        r["objects"] = [[0, 0, 28, 28], [322, 322, 336, 336]]  # tokens {0, 1, 24, 25} and {575}
    return [json.dumps(r) for r in rows]


def test_select_measures_object_coverage_of_each_kept_set(checkpoints, tmp_path):
    data = write_questions(tmp_path / "d", n=2, broken=_with_objects)
    run = tmp_path / "run"
    assert capture(checkpoints["mha"], data, run, "--max-new-tokens", "2") == 0
    assert main(["select", str(run), "--keep", "64,8", "--methods", "avg_all_heads,random,uniform", "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    first, second = {0, 1, 24, 25}, {575}
    for row in sel.iter_rows(named=True):
        kept = set(row["kept"])
        assert row["object_token_share"] == pytest.approx(len(kept & (first | second)) / len(kept))
        assert row["objects_touched"] == pytest.approx((bool(kept & first) + bool(kept & second)) / 2)
    bad = write_questions(tmp_path / "b", n=1, broken=lambda lines, f: [json.dumps({**json.loads(lines[0]),
                                                                                      "objects": [[5, 5, 1, 9]]})])
    assert capture(checkpoints["mha"], bad, tmp_path / "run2") != 0


def test_attention_is_stored_as_float32_by_default(checkpoints, tmp_path):
    """float16 storage can swap near-ties against the model's own row: exact is the default."""
    from safetensors import safe_open

    data = write_questions(tmp_path / "d", n=1)
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--max-new-tokens", "1") == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["store_dtype"] == "float32"
    part = next((tmp_path / "run" / "attention").glob("*.safetensors"))
    with safe_open(str(part), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_select_with_a_single_control_at_k0(checkpoints, tmp_path):
    """K = 0 has only the controls; one of them alone has no pairs: select must still merge."""
    data = write_questions(tmp_path / "d", n=2)
    run = tmp_path / "run"
    assert capture(checkpoints["mha"], data, run, "--agg-layers", "0,2", "--max-new-tokens", "1") == 0
    assert main(["select", str(run), "--methods", "avg_all_heads,max_head,random", "--keep", "64,8", "--quiet"]) == 0
    overlap = pl.read_parquet(run / "select" / "overlap.parquet")
    assert set(overlap["agg_layer"].unique().to_list()) == {2} and not (run / ".select.tmp").exists()
    assert main(["select", str(run), "--methods", "random", "--agg-layer", "0", "--keep", "8", "--quiet"]) == 0
    assert pl.read_parquet(run / "select" / "overlap.parquet").height == 0


def test_eval_in_another_dtype_does_not_reuse_answers(checkpoints, tmp_path, monkeypatch):
    from fastv_analysis.evaluate import answer

    data = write_questions(tmp_path / "d", n=2)
    run = tmp_path / "run"
    assert capture(checkpoints["mha"], data, run, "--max-new-tokens", "1") == 0
    assert main(["select", str(run), "--methods", "random", "--keep", "8", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0
    calls = []
    real = answer.evaluate_sample  # the answer loop reads it from its own module
    monkeypatch.setattr(answer, "evaluate_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0
    assert calls == []  # same numerics: resumed from the parts
    assert main(["eval", str(run), "--timing-samples", "0", "--dtype", "bfloat16", "--quiet"]) == 0
    assert len(calls) == 2  # bfloat16 answers are computed, not copied from float32


def test_k0_uniform_online_keeps_the_lattice_as_select_does():
    from fastv_analysis.pruning import FastVConfig, apply_fastv
    from fastv_analysis.strategies import uniform_indices

    model = make_tiny_llava()
    inputs = make_llava_inputs(model, before=[3, 5], after=[4, 2])
    with torch.no_grad(), apply_fastv(model, FastVConfig(agg_layer=0, keep=4, method="uniform")) as m:
        m(**inputs)
        kept = m.last_selection_metadata["kept_indices"]
    assert kept.tolist() == [uniform_indices(16, 4).tolist()] * 2


def test_objects_no_token_can_lie_on_are_not_counted():
    import numpy as np

    from fastv_analysis import stats

    membership = np.zeros((1, 4, 2), dtype=bool)
    membership[0, 1, 0] = True  # object 1: outside the crop, no token on it
    cov = stats.object_coverage(np.array([[0, 1, 2, 3]]), membership, np.array([[True, True]]))
    assert cov["objects_touched"][0] == 1.0
