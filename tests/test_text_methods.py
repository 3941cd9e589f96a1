"""The instruction-conditioned methods (issue 23): CDPruner and SparseVLM against their authors' code.

The expected values below are facts: the authors' selection code, taken from their
repositories at the named commits and run unchanged on these tensors (torch 2.13 CPU,
float32; /tmp harness, einops stubbed by its two rearrange patterns), returned them. The
inputs are continuous random draws, so no ranking step meets a tie.
"""

import pytest
import torch

from conftest import replay_run

from fastv_analysis import probes, strategies
from fastv_analysis.methods.cdpruner import cdpruner_order, cdpruner_relevance
from fastv_analysis.methods.sparsevlm import dpc_knn, recycle_split, sparsevlm_plan
from fastv_analysis.strategies import merge_tokens


def cdpruner_fixture():
    """features [1, 20, 12] (post-projector), CLIP-side image_embeds [1, 20, 8], text_embeds [5, 8]."""
    g = torch.Generator().manual_seed(31)
    return torch.randn(1, 20, 12, generator=g), torch.randn(1, 20, 8, generator=g), torch.randn(5, 8, generator=g)


def sparsevlm_fixture():
    """A prompt of 3 + 120 + 8 tokens: layer-0 embeddings [1, 131, 64], layer K-1 attention
    probabilities [1, 2, 131, 131], layer K-1 output [1, 131, 64]."""
    g = torch.Generator().manual_seed(47)
    start, n, text, dim = 3, 120, 8, 64
    seq = start + n + text
    embeds = torch.randn(1, seq, dim, generator=g)
    attn = torch.randn(1, 2, seq, seq, generator=g).softmax(dim=-1)
    out = torch.randn(1, seq, dim, generator=g)
    return start, n, embeds, attn, out


# Theia-4869/CDPruner@9541616c40fcd5625de1cdb8ea6c33c129eb7864, llava/model/llava_arch.py,
# LlavaMetaForCausalLM.encode_images(images, texts) with the vision tower returning the fixture's
# (features, image_embeds, text_embeds), mm_projector = identity, visual_token_num = 8 -> kept (sorted):
CDPRUNER_KEPT = [1, 3, 4, 9, 10, 11, 17, 19]
# Gumpest/SparseVLMs@26a5f48813c46cd1c7364160354e7fdd3febaa67 (v1.0), modelling_sparse_llama.py
# LlamaDynamicvitModel.forward's rater lines, score.py attn_postprocess_topk (sparse_token_list [30, ...],
# layer 2) and the recycling lines with utils.py cluster_and_merge (torch.manual_seed(0) for its noise):
SPARSEVLM_RATERS = [0, 1, 5, 6, 7]  # t_token_idx, relative to the first text token
SPARSEVLM_KEPT = [4, 5, 10, 11, 16, 21, 25, 27, 29, 30, 32, 33, 37, 39, 41, 46, 56, 57, 79, 80, 82, 84, 89, 92, 94,
                  95, 100, 104, 106, 114]  # where(pred_score_vis), image-token indices
# each merged token's members (image-token indices): the merged vectors = W @ recycled tokens (m = 28 < D = 64),
# W = merged @ pinv(recycled) has 1/size on the members (within 4e-8) and |W| < 1e-8 elsewhere
SPARSEVLM_GROUPS = [[7, 20, 51, 53, 70, 77, 78, 85, 103, 109, 119], [24, 38, 59, 69, 72, 81, 90, 102, 116, 118],
                    [54, 60, 76, 88, 101, 112, 115]]


def test_cdpruner_keeps_what_the_authors_function_keeps():
    features, image_embeds, text_embeds = cdpruner_fixture()
    unit_text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = cdpruner_relevance(image_embeds, unit_text.mean(dim=0)[None])
    assert sorted(cdpruner_order(features, relevance, 8)[0].tolist()) == CDPRUNER_KEPT
    # through the registry, with the stored inputs' names (the relevance side in the LLM's space)
    sel = strategies.select(torch.rand(1, 2, 20), "cdpruner", keep=8,
                            inputs={"embeddings": features, "instruction": torch.randn(1, 12)})
    assert sel.indices.shape == (1, 8) and strategies.strategy("cdpruner").where == "input"


def test_cdpruner_is_prefix_closed_and_survives_rank_exhaustion():
    features, image_embeds, text_embeds = cdpruner_fixture()
    relevance = cdpruner_relevance(image_embeds, text_embeds.mean(dim=0)[None])
    full = cdpruner_order(features, relevance)[0].tolist()
    assert full[:8] == cdpruner_order(features, relevance, 8)[0].tolist()
    assert sorted(full) == list(range(20))  # 20 tokens of width 12: rank 12, then by relevance
    rest = [t for t in range(20) if t not in full[:12]]
    assert full[12:] == sorted(rest, key=lambda t: -float(relevance[0, t]))
    inputs = {"embeddings": features, "instruction": torch.randn(1, 12)}
    ranking = strategies.rank(strategies.method_scores(torch.rand(1, 2, 20), "cdpruner", inputs=inputs))
    keeps = strategies.select_keeps(torch.rand(1, 2, 20), "cdpruner", [3, 15], inputs=inputs)
    assert keeps[3].indices[0].tolist() == sorted(ranking[0, :3].tolist())
    assert keeps[15].indices[0].tolist() == sorted(ranking[0, :15].tolist())


def test_sparsevlm_raters_rating_and_recycling_equal_the_authors():
    start, n, embeds, attn, out = sparsevlm_fixture()
    seq = embeds.shape[1]
    image_pos = torch.arange(start, start + n)[None]
    text = torch.arange(seq)[None] >= start + n
    raters = probes.sparsevlm_raters(embeds, image_pos, torch.tensor([n]), text)
    assert (torch.where(raters[0])[0] - start - n).tolist() == SPARSEVLM_RATERS
    rows = attn[:, :, raters[0]].mean(dim=2)[..., start:start + n]  # [1, H, N]: what capture stores
    k, c = recycle_split(n, 33)
    assert (k, c) == (30, 3)  # the authors' 30 kept + int(int(90 * 0.3 + 1) / 10) + 1 merged
    sel = strategies.select(torch.rand(1, 2, n), "sparsevlm", keep=33,
                            inputs={"attention_raters": rows, "hidden_out": out[:, start:start + n]})
    plan = sel.merge
    kept = [t for t in range(n) if plan.weight[0, t] == 1.0]
    assert kept == SPARSEVLM_KEPT
    groups = sorted(sorted(torch.where(plan.assign[0] == s)[0].tolist()) for s in range(33)
                    if (plan.assign[0] == s).sum() > 1)
    assert groups == SPARSEVLM_GROUPS
    assert sorted(set(sel.indices[0].tolist()) - set(kept)) == sorted(  # anchors: each cluster's centre
        int(sel.indices[0, s]) for s in range(33) if (plan.assign[0] == s).sum() > 1)
    merged = merge_tokens(out[:, start:start + n], sel.indices, plan)[0]
    for group in SPARSEVLM_GROUPS:  # the authors' merged token: sum / (size + 1e-6)
        slot = int(plan.assign[0, group[0]])
        assert torch.allclose(merged[slot], out[0, start + torch.tensor(group)].sum(0) / (len(group) + 1e-6))


def test_sparsevlm_budget_split_and_drop_without_recycling():
    for n in (20, 120, 576, 2880):
        assert all(sum(recycle_split(n, keep)) == keep for keep in range(n + 1))
    assert recycle_split(576, 64) == (48, 16) and recycle_split(576, 576) == (576, 0)
    assert recycle_split(2880, 64) == (64, 0)  # below the smallest cluster count (87): a pure drop
    rating = torch.rand(2, 40)
    idx, merge = sparsevlm_plan(rating, torch.randn(2, 40, 8), 10, recycle=False)
    assert merge is None and idx.tolist() == rating.topk(10).indices.sort().values.tolist()
    with pytest.raises(ValueError, match="recycle"):
        strategies.select(torch.rand(1, 2, 40), "sparsevlm", keep=10, recycle=0.3,
                          inputs={"attention_raters": torch.rand(1, 2, 40), "hidden_out": torch.randn(1, 40, 8)})
    with pytest.raises(ValueError, match="sparsevlm needs input 'hidden_out'"):
        strategies.select(torch.rand(1, 2, 40), "sparsevlm", keep=10, inputs={"attention_raters": torch.rand(1, 2, 40)})


def test_dpc_knn_breaks_density_ties_by_index():
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]]])  # two mirrored pairs: equal densities
    centres, cluster = dpc_knn(x, 2)
    assert sorted(centres[0].tolist()) in ([0, 2], [0, 3], [1, 2], [1, 3])
    assert cluster[0, 0] == cluster[0, 1] != cluster[0, 2] == cluster[0, 3]
    assert torch.equal(dpc_knn(x, 2)[0], centres)  # deterministic: no noise


# ----------------------------------------------------------------------------- replay offline == online

REPLAY_ARCHS = ["LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"]


@pytest.fixture(scope="module", params=REPLAY_ARCHS)
def replayed(request, tmp_path_factory):
    import polars as pl

    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model, run = replay_run(root, arch, "2", "embeddings,instruction,attention_raters,hidden_out",
                            ["--methods", "cdpruner,sparsevlm", "--keep", "3,2", "--keep-ratio", "0.75,0.5"])
    return arch, model, root, run, pl.read_parquet(run / "select" / "selections.parquet")


def test_replayed_cdpruner_and_sparsevlm_equal_online_pruning(replayed):
    import json

    import polars as pl
    from PIL import Image

    from fastv_analysis.loading import build_prompt, load_model
    from fastv_analysis.pruning import apply_fastv
    from fastv_analysis.store import open_run

    arch, model_dir, root, run, sel = replayed
    stored = open_run(run)
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    questions = [json.loads(line) for line in (root / "d" / "q.jsonl").read_text().splitlines()]
    checked = merges = 0
    for sid, q in enumerate(questions):
        image = Image.open(root / "d" / q["image"]).convert("RGB")
        inputs = dict(loaded.processor(text=[build_prompt(loaded.processor, q["text"])], images=[image],
                                       return_tensors="pt"))
        offline_inputs = stored.inputs(2, [sid], ["attention_raters", "hidden_out"])
        for row in sel.filter(pl.col("sample_id") == sid).iter_rows(named=True):
            method = row["config"].split(" ratio ")[0]
            with torch.no_grad(), apply_fastv(loaded.model, agg_layer=2, keep=row["keep"], method=method,
                                              sample_ids=[sid]) as m:
                m(**inputs)
                online = m.prompt.selection
            assert online.indices[0].tolist() == row["kept"], (arch, sid, row["config"], row["keep"])
            if method == "sparsevlm":
                offline = strategies.select(torch.zeros_like(offline_inputs["attention_raters"]), "sparsevlm",
                                            row["keep"], inputs=offline_inputs)
                assert offline.indices[0].tolist() == row["kept"]
                assert (offline.merge is None) == (online.merge is None)
                if online.merge is not None:
                    assert torch.equal(offline.merge.assign, online.merge.assign)
                    assert torch.allclose(offline.merge.weight, online.merge.weight, rtol=0, atol=0)
                    merges += 1
            checked += 1
    assert checked == sel.height and checked >= 3 * 2 * 4 and merges >= 3


def test_sparsevlm_preset_expands_to_the_authors_later_stages():
    # Gumpest/SparseVLMs@26a5f48 score.py: layer_dict {2, 6, 15}, sparse_token_list_192 = [300, 200, 110]
    from fastv_analysis.evaluate.plan import stage_spec
    from fastv_analysis.pruning.config import preset_stages

    stages = preset_stages("sparsevlm")
    assert [(k, m) for k, _, m in stages] == [(7, "avg_all_heads"), (16, "avg_all_heads")]
    assert stage_spec(stages[0], 300)[1] == 200 and stage_spec(stages[1], 200)[1] == 110
    assert preset_stages("pdrop") == [(16, 0.5, "avg_all_heads"), (24, 0.5, "avg_all_heads")]


def test_sparsevlm_plan_anchors_every_slot_at_every_keep():
    g = torch.Generator().manual_seed(5)
    for n in (1, 4, 13, 37):
        for keep in range(n + 1):
            rating, hidden = torch.rand(3, n, generator=g), torch.randn(3, n, 5, generator=g)
            idx, plan = sparsevlm_plan(rating, hidden, keep)
            assert idx.shape == (3, keep) and bool((idx.diff(dim=-1) > 0).all())
            if plan is None:
                continue
            assert torch.equal(plan.assign.gather(1, idx), torch.arange(keep).expand(3, -1))  # anchor in its slot
            assert bool(((plan.assign >= 0) == (plan.weight > 0)).all())
            assert merge_tokens(hidden, idx, plan).shape == (3, keep, 5)
