"""Every strategy replayed offline from the capture == the same strategy applied online.

capture --store records the named inputs at layer K-1 (no-RoPE rows, mean-query rows,
hidden-state norms, the feature sketch); select replays every strategy on them; the same
strategy inside apply_fastv computes them from the live forward. The kept sets must match
token for token, so an offline analysis says what online pruning would have kept.
"""

import json

import polars as pl
import pytest
import torch
from PIL import Image

from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.pruning import apply_fastv
from fastv_analysis.strategies import ALL_METHODS, QUERIES
from conftest import replay_run

ARCHS = ["LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"]


@pytest.fixture(scope="module", params=ARCHS)
def replayed(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model, run = replay_run(
        root, arch, "2", "attention_no_rope,attention_text_mean,attention_all_mean,hidden_norm,sketch,embeddings,"
        "dart_image,dart_text,instruction,attention_raters,hidden_out,vision_attention,vision_keys,vision_features,layers",
        ["--methods", ",".join(ALL_METHODS), "--queries", ",".join(QUERIES), "--alphas", "0.3", "--keep", "3,1",
         "--keep-ratio", "0.75"])
    return arch, model, root, pl.read_parquet(run / "select" / "selections.parquet")


def test_select_writes_every_strategy_and_query_variant(replayed):
    _, _, _, sel = replayed
    configs = set(sel["config"].unique())
    assert {"dynamic_alpha", "no_rope", "sink_excluded", "diverse", "hybrid_uniform", "divprune", "dart",
            "avg_all_heads@text_mean",
            "avg_all_heads@all_mean", "max_head@text_mean", "diverse@all_mean"} <= configs
    assert "random@text_mean" not in configs and "no_rope@text_mean" not in configs


def test_every_replayed_selection_equals_online_pruning(replayed):
    arch, model_dir, root, sel = replayed
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    proc = loaded.processor
    questions = [json.loads(line) for line in (root / "d" / "q.jsonl").read_text().splitlines()]
    checked = 0
    for sid, q in enumerate(questions):
        image = Image.open(root / "d" / q["image"]).convert("RGB")
        inputs = dict(proc(text=[build_prompt(proc, q["text"])], images=[image], return_tensors="pt"))
        rows = sel.filter(pl.col("sample_id") == sid)
        for row in rows.iter_rows(named=True):
            method, _, query = row["config"].split(" ratio ")[0].partition("@")
            method = method.split("(")[0]
            params = {"query": query} if query else {}
            alpha = row["alpha"] if row["alpha"] is not None else 0.5
            with torch.no_grad(), apply_fastv(loaded.model, agg_layer=2, keep=row["keep"], method=method,
                                              alpha=alpha, params=params, sample_ids=[sid]) as m:
                m(**inputs)
                online = m.last_selection_metadata["kept_indices"][0].tolist()
            assert online == row["kept"], (arch, sid, row["config"], row["keep"])
            checked += 1
    assert checked == sel.height and checked >= 3 * 3 * 17  # keeps 3, 1 and 75 % of each sample's N
