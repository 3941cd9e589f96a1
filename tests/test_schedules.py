"""Per-layer schedules: prune in stages, each stage ranking what the previous one kept by the
attention of the pruned model one layer before its cut."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastv_analysis.attention import AttentionRecorder
from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.pruning import FastVConfig, Stage, apply_fastv
from fastv_analysis.toy.checkpoint import save_tiny_random_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_tiny_random_checkpoint(tmp_path_factory.mktemp("sched") / "m", seed=1,
                                       text={"num_hidden_layers": 6, "num_attention_heads": 4,
                                             "num_key_value_heads": 2})
    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def inputs(loaded):
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")) for _ in range(2)]
    proc = loaded.processor
    prompts = [build_prompt(proc, "what color?"), build_prompt(proc, "is there a red square or not?")]
    return dict(proc(text=prompts, images=images, return_tensors="pt", padding=True))


SCHEDULE = [Stage(4, 16, "max_head"), {"agg_layer": 5, "keep": 4, "method": "random"}]


def test_schedule_drop_equals_mask_and_each_stage_keeps_a_subset(loaded, inputs):
    outs, kept, tokens = {}, {}, {}
    with torch.no_grad():
        for mode in ("drop", "mask"):
            with apply_fastv(loaded.model, agg_layer=2, keep=64, mode=mode, stages=SCHEDULE) as m:
                outs[mode] = m(**inputs).logits[:, -1]
                kept[mode] = m.last_stage_kept
                tokens[mode] = m.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (outs["drop"] - outs["mask"]).abs().max() <= 1e-4
    assert torch.equal(tokens["drop"], tokens["mask"])
    assert [k.shape[1] for k in kept["drop"]] == [64, 16, 4]
    for a, b in zip(kept["drop"], kept["mask"]):
        assert torch.equal(a, b)
    for earlier, later in zip(kept["drop"], kept["drop"][1:]):
        for row_e, row_l in zip(earlier.tolist(), later.tolist()):
            assert set(row_l) <= set(row_e)


def test_a_stage_ranks_by_the_pruned_models_attention(loaded, inputs):
    """Independent route: run the one-cut model in mask mode with a recorder on layer 3 (the
    pruned model's attention, pruned keys at zero), rank the first cut's tokens by the head
    mean by hand; stage 2 at K = 4 must keep exactly that top 16."""
    model = loaded.model
    with torch.no_grad():
        with apply_fastv(model, agg_layer=2, keep=64, mode="mask") as m, \
                AttentionRecorder(model, [3], "last") as rec:
            m(**inputs)
            first = m.last_stage_kept[0]
            image_pos = (inputs["input_ids"] == model.config.image_token_id).nonzero()[:, 1].view(2, -1)
        with apply_fastv(model, agg_layer=2, keep=64, stages=[Stage(4, 16, "avg_all_heads")]) as m:
            m(**inputs)
            staged = m.last_stage_kept[1]
    rows = rec.rows[3][:, :, 0, :].mean(dim=1)  # [B, S] head mean of the last token's row
    for b in range(2):
        scores = rows[b, image_pos[b, first[b]]]
        order = torch.sort(scores, descending=True, stable=True).indices[:16]
        assert sorted(first[b, order].tolist()) == staged[b].tolist()


def test_a_stage_that_keeps_everything_changes_nothing(loaded, inputs):
    with torch.no_grad():
        with apply_fastv(loaded.model, agg_layer=2, keep=64) as m:
            one = m(**inputs).logits[:, -1]
        with apply_fastv(loaded.model, agg_layer=2, keep=64, stages=[Stage(4, 64)]) as m:
            two = m(**inputs).logits[:, -1]
    assert (one - two).abs().max() <= 1e-5


@pytest.mark.parametrize("stages, message", [
    ([Stage(2, 8)], "above the previous cut's 2"),
    ([Stage(4, 65)], "keep must be an integer in 0..64"),
    ([Stage(4, 8, "uniform")], "rank by attention alone"),
    ([Stage(4, 8, "sink_excluded")], "rank by attention alone"),
    ([Stage(4, 8), Stage(3, 4)], "above the previous cut's 4"),
])
def test_bad_schedules_are_refused_in_one_line(stages, message):
    with pytest.raises(ValueError, match=message):
        FastVConfig(agg_layer=2, keep=64, stages=stages)
    with pytest.raises(ValueError, match="first cut must be at agg_layer >= 1"):
        FastVConfig(agg_layer=0, keep=64, stages=[Stage(4, 8)])


def test_eval_answers_schedules_exactly_as_online_pruning(loaded, tmp_path):
    """eval --then: every configuration also as the first cut of a schedule; its answers are
    apply_fastv's with the same first cut and stages, and its FLOPs ratio is lower."""
    import json

    import polars as pl

    from fastv_analysis.cli.main import main

    model_dir = tmp_path / "m"
    save_tiny_random_checkpoint(model_dir, seed=1, text={"num_hidden_layers": 6, "num_attention_heads": 4,
                                                         "num_key_value_heads": 2})
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(5)
    lines = []
    for i in range(3):
        Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")).save(data / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": i, "image": f"images/{i}.png", "text": "what color?",
                                 "answer": "red"}))
    (data / "q.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["capture", "--model", str(model_dir), "--data", str(data / "q.jsonl"), "--out", str(run),
                 "--agg-layers", "2", "--max-new-tokens", "3", "--quiet"]) == 0
    assert main(["select", str(run), "--methods", "avg_all_heads,random", "--keep", "64,16", "--quiet"]) == 0
    assert main(["eval", str(run), "--then", "4:0.5:max_head", "--compare-mask", "3", "--timing-samples", "1",
                 "--quiet"]) == 0
    pred = pl.read_parquet(run / "eval" / "predictions.parquet")
    staged = pred.filter(pl.col("config") == "avg_all_heads then max_head K=4 keep 32")
    assert staged.height == 3 and "full then" not in " ".join(pred["config"].unique().to_list())
    from conftest import assert_one_pair_per_sample  # a schedule keeps its base method's name

    acc = pl.read_parquet(run / "eval" / "accuracy.parquet")
    assert assert_one_pair_per_sample(pred, acc) >= 7
    assert acc.filter(pl.col("config") == "avg_all_heads then max_head K=4 keep 32")["mcnemar_p_vs_avg"][0] is not None
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    proc = loaded.processor
    model = load_model(str(model_dir), device="cpu", dtype="float32")
    for row in staged.iter_rows(named=True):
        kept = sel.filter(pl.col("sample_id") == row["sample_id"], pl.col("config") == "avg_all_heads",
                          pl.col("keep") == 64)["kept"].to_list()[0]
        image = Image.open(data / "images" / f"{row['sample_id']}.png").convert("RGB")
        inputs = dict(proc(text=[build_prompt(proc, "what color?")], images=[image], return_tensors="pt"))
        with torch.no_grad(), apply_fastv(model.model, agg_layer=2, keep=64, kept=torch.tensor([kept]),
                                          stages=[Stage(4, 32, "max_head")]) as m:
            out = m.generate(**inputs, max_new_tokens=3, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id)
        online = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert online == row["prediction"]
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet").filter(pl.col("keep") == 64)
    ratio = dict(zip(acc["config"], acc["flops_ratio"]))
    assert ratio["avg_all_heads then max_head K=4 keep 32"] < ratio["avg_all_heads"]
    assert (acc["flops_ratio_3mlp"] > 0).all()
