"""The strategies read before the LLM (``where`` input / vision) at K = 0: offline == online.

DivPrune, CDPruner, pooling read the LLM-input embeddings (and CDPruner the instruction's);
VisionZip and VisPruner the vision tower, which has run before the decoder. At K = 0 (the
authors' setting) apply_fastv ranks them from the live forward (the decoder's input and the
VisionTap); select replays them from a capture's stored inputs; eval answers the replayed
sets. The kept set and the merge plan must match token for token, and since none of them reads
layer K, the set chosen at K = 0 is the set chosen at K = 2.
"""

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from conftest import replay_run
from fastv_analysis.adapters import registry
from fastv_analysis.cli.main import main
from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.pruning import apply_fastv
from fastv_analysis.select import row_merge

ARCHS = ["LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"]
METHODS = "divprune,cdpruner,visionzip,vispruner,pooling"
STORE = "embeddings,instruction,vision_attention,vision_keys,vision_features"


@pytest.fixture(scope="module", params=ARCHS)
def replayed(request, tmp_path_factory):
    """A capture at K = 0 and 2 storing every pre-LLM input, selected with the five methods."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model, run = replay_run(root, arch, "0,2", STORE, ["--methods", METHODS, "--keep", "4", "--keep-ratio", "0.5"])
    loaded = load_model(str(model), device="cpu", dtype="float32")
    questions = [json.loads(line) for line in (root / "d" / "q.jsonl").read_text().splitlines()]
    inputs = [dict(loaded.processor(text=[build_prompt(loaded.processor, q["text"])],
                                    images=[Image.open(root / "d" / q["image"]).convert("RGB")], return_tensors="pt"))
              for q in questions]
    return arch, loaded, run, inputs, pl.read_parquet(run / "select" / "selections.parquet")


def test_k0_replay_equals_online_kept_set_and_merge(replayed):
    arch, loaded, _, inputs, sel = replayed
    at_k0 = sel.filter(pl.col("agg_layer") == 0)
    assert set(at_k0["method"].unique()) == set(METHODS.split(","))
    merged = 0
    for row in at_k0.iter_rows(named=True):
        keep = len(row["kept"])
        with torch.no_grad(), apply_fastv(loaded.model, agg_layer=0, keep=keep, method=row["method"],
                                          sample_ids=[row["sample_id"]]) as m:
            m(**inputs[row["sample_id"]])
            online = m.prompt.selection
        assert online.indices[0].tolist() == row["kept"], (arch, row["config"], row["sample_id"])
        stored = row_merge(row)
        assert (stored is None) == (online.merge is None), (arch, row["config"])
        if stored is not None:
            assert torch.equal(stored.assign, online.merge.assign[0].cpu()), (arch, row["config"])
            torch.testing.assert_close(stored.weight, online.merge.weight[0].float().cpu())
            merged += 1
    assert at_k0.height == 5 * 3 * 2 and merged == 2 * 3 * 2  # pooling and visionzip merge


def test_prellm_kept_set_does_not_depend_on_k(replayed):
    """The criterion is read before the LLM: the set (and merge) replayed at K = 0 is the one at K = 2."""
    arch, _, _, _, sel = replayed
    cols = ["sample_id", "config", "kept", "merge_assign"]
    k0 = sel.filter(pl.col("agg_layer") == 0).select(cols).sort("sample_id", "config")
    k2 = sel.filter(pl.col("agg_layer") == 2).select(cols).sort("sample_id", "config")
    assert k0.height == k2.height > 0 and k0.to_dicts() == k2.to_dicts(), arch


def test_k0_online_set_equals_k2_online_set(replayed):
    arch, loaded, _, inputs, _ = replayed
    for method in METHODS.split(","):
        kept = []
        for agg_layer in (0, 2):
            with torch.no_grad(), apply_fastv(loaded.model, agg_layer=agg_layer, keep=4, method=method) as m:
                m(**inputs[1])
                kept.append(m.prompt.selection.indices[0].tolist())
        assert kept[0] == kept[1], (arch, method)


def test_eval_at_k0_answers_as_apply_fastv_generates(replayed):
    arch, loaded, run, inputs, _ = replayed
    assert main(["eval", str(run), "--keep", "4", "--methods", "cdpruner,visionzip,vispruner",
                 "--timing-samples", "0", "--quiet"]) == 0
    pred = pl.read_parquet(run / "eval" / "predictions.parquet").filter(
        (pl.col("agg_layer") == 0) & (pl.col("method") != "full"))
    assert set(pred["method"]) == {"cdpruner", "visionzip", "vispruner"} and pred.height == 3 * 3
    for row in pred.iter_rows(named=True):
        x = inputs[row["sample_id"]]
        with torch.no_grad(), apply_fastv(loaded.model, agg_layer=0, keep=4, method=row["method"],
                                          positions=row["positions"]) as m:
            out = m.generate(**x, max_new_tokens=1, do_sample=False)[:, x["input_ids"].shape[1]:]
        answer = loaded.processor.batch_decode(out, skip_special_tokens=True)[0].strip()
        assert answer == row["prediction"], (arch, row["config"], row["sample_id"])


@pytest.mark.parametrize("agg_layer", [0, 2])
def test_generate_ranks_each_prompt_by_its_own_vision_tower(replayed, agg_layer):
    """generate encodes the image before its first forward call: the vision inputs are recorded
    then, and a prompt never ranks by a previous prompt's tower."""
    arch, loaded, _, inputs, _ = replayed
    for method in ("visionzip", "vispruner"):
        with torch.no_grad(), apply_fastv(loaded.model, agg_layer=agg_layer, keep=4, method=method) as m:
            alone = []
            for x in inputs[:2]:
                m(**x)
                alone.append(m.prompt.selection.indices[0].tolist())
            assert alone[0] != alone[1]
            for i in (1, 0, 0, 1):
                m.generate(**inputs[i], max_new_tokens=2, do_sample=False)
                assert m.prompt.selection.indices[0].tolist() == alone[i], (arch, method, i)


# -- generate on tiling families: the image sizes reach the hooks -----------------------------------


@pytest.fixture(scope="module", params=["LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"])
def tiled(request, tmp_path_factory):
    arch = request.param
    loaded = load_model(str(registry()[arch].tiny(tmp_path_factory.mktemp(arch) / "m", seed=3)), device="cpu",
                        dtype="float32")
    rng = np.random.default_rng(4)
    image = Image.fromarray((rng.random((112, 168, 3)) * 255).astype("uint8"))
    proc = loaded.processor
    return arch, loaded.model, dict(proc(text=[build_prompt(proc, "what is in the picture?")], images=[image],
                                         return_tensors="pt"))


@pytest.mark.parametrize("agg_layer", [0, 2])
def test_generate_lays_out_the_tiles_of_a_merge_strategy(tiled, agg_layer):
    """generate encodes the image first and drops image_sizes from its forward calls; pooling
    (which needs the tiles' layout) generates, keeping and answering as the plain forward does,
    and the model is left as it was."""
    arch, model, inputs = tiled
    methods = ["pooling"] + (["visionzip"] if arch == "LlavaNextForConditionalGeneration" else [])
    for method in methods:
        with torch.no_grad(), apply_fastv(model, agg_layer=agg_layer, keep=4, method=method) as m:
            first = int(m(**inputs).logits[0, -1].argmax())
            kept = m.prompt.selection.indices[0].tolist()
            out = m.generate(**inputs, max_new_tokens=1, do_sample=False)[0, inputs["input_ids"].shape[1]:]
            assert m.prompt.selection.indices[0].tolist() == kept and out.tolist() == [first], (arch, method)
        assert "get_image_features" not in vars(model.model)
