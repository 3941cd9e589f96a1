"""The capture stage, through the CLI, on tiny random checkpoints saved like real ones."""

import json

import polars as pl
import pytest
import torch

from fastv_analysis.cli.main import main
from fastv_analysis.store import STORAGE_COLUMNS, open_run

from conftest import write_questions

def capture(model, data, out, *extra):
    return main(["capture", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet", *extra])


def test_capture_then_select_end_to_end(checkpoints, tmp_path):
    data = write_questions(tmp_path / "d")
    run_dir = tmp_path / "run"
    assert capture(checkpoints["mha"], data, run_dir, "--agg-layers", "1,2", "--batch-size", "2") == 0
    run = open_run(run_dir)
    assert run.samples.height == 5 and run.agg_layers == [1, 2]
    assert set(run.samples.columns) >= {"sample_id", "question_id", "question", "answer", "prediction", "correct",
                                        "image_start", "n_image_tokens", "prompt_tokens", "shard"}
    a = run.last_token_attention(3, 2)
    assert a.shape == (2, 576) and a.dtype == torch.float32
    assert (a >= 0).all() and (a.sum(-1) <= 1.0 + 1e-3).all()
    config = json.loads((run_dir / "run.json").read_text())
    for key in ("model", "model_fingerprint", "data_sha256", "agg_layers", "dtype", "versions", "command"):
        assert key in config
    assert main(["select", str(run_dir), "--keep", "64,8", "--alphas", "0.5", "--quiet"]) == 0
    sel = pl.read_parquet(run_dir / "select" / "selections.parquet")
    assert sel.height == 2 * 5 * 5 * 2  # layers x samples x configs x keeps


def _eager_rows(checkpoint, data_file, layer):
    """Independent reference: eager attention with output_attentions, one sample at a time."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from fastv_analysis.data import load_questions
    from fastv_analysis.loading import build_prompt
    from PIL import Image

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(checkpoint)
    out = []
    for q in load_questions(data_file):
        inputs = proc(text=[build_prompt(proc, q.text)], images=[Image.open(q.image).convert("RGB")],
                      return_tensors="pt")
        with torch.no_grad():
            att = model(**inputs, output_attentions=True).attentions[layer][0]  # [H, S, S]
        pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
        out.append(att[:, -1, pos])
    return out


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_stored_rows_equal_eager_attention(checkpoints, tmp_path, kind):
    data = write_questions(tmp_path / "d", n=3)
    run_dir = tmp_path / "run"
    assert capture(checkpoints[kind], data, run_dir, "--agg-layers", "2", "--store-dtype", "float32",
                   "--batch-size", "3") == 0
    run = open_run(run_dir)
    for sample_id, ref in enumerate(_eager_rows(checkpoints[kind], data, layer=1)):
        got = run.last_token_attention(sample_id, 2)
        assert (got - ref).abs().max().item() <= 1e-5


def test_left_padded_batches_equal_single_samples(checkpoints, tmp_path):
    """Prompts of different lengths in one batch: spans found from the ids, padding ignored."""
    data = write_questions(tmp_path / "d", n=5)
    for bs in ("1", "5"):
        assert capture(checkpoints["gqa"], data, tmp_path / f"bs{bs}", "--batch-size", bs, "--queries", "text",
                       "--store-dtype", "float32") == 0
    one, five = open_run(tmp_path / "bs1"), open_run(tmp_path / "bs5")
    assert one.samples["prompt_tokens"].n_unique() > 1  # the batch really was padded
    assert one.samples["image_start"].to_list() == five.samples["image_start"].to_list()
    assert one.samples["prediction"].to_list() == five.samples["prediction"].to_list()
    for s in range(5):
        torch.testing.assert_close(one.last_token_attention(s, 2), five.last_token_attention(s, 2), atol=1e-5, rtol=0)
        t1, t5 = one.text_attention(s, 2), five.text_attention(s, 2)
        n_after = one.samples["prompt_tokens"][s] - one.samples["image_start"][s] - 576
        assert t1.shape == (4, n_after, 576)
        torch.testing.assert_close(t1, t5, atol=1e-5, rtol=0)
        torch.testing.assert_close(t1[:, -1], one.last_token_attention(s, 2))


def test_interrupted_capture_resumes_without_duplicates(checkpoints, tmp_path, monkeypatch):
    from fastv_analysis import store

    data = write_questions(tmp_path / "d", n=5)
    assert capture(checkpoints["mha"], data, tmp_path / "whole") == 0

    real = store.RunWriter.write_part
    calls = {"n": 0}

    def dying_write(self, rows, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")  # the process dies between two samples
        return real(self, rows, tensors)

    monkeypatch.setattr(store.RunWriter, "write_part", dying_write)
    with pytest.raises(RuntimeError, match="killed"):
        capture(checkpoints["mha"], data, tmp_path / "resumed", "--part-size", "2")
    monkeypatch.setattr(store.RunWriter, "write_part", real)
    assert open_run_parts(tmp_path / "resumed") == [0, 1, 2, 3]  # two parts of two samples survived
    (tmp_path / "resumed" / "attention" / ".part-000-00009.safetensors.tmp-1").write_bytes(b"half")  # debris
    assert not (tmp_path / "resumed" / "samples.parquet").exists()
    assert capture(checkpoints["mha"], data, tmp_path / "resumed") == 0
    whole, resumed = open_run(tmp_path / "whole"), open_run(tmp_path / "resumed")
    assert resumed.samples["sample_id"].to_list() == [0, 1, 2, 3, 4]
    layout = (*STORAGE_COLUMNS, "capture_seconds")  # where and how fast, not what
    assert whole.samples.drop(layout).equals(resumed.samples.drop(layout))
    for s in range(5):
        assert torch.equal(whole.last_token_attention(s, 2), resumed.last_token_attention(s, 2))
    # a third run finds nothing to do
    assert capture(checkpoints["mha"], data, tmp_path / "resumed") == 0
    assert open_run(tmp_path / "resumed").samples.height == 5


def open_run_parts(root):
    return sorted(pl.read_parquet(sorted((root / "attention").glob("part-*.parquet")))["sample_id"].to_list())


def test_mismatched_run_directory_is_refused(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=2)
    assert capture(checkpoints["mha"], data, tmp_path / "run") == 0
    capsys.readouterr()
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--agg-layers", "1") != 0
    err = capsys.readouterr().err
    assert "other settings" in err and "agg_layers" in err and len(err.strip().splitlines()) == 1
    assert capture(checkpoints["gqa"], data, tmp_path / "run") != 0
    assert "model" in capsys.readouterr().err
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--agg-layers", "1", "--overwrite") == 0
    assert open_run(tmp_path / "run").agg_layers == [1]


def _missing_image(lines, folder):
    row = json.loads(lines[1])
    row["image"] = "images/nope.png"
    lines[1] = json.dumps(row)
    return lines


def _unreadable_image(lines, folder):
    (folder / "images" / "1.png").write_bytes(b"not a png")
    return lines


def _too_long(lines, folder):
    row = json.loads(lines[1])
    row["text"] = " ".join(["circle"] * 1100)
    lines[1] = json.dumps(row)
    return lines


@pytest.mark.parametrize("broken, message", [
    (_missing_image, "is missing"),
    (_unreadable_image, "unreadable"),
    (_too_long, "exceed the model's context"),
])
def test_bad_sample_stops_with_one_line_or_is_skipped(checkpoints, tmp_path, capsys, broken, message):
    data = write_questions(tmp_path / "d", n=3, broken=broken)
    assert capture(checkpoints["mha"], data, tmp_path / "run") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "q1" in err and str(data) in err
    assert not (tmp_path / "run" / "samples.parquet").exists()
    assert capture(checkpoints["mha"], data, tmp_path / "run2", "--skip-bad") == 0
    assert open_run(tmp_path / "run2").samples["question_id"].to_list() == ["q0", "q2"]
    errors = [json.loads(x) for x in (tmp_path / "run2" / "errors.jsonl").read_text().splitlines()]
    assert [e["question_id"] for e in errors] == ["q1"] and message in errors[0]["error"]


def test_malformed_json_line_names_file_and_line_or_is_skipped(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=3, broken=lambda lines, folder: lines[:2] + ["{oops"] + lines[2:])
    assert capture(checkpoints["mha"], data, tmp_path / "run") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data}:3: malformed JSON" in err
    assert not (tmp_path / "run").exists()
    assert capture(checkpoints["mha"], data, tmp_path / "run2", "--skip-bad") == 0
    assert open_run(tmp_path / "run2").samples["question_id"].to_list() == ["q0", "q1", "q2"]
    errors = [json.loads(x) for x in (tmp_path / "run2" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], "malformed JSON" in e["error"]) for e in errors] == [(3, True)]


def test_prompt_template_without_image_is_rejected(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=1)
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--prompt-template", "Q: {question} A:") != 0
    assert "<image>" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_agg_layer_out_of_range_is_rejected(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=1)
    assert capture(checkpoints["mha"], data, tmp_path / "run", "--agg-layers", "3") != 0
    assert "--agg-layers 3" in capsys.readouterr().err
