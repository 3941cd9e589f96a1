"""LLaVA-NeXT (anyres tiles + image_newline tokens): the LLaVA adapter's hooks on a tiny
random checkpoint built from transformers' own config and PIL processor classes, and a run
whose images give different numbers of image tokens."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from fastv_analysis.cli.main import main

SIZES = [(56, 56), (120, 80), (80, 120), (56, 56), (200, 90)]


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    from fastv_analysis.toy.checkpoint import save_tiny_llava_next_checkpoint

    return save_tiny_llava_next_checkpoint(tmp_path_factory.mktemp("next") / "m", seed=1)


@pytest.fixture(scope="module")
def loaded(next_checkpoint):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(next_checkpoint).eval()
    return model, AutoProcessor.from_pretrained(next_checkpoint)


def _inputs(proc, size, seed=0, question="what color is the object?"):
    from fastv_analysis.loading import build_prompt

    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    return proc(text=[build_prompt(proc, question)], images=[image], return_tensors="pt")


@pytest.mark.parametrize("size", [(56, 56), (200, 90)])
def test_llava_next_hooks_contract(loaded, size):
    """keep-all == unpruned, drop == mask, recorder rows == eager attention, K = 0 works."""
    from fastv_analysis.attention import AttentionRecorder
    from fastv_analysis.pruning import FastVConfig, apply_fastv, image_positions

    model, proc = loaded
    inputs = _inputs(proc, size)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image > 16  # the 4 x 4 base tile, then high-res tiles and newline tokens
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        with apply_fastv(model, FastVConfig(agg_layer=2, keep=n_image)) as m:
            assert torch.equal(m(**inputs).logits[:, -1], full)
        for agg_layer in (0, 1, 2):
            outs = []
            for mode in ("drop", "mask"):
                with apply_fastv(model, FastVConfig(agg_layer=agg_layer, keep=7, method="avg_all_heads",
                                                    mode=mode)) as m:
                    outs.append(m(**inputs).logits[:, -1])
            assert (outs[0] - outs[1]).abs().max() <= 1e-4
        with AttentionRecorder(model, [1], "last") as rec:
            model(**inputs)
        eager = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        model.model.language_model.config._attn_implementation = "eager"
        try:
            att = model(**inputs, output_attentions=True).attentions[1]
        finally:
            model.config._attn_implementation = eager
            model.model.language_model.config._attn_implementation = eager
    assert (rec.rows[1][:, :, 0, :] - att[:, :, -1, :]).abs().max() <= 1e-5
    assert image_positions(inputs["input_ids"], model.config.image_token_id).shape[1] == n_image


def test_llava_next_run_with_mixed_image_sizes(next_checkpoint, tmp_path):
    """capture -> select -> eval -> report when every image has its own number of tokens."""
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(data / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"images/{i}.png", "text": "what color?",
                                 "answer": "red", "category": "color"}))
    (data / "questions.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["capture", "--model", str(next_checkpoint), "--data", str(data / "questions.jsonl"), "--out", str(run),
                 "--agg-layers", "0,2", "--max-new-tokens", "2", "--batch-size", "2", "--quiet"]) == 0
    samples = pl.read_parquet(run / "samples.parquet")
    assert samples["n_image_tokens"].n_unique() == 4
    assert main(["select", str(run), "--keep", "16,4", "--alphas", "0.5", "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    joined = sel.join(samples.select("sample_id", "n_image_tokens"), on="sample_id")
    assert (joined["keep_ratio"] - joined["keep"] / joined["n_image_tokens"]).abs().max() < 1e-12
    assert main(["select", str(run), "--keep", "64", "--quiet"]) != 0  # more than the smallest sample has
    assert main(["select", str(run), "--keep", "16,4", "--alphas", "0.5", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "1", "--compare-mask", "2", "--quiet"]) == 0
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet")
    assert acc.filter(pl.col("method") == "full").height == 2  # one full control per layer, whatever N
    assert (acc["n"] == 5).all()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()
