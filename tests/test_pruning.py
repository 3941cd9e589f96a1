"""FastV by hooks: drop == mask, off == unmodified, batch == per element, clean removal."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import hook_snapshot, make_llava_inputs, make_tiny_llava, unpadded

from fastv_analysis import strategies
from fastv_analysis.attention import AttentionRecorder
from fastv_analysis.flops import equivalent_image_tokens, flops_ratio, layer_flops, prefill_flops
from fastv_analysis.pruning import (
    FastVConfig,
    apply_fastv,
    decode_key_positions,
    greedy_decode,
    image_positions,
    kept_token_mask,
    mask_to_positions,
    prefill_shared,
    shared_greedy_answers,
)



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; a module-level set_grad_enabled would leak into other test files."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return make_tiny_llava(num_kv_heads=request.param)


@pytest.fixture(scope="module")
def batch(model):
    """Two prompts of different lengths, left-padded, with generate-style position ids."""
    inputs = make_llava_inputs(model, before=[3, 6], after=[5, 2], left_pad=[0, 1])
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return inputs


def last_logits(model, config, inputs):
    with apply_fastv(model, config) as fastv:
        return fastv(**inputs).logits[:, -1]


# ----------------------------------------------------------------------------------------
# drop == mask
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg_layer", [0, 1, 2, 3])
@pytest.mark.parametrize("keep", [0, 5, 16])
def test_drop_equals_mask_logits(model, batch, agg_layer, keep):
    drop = last_logits(model, FastVConfig(agg_layer=agg_layer, keep=keep, mode="drop"), batch)
    mask = last_logits(model, FastVConfig(agg_layer=agg_layer, keep=keep, mode="mask"), batch)
    assert (drop - mask).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["max_head", "weighted_combination", "random", "uniform"])
def test_drop_equals_mask_other_methods(model, batch, method):
    configs = [FastVConfig(agg_layer=2, keep=6, method=method, alpha=0.7, mode=mode) for mode in ("drop", "mask")]
    drop, mask = (last_logits(model, config, batch) for config in configs)
    assert (drop - mask).abs().max() <= 1e-4


@pytest.mark.parametrize("agg_layer", [0, 2])
def test_drop_equals_mask_generate(model, batch, agg_layer):
    inputs = {k: v for k, v in batch.items() if k != "position_ids"}
    outputs = {}
    for mode in ("drop", "mask"):
        with apply_fastv(model, FastVConfig(agg_layer=agg_layer, keep=5, mode=mode)) as fastv:
            outputs[mode] = fastv.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(outputs["drop"], outputs["mask"])


def test_pruning_changes_the_answer_and_keep_all_does_not(model, batch):
    """Guards the guard: pruning must matter on this model, keeping all must not."""
    full = model(**batch).logits[:, -1]
    assert (last_logits(model, FastVConfig(agg_layer=1, keep=2), batch) - full).abs().max() > 1e-2
    assert (last_logits(model, FastVConfig(agg_layer=1, keep=16), batch) - full).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------
# off == unmodified; hooks removed
# ----------------------------------------------------------------------------------------


def test_use_fast_v_false_is_exactly_the_model(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "position_ids"}
    expected_logits = model(**batch).logits
    expected_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with apply_fastv(model, FastVConfig(use_fast_v=False, agg_layer=1, keep=3)) as fastv:
        assert torch.equal(fastv(**batch).logits, expected_logits)
        assert torch.equal(fastv.generate(**inputs, max_new_tokens=4, do_sample=False), expected_tokens)


def test_hooks_removed_on_exit(model, batch):
    before = model(**batch).logits
    hooks = hook_snapshot(model)
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=4)) as fastv:
        fastv(**batch)
        assert hook_snapshot(model) != hooks
    assert hook_snapshot(model) == hooks
    assert torch.equal(model(**batch).logits, before)
    fastv = apply_fastv(model, FastVConfig(agg_layer=0, keep=4, mode="mask"))
    with pytest.raises(ValueError, match="already has FastV hooks"):
        apply_fastv(model, FastVConfig(agg_layer=1, keep=4))
    fastv.remove()
    assert hook_snapshot(model) == hooks
    apply_fastv(model, FastVConfig(agg_layer=1, keep=4)).remove()  # free again after remove()


def test_an_install_that_fails_halfway_leaves_no_hook_behind(model, batch, monkeypatch):
    """The hooks go on as one context: when registering one of them fails, every handle
    installed before it is removed again and the model is free for a new set."""
    from fastv_analysis.adapters import get_adapter

    model(**batch)  # warm-up: transformers adds its own hooks on the first forward
    hooks = hook_snapshot(model)
    adapter = get_adapter(model)

    def refuse(*args, **kwargs):
        raise RuntimeError("no more hooks")

    monkeypatch.setattr(adapter.attention(adapter.num_layers - 1), "register_forward_hook", refuse)
    with pytest.raises(RuntimeError, match="no more hooks"):
        apply_fastv(model, FastVConfig(agg_layer=2, keep=4))
    monkeypatch.undo()
    assert hook_snapshot(model) == hooks
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=4)) as fastv:
        fastv(**batch)
    assert hook_snapshot(model) == hooks


# ----------------------------------------------------------------------------------------
# batch-correct selection, metadata, run-time switching
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["avg_all_heads", "max_head", "weighted_combination", "uniform"])
def test_batch_equals_per_element(model, batch, method):
    config = FastVConfig(agg_layer=2, keep=5, method=method)
    with apply_fastv(model, config) as fastv:
        batched = fastv(**batch).logits[:, -1]
        batched_kept = fastv.last_selection_metadata["kept_indices"]
        for i in range(2):
            single = fastv(**unpadded(batch, i)).logits[:, -1]
            assert (single - batched[i]).abs().max() <= 1e-4
            assert torch.equal(fastv.last_selection_metadata["kept_indices"][0], batched_kept[i])


def test_selection_is_strategies_select_on_layer_k_minus_1(model, batch):
    """The kept set is strategies.select of the full model's layer K-1 last-token row."""
    with AttentionRecorder(model, [1], "last") as rec:
        model(**batch)
    image = image_positions(batch["input_ids"], model.config.image_token_id)
    attention = rec.rows[1][:, :, 0, :].gather(2, image[:, None, :].expand(-1, 4, -1))
    expected = strategies.select(attention, "max_head", 6)
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=6, method="max_head")) as fastv:
        fastv(**batch)
        meta = fastv.last_selection_metadata
        assert torch.equal(meta["kept_indices"], expected.indices)
        assert torch.equal(meta["max_head_idx"], expected.max_head)
        assert torch.allclose(meta["head_importance"], expected.head_importance, atol=1e-6)
        assert torch.allclose(fastv.last_image_attention, attention, atol=1e-6)
        kept_mask = fastv.last_gen_attention_mask
        seq_len = batch["input_ids"].shape[1]
        assert kept_mask.shape == (2, seq_len) and kept_mask.dtype == torch.bool
        assert (kept_mask.sum(1) == seq_len - 16 + 6).all()
        kept_positions = fastv.last_gen_kept_indices
        assert torch.equal(kept_positions, torch.arange(seq_len).expand(2, -1)[kept_mask].view(2, -1))
        for row in range(2):
            kept_image = image[row][torch.isin(image[row], kept_positions[row])]
            assert torch.equal(kept_image, image[row, expected.indices[row]])


def test_switch_method_and_alpha_at_run_time(model, batch):
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=5)) as fastv:
        fastv(**batch)
        assert fastv.last_selection_metadata["method"] == "avg_all_heads"
        fastv.fastv.method = "weighted_combination"
        fastv.fastv.alpha = 0.6
        fastv(**batch)
        meta = fastv.last_selection_metadata
        assert meta["method"] == "weighted_combination" and meta["alpha"] == 0.6
        expected = strategies.select(fastv.last_image_attention, "weighted_combination", 5, alpha=0.6)
        assert torch.equal(meta["kept_indices"], expected.indices)
        fastv.fastv.keep = 3
        fastv.fastv.agg_layer = 1
        fastv(**batch)
        assert fastv.last_gen_kept_indices.shape[1] == batch["input_ids"].shape[1] - 16 + 3


def test_k0_and_keep0(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "position_ids"}
    seq_len = batch["input_ids"].shape[1]
    with apply_fastv(model, FastVConfig(agg_layer=0, keep=4, seed=3)) as fastv:
        out = fastv.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, seq_len + 3)
        assert fastv.last_selection_metadata["method"] == "random"
        first = fastv.last_selection_metadata["kept_indices"].clone()
        fastv(**batch)
        assert torch.equal(fastv.last_selection_metadata["kept_indices"], first)  # seeded
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=0)) as fastv:
        fastv.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept = fastv.last_gen_kept_indices
        assert kept.shape == (2, seq_len - 16)
        image = image_positions(batch["input_ids"], model.config.image_token_id)
        assert not any(torch.isin(kept[row], image[row]).any() for row in range(2))


def test_forced_kept_sets_and_fixed_span(model):
    inputs = make_llava_inputs(model, before=4, after=3, batch=2)
    kept = torch.tensor([[0, 3, 15], [1, 2, 9]])
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=3, kept=kept)) as fastv:
        forced = fastv(**inputs).logits[:, -1]
        assert torch.equal(fastv.last_gen_kept_indices[:, 4:7], kept + 4)
        assert fastv.last_selection_metadata["method"] == "given"
    mask = last_logits(model, FastVConfig(agg_layer=2, keep=3, kept=kept, mode="mask"), inputs)
    assert (forced - mask).abs().max() <= 1e-4
    detected = last_logits(model, FastVConfig(agg_layer=2, keep=5), inputs)
    fixed = last_logits(model, FastVConfig.from_dict(
        {"fast_v_agg_layer": 2, "fast_v_attention_rank": 5, "fast_v_sys_length": 4, "fast_v_image_token_length": 16}
    ), inputs)
    assert torch.equal(detected, fixed)
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=5)) as fastv:
        fastv.force_kept(torch.tensor([1, 2]))
        fastv(**inputs)
        assert torch.equal(fastv.last_gen_kept_indices[:, 4:6], torch.tensor([[5, 6], [5, 6]]))


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


def test_config_aliases_and_validation(model):
    config = FastVConfig.from_dict({
        "use_fast_v": True, "fast_v_agg_layer": 3, "fast_v_attention_rank": 64, "fast_v_sys_length": 35,
        "fast_v_image_token_length": 576, "fast_v_token_selection_method": "max_head", "fast_v_weighted_alpha": 0.25,
    })
    assert (config.agg_layer, config.keep, config.image_start, config.image_tokens) == (3, 64, 35, 576)
    assert (config.method, config.alpha, config.use_fast_v) == ("max_head", 0.25, True)
    for bad, match in [
        ({"fast_v_bogus": 1}, "unknown FastV config key"),
        ({"keep": -1}, "keep must be"),
        ({"method": "best"}, "unknown method"),
        ({"alpha": 1.5}, "alpha must be"),
        ({"mode": "prune"}, "mode must be"),
        ({"keep": 3, "fast_v_attention_rank": 4}, "given twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            FastVConfig.from_dict(bad)
    with pytest.raises(ValueError, match="agg_layer must be < the number of decoder layers"):
        apply_fastv(model, FastVConfig(agg_layer=4))
    inputs = make_llava_inputs(model)
    with apply_fastv(model, FastVConfig(agg_layer=1, keep=17)) as fastv:
        with pytest.raises(ValueError, match=r"keep must be in 0\.\.16"):
            fastv(**inputs)


# ----------------------------------------------------------------------------------------
# shared-prefix batching
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg_layer,mode", [(0, "drop"), (1, "drop"), (2, "drop"), (2, "mask")])
def test_shared_prefix_equals_separate_runs(model, agg_layer, mode):
    inputs = make_llava_inputs(model, before=3, after=4, seed=7)
    kept_sets = torch.tensor([[0, 1, 2, 3, 4], [3, 5, 7, 9, 15], [10, 11, 12, 13, 14], [0, 4, 8, 12, 15]])
    hooks = hook_snapshot(model)
    with prefill_shared(model, inputs, kept_sets, agg_layer, mode=mode) as shared:
        tokens = greedy_decode(shared, max_new_tokens=5)
        first_logits = shared.logits
    assert hook_snapshot(model) == hooks
    for c, kept in enumerate(kept_sets):
        with apply_fastv(model, FastVConfig(agg_layer=agg_layer, keep=5, kept=kept)) as fastv:
            alone = fastv(**inputs).logits[0, -1]
            generated = fastv.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert (first_logits[c] - alone).abs().max() <= 1e-4
        assert torch.equal(tokens[c], generated[0, inputs["input_ids"].shape[1]:])


def test_shared_decode_stops_at_eos(model):
    inputs = make_llava_inputs(model, seed=7)
    kept_sets = torch.tensor([[0, 1, 2], [5, 6, 7]])
    tokens = shared_greedy_answers(model, inputs, kept_sets, 2, max_new_tokens=6)
    eos = int(tokens[0, -1])
    stopped = shared_greedy_answers(model, inputs, kept_sets, 2, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    expected = tokens.clone()
    ends = []
    for row in range(2):
        hits = (tokens[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else tokens.shape[1]
        expected[row, end:] = 0
        ends.append(end)
    assert torch.equal(stopped, expected[:, : max(ends)])


def test_bfloat16_drop_equals_mask_generate():
    model = make_tiny_llava(num_kv_heads=2).to(torch.bfloat16)
    inputs = make_llava_inputs(model, before=[3, 6], after=[5, 2], left_pad=[0, 1])
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    outputs = {}
    for mode in ("drop", "mask"):
        with apply_fastv(model, FastVConfig(agg_layer=2, keep=5, mode=mode)) as fastv:
            outputs[mode] = fastv.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert fastv.last_image_attention.dtype == torch.float32
    assert torch.equal(outputs["drop"], outputs["mask"])


# ----------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------


def test_flops_by_hand():
    # n=10, d=4, m=8: 4*10*16 + 2*100*4 + 2*10*4*8 = 640 + 800 + 640 = 2080
    assert layer_flops(10, 4, 8) == 2080
    # n-hat = 6: 4*6*16 + 2*36*4 + 2*6*4*8 = 384 + 288 + 384 = 1056; K=1 of 3 layers
    assert prefill_flops(10, 6, 3, 1, 4, 8) == 2080 + 2 * 1056
    assert flops_ratio(10, 5, 1, 3, 1, 4, 8) == pytest.approx((2080 + 2 * 1056) / (3 * 2080))
    # LLaVA-1.5-7B, K=2, keep 288 of 576 in a 611-token prompt: FastV reports about 55 %.
    ratio = flops_ratio(611, 576, 288, 32, 2, 4096, 11008)
    assert 0.5 < ratio < 0.6
    assert equivalent_image_tokens(576, 64, 32, 2) == pytest.approx((2 * 576 + 30 * 64) / 32)


def test_schedule_and_three_matrix_mlp_flops_by_hand():
    from fastv_analysis.flops import schedule_flops

    # 3-matrix MLP, n=10, d=4, m=8: 640 + 800 + 3*10*4*8 = 2400
    assert layer_flops(10, 4, 8, mlp_matrices=3) == 2400
    # 4 layers: 1 at 10 tokens, 2 at 6 (1056, see above), 1 at 3: 4*3*16 + 2*9*4 + 2*3*4*8 = 192 + 72 + 192 = 456
    assert schedule_flops(10, [(1, 6), (3, 3)], 4, 4, 8) == 2080 + 2 * 1056 + 456
    # N = 5 image tokens of 10: keep 1 from K = 1 (6 tokens), then keep 0 from K = 3 (5 tokens):
    # 5 tokens: 4*5*16 + 2*25*4 + 2*5*4*8 = 320 + 200 + 320 = 840
    assert flops_ratio(10, 5, 1, 4, 1, 4, 8, stages=[(3, 0)]) == pytest.approx((2080 + 2 * 1056 + 840) / (4 * 2080))
    assert equivalent_image_tokens(5, 1, 4, 1, stages=[(3, 0)]) == pytest.approx((1 * 5 + 2 * 1 + 1 * 0) / 4)
    with pytest.raises(ValueError):
        schedule_flops(10, [(3, 6), (1, 3)], 4, 4, 8)


# ----------------------------------------------------------------------------------------
# pure index helpers
# ----------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.data())
def test_kept_positions_property(data):
    batch = data.draw(st.integers(1, 3))
    n_image = data.draw(st.integers(1, 8))
    keep = data.draw(st.integers(0, n_image))
    pads = [data.draw(st.integers(0, 4)) for _ in range(batch)]
    befores = [data.draw(st.integers(0, 4)) for _ in range(batch)]
    seq_len = max(p + b for p, b in zip(pads, befores)) + n_image + 2
    input_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for row, before in enumerate(befores):
        start = seq_len - 2 - n_image
        input_ids[row, start : start + n_image] = 7
        input_ids[row, start - before : start] = 3
    kept_image = torch.tensor(
        [sorted(data.draw(st.permutations(range(n_image)))[:keep]) for _ in range(batch)], dtype=torch.long
    ).view(batch, keep)
    image = image_positions(input_ids, 7)
    mask = kept_token_mask(seq_len, image, kept_image)
    positions = mask_to_positions(mask)
    assert positions.shape == (batch, seq_len - n_image + keep)
    assert (positions.diff(dim=1) > 0).all()
    for row in range(batch):
        text = torch.tensor([p for p in range(seq_len) if p not in image[row].tolist()], dtype=torch.long)
        assert torch.isin(text, positions[row]).all()
        kept = positions[row][torch.isin(positions[row], image[row])]
        assert torch.equal(kept, image[row, kept_image[row]])
    keys = decode_key_positions(positions, seq_len, seq_len + 3)
    assert torch.equal(keys[:, -3:], torch.arange(seq_len, seq_len + 3).expand(batch, -1))


# ----------------------------------------------------------------------------------------
# the random control is drawn per sample (issue 11.1); the query is the last real token (11.8)
# ----------------------------------------------------------------------------------------


def _left_padded(elements: list[dict], extra: int = 0) -> dict:
    """Batch single-element inputs again, left-padded to the longest plus ``extra``."""
    length = max(e["input_ids"].shape[1] for e in elements) + extra
    ids = torch.zeros(len(elements), length, dtype=torch.long)
    mask = torch.zeros(len(elements), length, dtype=torch.long)
    for i, e in enumerate(elements):
        n = e["input_ids"].shape[1]
        ids[i, length - n:], mask[i, length - n:] = e["input_ids"][0], 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([e["pixel_values"] for e in elements])}


def _three_prompts(model):
    return make_llava_inputs(model, before=[3, 5, 2], after=[4, 2, 6], seed=11)


@pytest.mark.parametrize("agg_layer", [0, 2])
def test_random_control_differs_across_samples(model, agg_layer):
    """Three prompts, one forward each, must not all keep one subset (the old per-forward re-seed did)."""
    inputs = _three_prompts(model)
    kept = set()
    with apply_fastv(model, FastVConfig(agg_layer=agg_layer, keep=5, method="random", seed=0)) as fastv:
        for i in range(3):
            fastv(**unpadded(inputs, i))
            kept.add(tuple(fastv.last_selection_metadata["kept_indices"][0].tolist()))
    assert len(kept) == 3


@pytest.mark.parametrize("agg_layer", [0, 2])
def test_random_control_same_sample_same_set_in_any_batch(model, agg_layer):
    """A sample keeps the same random set alone, at another batch position or in a bigger batch."""
    inputs = _three_prompts(model)
    config = FastVConfig(agg_layer=agg_layer, keep=5, method="random", seed=4)
    with apply_fastv(model, config) as fastv:
        fastv(**inputs)
        batched = fastv.last_selection_metadata["kept_indices"].clone()
        for i in range(3):
            fastv(**unpadded(inputs, i))
            assert torch.equal(fastv.last_selection_metadata["kept_indices"][0], batched[i])
        # reversed order, padded to another length: element 2 first
        order = [2, 1, 0]
        rev = _left_padded([unpadded(inputs, j) for j in order], extra=3)
        fastv(**rev)
        again = fastv.last_selection_metadata["kept_indices"]
        assert torch.equal(again, batched[order])


def test_random_control_key_includes_pixels(model):
    """The same question about another image is another sample (POPE)."""
    inputs = make_llava_inputs(model, before=3, after=4, batch=1, seed=2)
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 0.5)
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=5, method="random")) as fastv:
        fastv(**inputs)
        a = fastv.last_selection_metadata["kept_indices"].clone()
        fastv(**other)
        b = fastv.last_selection_metadata["kept_indices"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("agg_layer", [0, 2])
def test_random_control_with_sample_ids_equals_select_replay(model, agg_layer):
    """Online random with explicit sample ids keeps exactly what select.replay keeps for them."""
    from fastv_analysis.select import replay

    inputs = _three_prompts(model)
    ids = [7, 0, 123]
    with apply_fastv(model, FastVConfig(agg_layer=agg_layer, keep=5, method="random", seed=9,
                                        sample_ids=ids)) as fastv:
        fastv(**inputs)
        online = fastv.last_selection_metadata["kept_indices"]
    offline = replay(torch.rand(3, 4, 16), ["random"], keeps=[5], seed=9, sample_ids=ids)
    assert offline["kept"].to_list() == online.tolist()
    with pytest.raises(ValueError, match="sample_ids has 2 ids for a batch of 3"):
        with apply_fastv(model, FastVConfig(agg_layer=agg_layer, keep=5, method="random", sample_ids=[1, 2])) as f:
            f(**inputs)


def test_right_padding_ranks_by_the_last_real_token(model):
    """A right-padded element is ranked by its last real token, as if it stood alone."""
    left = make_llava_inputs(model, before=[3, 6], after=[5, 4], seed=5)
    right = {k: v.clone() for k, v in left.items()}
    for i in range(2):
        real = left["attention_mask"][i].bool()
        n = int(real.sum())
        right["input_ids"][i] = 0
        right["attention_mask"][i] = 0
        right["input_ids"][i, :n] = left["input_ids"][i, real]
        right["attention_mask"][i, :n] = 1
    assert right["attention_mask"][:, -1].eq(0).any()  # really right-padded
    with apply_fastv(model, FastVConfig(agg_layer=2, keep=5)) as fastv:
        for i in range(2):
            fastv(**unpadded(left, i))
            alone = fastv.last_selection_metadata["kept_indices"][0].clone()
            fastv(**right)
            assert torch.equal(fastv.last_selection_metadata["kept_indices"][i], alone)


def test_sample_key_of_a_single_element_hashes_all_its_pixels():
    """Anyres models pass one element's tiles as [tiles, 3, h, w]: they still key the sample."""
    from fastv_analysis.pruning import sample_keys

    ids = torch.tensor([[5, 6, 7]])
    tiles = torch.rand(5, 3, 4, 4)
    other = tiles.clone()
    other[3] += 1.0
    assert sample_keys(ids, None, tiles) != sample_keys(ids, None, other)
    batch = torch.tensor([[5, 6, 7], [5, 6, 8]])  # 2 elements, 5 tiles: not attributable -> ids only
    assert sample_keys(batch, None, tiles) == sample_keys(batch, None, other)
