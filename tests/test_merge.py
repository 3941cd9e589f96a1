"""Merge reductions (a Merge plan applied online), pooling, and pre-LLM strategies at K = 0.

Exactness: the pruned model's logits and greedy tokens equal an independent reference.
K = 0: the merged embeddings computed by hand (merge_tokens on the decoder's input
embeddings, read off an unpruned forward) fed to the UNMODIFIED model as inputs_embeds with
explicit position ids. K > 0: the unpruned model's hidden states entering layer K
(output_hidden_states), merged by hand and run through the model's own decoder layers, its
final norm and lm_head, with explicit RoPE positions (no hooks, no cache: every step
recomputed from the start).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import replay_run

from fastv_analysis.strategies import Merge, merge_tokens, select, strategy  # before methods/: it registers them
from fastv_analysis.adapters import get_adapter, registry
from fastv_analysis.layout import TokenLayout
from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.methods.pooling import pool_shape, pooling_plan
from fastv_analysis.pruning import FastVConfig, apply_fastv, drop_plan, greedy_decode, prefill_shared

ARCHS = ["LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"]
STEPS = 4
PROCESSORS = {}  # arch -> the family fixture's processor


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory):
    arch = request.param
    path = registry()[arch].tiny(tmp_path_factory.mktemp(arch) / "m", seed=3)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    image = Image.fromarray((np.random.default_rng(4).random((112, 168, 3)) * 255).astype("uint8"))
    proc = PROCESSORS[arch] = loaded.processor
    inputs = dict(proc(text=[build_prompt(proc, "what is in the picture?")], images=[image], return_tensors="pt"))
    return arch, loaded.model, inputs


# -- the unmodified model's view of one prompt --------------------------------------------------


def decoder_input(model, inputs):
    """The text decoder's inputs_embeds [1, S, D] and position ids ([1, S], or [3, 1, S] for M-RoPE)
    in an unpruned forward, read by a hook that changes nothing."""
    adapter = get_adapter(model)
    seen = {}

    def read(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], ids=kwargs.get("position_ids"))

    handle = adapter.language_model.register_forward_pre_hook(read, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    ids = seen["ids"]
    seq = seen["embeds"].shape[1]
    if ids is None:
        ids = torch.arange(seq)[None]
    if ids.dim() == 3 and ids.shape[0] == 4:  # text row first, then M-RoPE's three
        ids = ids[1:]
    return seen["embeds"], ids


def image_positions(model, inputs):
    return (inputs["input_ids"][0] == get_adapter(model).image_token_id).nonzero().flatten()


def reduced_inputs(embeds, ids, img_pos, indices, merge):
    """The reduced sequence by hand: text tokens and anchor tokens, the anchors' rows replaced by
    merge_tokens of the image span; the kept positions' original ids (gapped)."""
    seq = embeds.shape[1]
    anchors = img_pos[indices]
    keep_mask = torch.ones(seq, dtype=torch.bool)
    keep_mask[img_pos] = False
    keep_mask[anchors] = True
    kept = keep_mask.nonzero().flatten()
    out = embeds[:, kept].clone()
    slots = merge_tokens(embeds[:, img_pos], indices[None], merge)
    out[:, torch.searchsorted(kept, anchors)] = slots
    return out, ids[..., kept]


def next_ids(ids, step):
    """Original-policy position of generated token ``step``: one after the prompt's largest."""
    nxt = ids.max() + 1 + step
    return torch.full(ids.shape[:-1] + (1,), int(nxt))


def reference_k0(model, embeds, ids, steps=STEPS):
    """Greedy tokens and first logits of the unmodified model on ``embeds`` with explicit ``ids``."""
    out = model(inputs_embeds=embeds, position_ids=ids, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
                use_cache=True)
    first = out.logits[0, -1]
    cache, tokens = out.past_key_values, [int(first.argmax())]
    length = embeds.shape[1]
    for step in range(1, steps):
        emb = model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))
        out = model(inputs_embeds=emb, position_ids=next_ids(ids, step - 1),
                    attention_mask=torch.ones(1, length + step, dtype=torch.long), past_key_values=cache,
                    use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
        cache = out.past_key_values
    return first, tokens


def pruned(model, inputs, steps=STEPS, **config):
    """First logits and greedy tokens through apply_fastv."""
    with apply_fastv(model, FastVConfig(**config)) as m:
        first = m(**inputs).logits[0, -1]
        tokens = m.generate(**inputs, max_new_tokens=steps, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        meta = m.prompt.selection
    return first, tokens.tolist(), meta


def same_greedy(model, tokens, ref):
    """generate's tokens equal the reference's, generate stopping only at an EOS."""
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    return tokens == ref[:len(tokens)] and (len(tokens) == len(ref) or tokens[-1] in eos)


def pooling_merge(model, inputs, keep):
    adapter = get_adapter(model)
    n = int(image_positions(model, inputs).numel())
    layout = adapter.token_layouts(inputs, [n])[0]
    indices, assign, weight = pooling_plan(layout, keep)
    return torch.from_numpy(indices), Merge(torch.from_numpy(assign)[None], torch.from_numpy(weight).float()[None])


# -- exactness ----------------------------------------------------------------------------------


def test_pooling_at_k0_equals_inputs_embeds_reference(family):
    arch, model, inputs = family
    indices, merge = pooling_merge(model, inputs, 4)
    embeds, ids = decoder_input(model, inputs)
    ref_embeds, ref_ids = reduced_inputs(embeds, ids, image_positions(model, inputs), indices, merge)
    ref_first, ref_tokens = reference_k0(model, ref_embeds, ref_ids)
    first, tokens, sel = pruned(model, inputs, agg_layer=0, keep=4, method="pooling")
    assert torch.equal(sel.indices[0], indices) and torch.equal(sel.merge.assign, merge.assign)
    assert (first - ref_first).abs().max() < 1e-5, arch
    assert same_greedy(model, tokens, ref_tokens), arch


def test_a_given_merge_plan_at_k0_equals_the_reference_and_differs_from_a_drop(family):
    """Any Merge (not only pooling's): random groups, unequal weights, some tokens dropped."""
    arch, model, inputs = family
    img_pos = image_positions(model, inputs)
    n = img_pos.numel()
    gen = torch.Generator().manual_seed(0)
    indices = torch.tensor([0, n // 3, n - 2])
    assign = torch.randint(-1, 3, (1, n), generator=gen)
    assign[0, indices] = torch.arange(3)
    weight = torch.rand(1, n, generator=gen) * (assign >= 0)
    merge = Merge(assign, weight)
    embeds, ids = decoder_input(model, inputs)
    ref_first, ref_tokens = reference_k0(model, *reduced_inputs(embeds, ids, img_pos, indices, merge))
    first, tokens, _ = pruned(model, inputs, agg_layer=0, keep=3, kept=indices, merge=merge)
    assert (first - ref_first).abs().max() < 1e-5 and same_greedy(model, tokens, ref_tokens), arch
    drop_first, _, _ = pruned(model, inputs, agg_layer=0, keep=3, kept=indices)
    assert (drop_first - first).abs().max() > 1e-4


def test_mask_mode_refuses_a_merge():
    with pytest.raises(ValueError, match="mode='mask' cannot represent a merge"):
        FastVConfig(method="pooling", keep=4, mode="mask")
    with pytest.raises(ValueError, match="merge plan"):
        FastVConfig(keep=1, merge=Merge(torch.zeros(4, dtype=torch.long), torch.ones(4)))


def causal(length):
    return torch.zeros(1, 1, length, length).masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1),
                                                        torch.finfo(torch.float32).min)


def reference_layers(model, embeds, ids, agg_layer, reduce, prompt_len):
    """Last-token logits of the model's own decoder layers run by hand on ``embeds`` [1, L, D]
    (prompt + generated tokens) at ``ids``; entering layer ``agg_layer`` the prompt part is
    replaced by ``reduce(hidden)`` -> (reduced hidden, its ids)."""
    lm = get_adapter(model).language_model
    h = embeds
    for i, layer in enumerate(lm.layers):
        if i == agg_layer:
            part, part_ids = reduce(h[:, :prompt_len])
            h = torch.cat([part, h[:, prompt_len:]], dim=1)
            ids = torch.cat([part_ids, ids[..., prompt_len:]], dim=-1)
        h = layer(h, attention_mask=causal(h.shape[1]), position_embeddings=lm.rotary_emb(h, ids), position_ids=None)
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(lm.norm(h))[0, -1]


def reference_layers_greedy(model, inputs, agg_layer, reduce, steps=STEPS):
    """First logits and greedy tokens of :func:`reference_layers`, every step recomputed."""
    embeds, ids = decoder_input(model, inputs)
    prompt_len = embeds.shape[1]
    tokens, first = [], None
    for step in range(steps):
        emb = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))], dim=1)
        all_ids = torch.cat([ids] + [next_ids(ids, g) for g in range(step)], dim=-1)
        logits = reference_layers(model, emb, all_ids, agg_layer, reduce, prompt_len)
        first = logits if first is None else first
        tokens.append(int(logits.argmax()))
    return first, tokens


def test_pooling_at_layer_k_equals_the_decoder_layers_run_by_hand(family):
    """K = 2: the hidden states entering layer 2 pooled by hand, run through layers 2.. with the
    anchors' original positions."""
    arch, model, inputs = family
    indices, merge = pooling_merge(model, inputs, 4)
    _, ids = decoder_input(model, inputs)
    img_pos = image_positions(model, inputs)
    first_ref, tokens_ref = reference_layers_greedy(
        model, inputs, 2, lambda h: reduced_inputs(h, ids, img_pos, indices, merge))
    first, tokens, sel = pruned(model, inputs, agg_layer=2, keep=4, method="pooling")
    assert torch.equal(sel.indices[0], indices)
    assert (first - first_ref).abs().max() < 1e-5 and same_greedy(model, tokens, tokens_ref), arch


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("agg_layer", [0, 2])
def test_shared_prefill_of_merges_and_drops_equals_each_set_online(family, agg_layer, positions):
    """eval's shared prefix: a pooling merge and a drop (its identity plan) decoded as two rows of
    one prefill answer as each set does alone through apply_fastv."""
    arch, model, inputs = family
    indices, merge = pooling_merge(model, inputs, 4)
    n = image_positions(model, inputs).numel()
    other = torch.tensor([1, 2, n - 3, n - 1])
    plans = Merge(torch.cat([merge.assign, drop_plan(other[None], n).assign]),
                  torch.cat([merge.weight, drop_plan(other[None], n).weight]))
    eos = model.generation_config.eos_token_id
    with prefill_shared(model, inputs, torch.stack([indices, other]), agg_layer, merge=plans,
                        positions=positions) as shared:
        logits = shared.logits.clone()
        tokens = greedy_decode(shared, STEPS, eos)
    for row, config in enumerate([dict(method="pooling"), dict(kept=other)]):
        first, alone, _ = pruned(model, inputs, agg_layer=agg_layer, keep=4, positions=positions, **config)
        assert (logits[row] - first).abs().max() < 1e-5, (arch, row)
        assert tokens[row, :len(alone)].tolist() == alone, (arch, row)


# -- the compact positions policy ------------------------------------------------------------------


def compact_by_hand(ids, kept_is_image):
    """Compact ids of one prompt's kept tokens (one image): 1-D ids numbered 0..M-1; M-RoPE ids
    keep text before and the image tokens' own (t, h, w), text after the image runs on from the
    largest kept position + 1."""
    if ids.dim() == 2:
        return torch.arange(ids.shape[-1])[None]
    after = int(kept_is_image.nonzero().max()) + 1
    out = ids.clone()
    out[..., after:] = torch.arange(ids.shape[-1] - after) + int(ids[..., :after].max()) + 1
    return out


def reduce_compact(h, ids, img_pos, indices, merge):
    reduced, kept_ids = reduced_inputs(h, ids, img_pos, indices, merge)
    seq = h.shape[1]
    keep_mask = torch.ones(seq, dtype=torch.bool)
    keep_mask[img_pos] = False
    keep_mask[img_pos[indices]] = True
    is_image = torch.zeros(seq, dtype=torch.bool)
    is_image[img_pos] = True
    return reduced, compact_by_hand(kept_ids, is_image[keep_mask])


@pytest.mark.parametrize("merged", [True, False], ids=["merge", "drop"])
def test_compact_positions_at_k0_equal_inputs_embeds_reference(family, merged):
    """Compact, K = 0: a merge (pooling) and a drop (the same anchors) equal the unmodified model
    on the reduced embeddings with consecutive (1-D) / re-started (M-RoPE) position ids."""
    arch, model, inputs = family
    indices, merge = pooling_merge(model, inputs, 4)
    merge = merge if merged else None
    embeds, ids = decoder_input(model, inputs)
    ref_first, ref_tokens = reference_k0(model, *reduce_compact(embeds, ids, image_positions(model, inputs),
                                                                indices, merge))
    config = dict(method="pooling") if merged else dict(kept=indices)
    first, tokens, _ = pruned(model, inputs, agg_layer=0, keep=4, positions="compact", **config)
    assert (first - ref_first).abs().max() < 1e-5 and same_greedy(model, tokens, ref_tokens), arch
    gapped, _, _ = pruned(model, inputs, steps=1, agg_layer=0, keep=4, positions="original", **config)
    assert (gapped - first).abs().max() > 1e-5  # the policy changes the answer


def test_compact_positions_at_layer_k_equal_the_decoder_layers_run_by_hand(family):
    arch, model, inputs = family
    indices, merge = pooling_merge(model, inputs, 4)
    _, ids = decoder_input(model, inputs)
    img_pos = image_positions(model, inputs)
    first_ref, tokens_ref = reference_layers_greedy(
        model, inputs, 2, lambda h: reduce_compact(h, ids, img_pos, indices, merge))
    first, tokens, _ = pruned(model, inputs, agg_layer=2, keep=4, method="pooling", positions="compact")
    assert (first - first_ref).abs().max() < 1e-5 and same_greedy(model, tokens, tokens_ref), arch


def test_compact_positions_need_drop_mode():
    with pytest.raises(ValueError, match="positions='compact'"):
        FastVConfig(keep=4, mode="mask", positions="compact")
    with pytest.raises(ValueError, match="positions must be one of"):
        FastVConfig(keep=4, positions="gapped")


def test_a_merge_refuses_a_batch_of_different_image_sizes(family):
    arch, model, _ = family
    if arch == "LlavaForConditionalGeneration":
        pytest.skip("every LLaVA-1.5 image gives 576 tokens")
    rng = np.random.default_rng(5)
    images = [[Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))] for w, h in [(56, 56), (112, 168)]]
    proc = PROCESSORS[arch]
    inputs = dict(proc(text=[build_prompt(proc, "what?")] * 2, images=images, return_tensors="pt", padding=True))
    with apply_fastv(model, agg_layer=0, keep=1, method="pooling") as m:
        with pytest.raises(ValueError, match="one image-token count per batch"):
            m(**inputs)


# -- pooling ------------------------------------------------------------------------------------


def test_pooling_equals_adaptive_avg_pool2d_of_unipruneBench():
    """UniPruneBench (TianfanPeng/VLMUniPruneBench@f93768f, methods/Pool_PreLLM.py ``_pool_tokens``,
    run in this session, its registry import stubbed, on an 8 x 8 grid of 64 tokens, D = 3, to
    4 x 4 = 16): its pooled tokens are ``F.adaptive_avg_pool2d`` of the grid; the slots of the
    pooling strategy are the same, slot j = output cell j in raster order. Their function
    pools to squares only; the non-square 4 x 6 -> 2 x 3 case is checked against
    ``F.adaptive_avg_pool2d`` itself, as they call it."""
    x = torch.arange(64 * 3, dtype=torch.float32).reshape(1, 64, 3).sin()
    sel = select(torch.zeros(1, 1, 64), "pooling", 16, layout=TokenLayout.grid(8, 8))
    slots = merge_tokens(x, sel.indices, sel.merge)
    theirs = F.adaptive_avg_pool2d(x.permute(0, 2, 1).reshape(1, 3, 8, 8), (4, 4)).reshape(1, 3, 16).permute(0, 2, 1)
    assert (slots - theirs).abs().max() < 1e-6
    # fixed values printed by their _pool_tokens(x[0], 4, "avg") in this session (first slot, last slot)
    assert torch.allclose(slots[0, 0], torch.tensor([0.0480, 0.0558, 0.0123]), atol=1e-4)
    assert torch.allclose(slots[0, -1], torch.tensor([-0.0248, 0.0323, 0.0597]), atol=1e-4)
    assert sel.indices[0].tolist() == [0, 2, 4, 6, 16, 18, 20, 22, 32, 34, 36, 38, 48, 50, 52, 54]
    y = torch.arange(24 * 2, dtype=torch.float32).reshape(1, 24, 2).cos()
    sel = select(torch.zeros(1, 1, 24), "pooling", 6, layout=TokenLayout.grid(4, 6))
    theirs = F.adaptive_avg_pool2d(y.permute(0, 2, 1).reshape(1, 2, 4, 6), (2, 3)).reshape(1, 2, 6).permute(0, 2, 1)
    assert (merge_tokens(y, sel.indices, sel.merge) - theirs).abs().max() < 1e-6


def test_pooling_output_grid_and_awkward_keeps():
    assert pool_shape(24, 24, 64) == (8, [8] * 8)
    assert pool_shape(4, 6, 6) == (2, [3, 3])  # aspect 2:3 like the image
    assert pool_shape(7, 4, 21) == (7, [3] * 7)  # a Qwen grid, non-square
    assert pool_shape(2, 2, 3) == (2, [2, 1])  # 3 cells on a 2 x 2 grid: a ragged lattice
    idx, assign, weight = pooling_plan(TokenLayout.grid(5, 5), 7)
    assert len(idx) == 7 and sorted(set(assign.tolist())) == list(range(7))
    assert np.allclose(np.bincount(assign, weights=weight), 1.0)  # every slot a mean
    anyres = TokenLayout.anyres(4, 2, 2)  # base tile (off the grid) + 2 rows of 2 and a newline each
    idx, assign, _ = pooling_plan(anyres, 2)
    assert (assign[:4] == -1).all() and (assign[anyres.newline] == -1).all() and idx.tolist() == [4, 5]  # 1 x 2: left and right column
    spec = strategy("pooling")
    assert spec.merges and spec.where == "input" and spec.positions == "compact"
    with pytest.raises(ValueError, match="pooling needs the image's grid"):
        select(torch.zeros(1, 1, 5), "pooling", 2)


# -- pre-LLM strategies at K = 0 ------------------------------------------------------------------


def test_divprune_at_k0_ranks_the_decoder_input(family):
    """DivPrune at K = 0 (its authors' setting) keeps its own picks of the input embeddings, not a
    random subset."""
    arch, model, inputs = family
    embeds, _ = decoder_input(model, inputs)
    img = embeds[:, image_positions(model, inputs)].float()
    want = select(torch.zeros(1, 1, img.shape[1]), "divprune", 3, inputs={"embeddings": img}).indices
    _, _, sel = pruned(model, inputs, steps=1, agg_layer=0, keep=3, method="divprune")
    assert torch.equal(sel.indices, want), arch


# -- replay offline == online: the kept set and the merge plan ----------------------------------


@pytest.fixture(scope="module", params=ARCHS)
def replayed(request, tmp_path_factory):
    """A capture at K = 0 and 2 with the embeddings stored, selected with pooling, divprune and random."""
    import polars as pl

    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model, run = replay_run(root, arch, "0,2", "embeddings",
                            ["--methods", "pooling,divprune,random", "--keep", "3,1", "--keep-ratio", "0.5"],
                            texts=("what is it?",) * 3)
    return arch, model, root, pl.read_parquet(run / "select" / "selections.parquet")


def test_select_stores_merge_plans_that_online_pruning_computes(replayed):
    import json

    from fastv_analysis.select import row_merge

    arch, model_dir, root, sel = replayed
    assert set(sel.filter(pl_col("agg_layer") == 0)["method"].unique()) == {"pooling", "divprune", "random"}
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    proc = loaded.processor
    questions = [json.loads(line) for line in (root / "d" / "q.jsonl").read_text().splitlines()]
    checked = 0
    for row in sel.iter_rows(named=True):
        q = questions[row["sample_id"]]
        image = Image.open(root / "d" / q["image"]).convert("RGB")
        inputs = dict(proc(text=[build_prompt(proc, q["text"])], images=[image], return_tensors="pt"))
        with apply_fastv(loaded.model, agg_layer=row["agg_layer"], keep=row["keep"], method=row["method"],
                         sample_ids=[row["sample_id"]]) as m:
            m(**inputs)
            online = m.prompt.selection
        assert online.indices[0].tolist() == row["kept"], (arch, row["config"], row["agg_layer"])
        stored = row_merge(row)
        assert (stored is None) == (online.merge is None) == (row["method"] != "pooling")
        if stored is not None:
            assert torch.equal(stored.assign, online.merge.assign[0])
            assert torch.equal(stored.weight, online.merge.weight[0].float())
        checked += 1
    assert checked == sel.height == 2 * 3 * 3 * 3  # 2 layers, 3 methods, 3 samples, keeps 3, 1 and 50 %


def pl_col(name):
    import polars as pl

    return pl.col(name)


@pytest.mark.parametrize("positions", [None, "original"])
def test_eval_answers_merges_under_each_strategys_positions_policy(replayed, positions):
    """eval replays the stored merge plans: pooling's answer equals apply_fastv's online answer
    under the policy used (its registered compact by default, or --positions), labelled so."""
    import json

    import polars as pl

    from fastv_analysis.cli.main import main

    arch, model_dir, root, _ = replayed
    run = root / "run"
    flags = [] if positions is None else ["--positions", positions]
    assert main(["eval", str(run), "--keep", "3", "--methods", "pooling,random", "--timing-samples", "0",
                 "--quiet", *flags]) == 0
    pred = pl.read_parquet(run / "eval" / "predictions.parquet")
    policy = positions or "compact"
    pooled = pred.filter(pl.col("method") == "pooling")
    suffix = " positions=compact" if policy == "compact" else ""
    assert set(pooled["config"]) == {"pooling" + suffix} and set(pooled["positions"]) == {policy}
    assert set(pred.filter(pl.col("method") == "random")["positions"]) == {"original"}
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    proc = loaded.processor
    questions = [json.loads(line) for line in (root / "d" / "q.jsonl").read_text().splitlines()]
    for row in pooled.iter_rows(named=True):
        q = questions[row["sample_id"]]
        image = Image.open(root / "d" / q["image"]).convert("RGB")
        inputs = dict(proc(text=[build_prompt(proc, q["text"])], images=[image], return_tensors="pt"))
        with apply_fastv(loaded.model, agg_layer=row["agg_layer"], keep=3, method="pooling", positions=policy) as m:
            out = m.generate(**inputs, max_new_tokens=1, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        assert proc.batch_decode(out, skip_special_tokens=True)[0].strip() == row["prediction"], (arch, row["config"])
