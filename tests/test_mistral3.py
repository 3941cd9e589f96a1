"""Mistral3's row breaks: [IMG_BREAK] / [IMG_END] are the image span's newline tokens, kept or
ranked by the newline policy; each sample's grid is read off them."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from fastv_analysis.adapters import get_adapter, registry
from fastv_analysis.adapters.mistral3 import break_layout, image_token_ids
from fastv_analysis.layout import NEWLINE
from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.pruning import apply_fastv

ARCH = "Mistral3ForConditionalGeneration"


def _image(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def test_break_layout_reads_rows_and_refuses_ragged_rows():
    img, brk, end = 4, 5, 6
    layout = break_layout(np.array([img, img, img, brk, img, img, img, end]), img, (brk, end))
    assert (layout.rows, layout.cols) == (2, 3)
    assert layout.cells.tolist() == [0, 1, 2, NEWLINE, 3, 4, 5, NEWLINE]
    with pytest.raises(RuntimeError, match="equal rows"):
        break_layout(np.array([img, img, brk, img, end]), img, (brk, end))
    with pytest.raises(RuntimeError, match="IMG_END"):
        break_layout(np.array([img, img, brk, img, img]), img, (brk, end))


def test_break_ids_from_the_config_else_mistrals_tokenizer():
    class Config:
        image_token_id = 10

    class Model:
        config = Config()

    assert image_token_ids(Model()) == (10, 12, 13)  # tekken: [IMG] 10, [IMG_BREAK] 12, [IMG_END] 13
    Model.config.image_break_token_id, Model.config.image_end_token_id = 5, 6
    assert image_token_ids(Model()) == (10, 5, 6)


def test_break_policy_keep_keeps_every_break_outside_the_budget_and_select_replays_it(tmp_path):
    """newline="keep": every [IMG_BREAK] / [IMG_END] position is kept and exactly `keep` [IMG]
    tokens; "prune" ranks them (the budget counts the span); select --newline-tokens keep
    replays the online sets."""
    from fastv_analysis.cli.main import main

    model_dir = registry()[ARCH].tiny(tmp_path / "m", seed=1)
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    model, proc = loaded.model, loaded.processor
    img, brk, end = get_adapter(model).image_token_id
    prompts = [build_prompt(proc, q) for q in ("what color?", "is there a red square or not?")]
    inputs = dict(proc(text=prompts, images=[[_image((84, 84), 0)], [_image((200, 90), 1)]], return_tensors="pt",
                       padding=True))
    ids = inputs["input_ids"]
    breaks, patches = (ids == brk) | (ids == end), ids == img
    assert breaks.sum(dim=1).tolist() == [3, 4]  # one per grid row: 3 x 3 and 4 x 8
    for agg_layer in (0, 2):
        with torch.no_grad(), apply_fastv(model, agg_layer=agg_layer, keep=3, newline="keep", sample_ids=[0, 1]) as m:
            m(**inputs)
            kept = m.last_gen_attention_mask
        assert kept[breaks].all() and ((kept & patches).sum(dim=1) == 3).all()
        with torch.no_grad(), apply_fastv(model, agg_layer=agg_layer, keep=3, sample_ids=[0, 1]) as m:
            m(**inputs)
            kept = m.last_gen_attention_mask
        assert ((kept & (patches | breaks)).sum(dim=1) == 3).all()

    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    _image((200, 90), 4).save(data / "images" / "0.png")
    (data / "questions.jsonl").write_text(json.dumps({"question_id": "q0", "image": "images/0.png",
                                                      "text": "what color?", "answer": "red"}) + "\n")
    run = tmp_path / "run"
    assert main(["capture", "--model", str(model_dir), "--data", str(data / "questions.jsonl"), "--out", str(run),
                 "--agg-layers", "2", "--max-new-tokens", "2", "--quiet"]) == 0
    samples = pl.read_parquet(run / "samples.parquet")
    assert samples.select("grid_rows", "grid_cols", "n_image_tokens").rows() == [(4, 8, 36)]
    assert main(["select", str(run), "--keep", "3", "--methods", "avg_all_heads,random", "--newline-tokens", "keep",
                 "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    alone = dict(proc(text=[build_prompt(proc, "what color?")], images=[_image((200, 90), 4)], return_tensors="pt"))
    for method in ("avg_all_heads", "random"):
        with torch.no_grad(), apply_fastv(model, agg_layer=2, keep=3, method=method, newline="keep",
                                          sample_ids=[0]) as m:
            m(**alone)
            online = m.last_selection_metadata["kept_indices"][0].tolist()
        assert sel.filter(pl.col("method") == method)["kept"].to_list() == [online]
        assert {8, 17, 26, 35} <= set(online)  # the four row breaks, span indices
