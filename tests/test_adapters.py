"""The adapter contract: every registered architecture, on a tiny random checkpoint built from
transformers' own config and processor classes, behaves the same under the FastV hooks.

One batch of two prompts with images of different sizes (so different numbers of image
tokens) and different question lengths (so left padding) is the input throughout.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_sized_questions
from fastv_analysis.adapters import get_adapter, registry
from fastv_analysis.attention import AttentionRecorder
from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.pruning import FastVConfig, apply_fastv, padded_image_positions, shared_greedy_answers

SUPPORTED = tuple(registry())  # every family's facts (tiny checkpoint, sizes, uniform lattice) come from its module


def sizes(arch):
    """The family's two contract image sizes (two 336 px images where every image gives the same N)."""
    return list(registry()[arch].contract.sizes or [(336, 336), (336, 336)])


QUESTIONS = ["what color is the object?", "is there a red square in the picture or not?"]


def test_every_family_declares_its_facts():
    """Each registered class: a tiny checkpoint recipe, two contract images and their uniform lattice."""
    for arch, family in registry().items():
        assert family.name == arch and callable(family.tiny) and family.grid_extent in ("crop", "image")
        assert len(family.contract.uniform_keep_2) == 2
        assert family.contract.sizes is None or len(set(family.contract.sizes)) == 2


@pytest.fixture(scope="module", params=SUPPORTED)
def family(request, tmp_path_factory):
    arch = request.param
    path = registry()[arch].tiny(tmp_path_factory.mktemp(arch) / "m", seed=1)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    assert type(loaded.model).__name__ == arch
    return arch, loaded


def _image(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def _batch(loaded, arch, same_size=False):
    two = sizes(arch)
    if same_size:
        two = [two[0], two[0]]
    proc = loaded.processor
    prompts = [build_prompt(proc, q) for q in QUESTIONS]
    return dict(proc(text=prompts, images=[[_image(s, i)] for i, s in enumerate(two)], return_tensors="pt",
                     padding=True))


def _one(inputs, b, loaded, arch, same_size=False):
    """Element b of the batch, processed alone (no padding)."""
    size = sizes(arch)[0 if same_size else b]
    proc = loaded.processor
    return dict(proc(text=[build_prompt(proc, QUESTIONS[b])], images=[_image(size, b)], return_tensors="pt"))


def _n_image(model, inputs):
    return padded_image_positions(inputs["input_ids"], get_adapter(model).image_token_id)[1]


def test_batch_is_left_padded_with_different_image_token_counts(family):
    arch, loaded = family
    inputs = _batch(loaded, arch)
    n = _n_image(loaded.model, inputs)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding
    if registry()[arch].contract.sizes is not None:
        assert n[0] != n[1]


def test_unpruned_wrapper_and_keep_all_equal_the_unmodified_model(family):
    arch, loaded = family
    model = loaded.model
    with torch.no_grad():
        inputs = _batch(loaded, arch)
        full = model(**inputs).logits
        with apply_fastv(model, use_fast_v=False) as m:
            assert torch.equal(m(**inputs).logits, full)
        same = _batch(loaded, arch, same_size=True)
        full_same = model(**same).logits[:, -1]
        n = int(_n_image(model, same).min())
        for k in (0, 1, 2):
            with apply_fastv(model, agg_layer=k, keep=n) as m:
                torch.testing.assert_close(m(**same).logits[:, -1], full_same, rtol=0, atol=1e-5)


@pytest.mark.parametrize("agg_layer", [0, 1, 2])
def test_drop_equals_mask_and_each_element_as_if_alone(family, agg_layer):
    """Physically dropping == masking (<= 1e-4, same greedy tokens), and a pruned element of a
    batch with different image sizes answers as it does alone (the fillers are invisible)."""
    arch, loaded = family
    model = loaded.model
    inputs = _batch(loaded, arch)
    keep = 3
    outs, tokens = {}, {}
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        for mode in ("drop", "mask"):
            with apply_fastv(model, agg_layer=agg_layer, keep=keep, method="avg_all_heads", mode=mode,
                             sample_ids=[0, 1]) as m:
                outs[mode] = m(**inputs).logits[:, -1]
                tokens[mode] = m.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert (outs["drop"] - outs["mask"]).abs().max() <= 1e-4
        assert ((outs["drop"] - full).abs().amax(dim=1) > 1e-3).all()  # it did prune, in both elements
        assert torch.equal(tokens["drop"], tokens["mask"])
        for b in range(2):
            alone = _one(inputs, b, loaded, arch)
            with apply_fastv(model, agg_layer=agg_layer, keep=keep, sample_ids=[b]) as m:
                logits = m(**alone).logits[:, -1]
            assert (logits[0] - outs["drop"][b]).abs().max() <= 1e-4


def test_recorder_rows_equal_eager_attention(family):
    arch, loaded = family
    model = loaded.model
    inputs = _batch(loaded, arch)
    with torch.no_grad():
        with AttentionRecorder(model, [1], "last") as rec:
            model(**inputs)
        model.set_attn_implementation("eager")
        try:
            eager = model(**inputs, output_attentions=True).attentions[1]
        finally:
            model.set_attn_implementation("sdpa")
    assert (rec.rows[1][:, :, 0, :] - eager[:, :, -1, :]).abs().max() <= 1e-5


def test_shared_prefix_eval_equals_online_pruning(family):
    """eval's one-prefill-many-kept-sets path answers exactly as apply_fastv + generate."""
    arch, loaded = family
    model = loaded.model
    tok = loaded.processor.tokenizer
    inputs = _batch(loaded, arch)
    alone = _one(inputs, 1, loaded, arch)
    n = int(_n_image(model, alone)[0])
    gen = torch.Generator().manual_seed(0)
    kept_sets = torch.stack([torch.randperm(n, generator=gen)[:4].sort().values for _ in range(3)])
    for k in (1, 2):
        shared = shared_greedy_answers(model, alone, kept_sets, agg_layer=k, max_new_tokens=4,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for c in range(3):
            with apply_fastv(model, agg_layer=k, keep=4, kept=kept_sets[c]) as m:
                out = m.generate(**alone, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            online = out[0, alone["input_ids"].shape[1]:]
            assert torch.equal(shared[c, : online.shape[0]], online), (k, c)


def test_question_placeholder_becomes_the_processors_own(family):
    """Question files say <image>; Qwen's prompt must hold its own placeholder instead, once."""
    arch, loaded = family
    proc = loaded.processor
    token = proc.image_token
    for question in ("<image>\nwhat color?", "what color?"):
        prompt = build_prompt(proc, question)
        assert prompt.count(token) == 1 and (token == "<image>" or "<image>" not in prompt)
    forced = build_prompt(proc, "what color?", template="Q: <image>\n{question} A:")
    assert forced == f"Q: {token}\nwhat color? A:"


MIXED = [(56, 56), (120, 80), (80, 120), (56, 56), (200, 90)]


@pytest.mark.parametrize("arch", [a for a, f in registry().items() if f.contract.sizes is not None])
def test_cli_run_with_mixed_image_sizes(arch, tmp_path):
    """capture -> select -> eval -> report on a question file whose images give different
    numbers of image tokens, with the family's own prompt format."""
    import polars as pl

    from fastv_analysis.cli.main import main

    model = registry()[arch].tiny(tmp_path / "m", seed=1)
    data = tmp_path / "d"
    write_sized_questions(data, MIXED)
    run = tmp_path / "run"
    assert main(["capture", "--model", str(model), "--data", str(data / "questions.jsonl"), "--out", str(run),
                 "--agg-layers", "0,2", "--max-new-tokens", "2", "--batch-size", "2", "--quiet"]) == 0
    samples = pl.read_parquet(run / "samples.parquet")
    assert samples.height == 5 and samples["n_image_tokens"].n_unique() >= 3
    for row in samples.iter_rows(named=True):  # each sample's own grid, tiles and newlines explicit
        cells = np.asarray(row["token_cells"])
        assert len(cells) == row["n_image_tokens"] and (cells >= 0).sum() == row["grid_rows"] * row["grid_cols"]
    grids = registry()[arch].contract.mixed_grids  # e.g. Qwen's smart_resize: round(h / 28) x round(w / 28)
    if grids is not None:
        assert samples.sort("sample_id").select("grid_rows", "grid_cols").rows() == list(grids)
    newlines = [int((np.asarray(c) == -2).sum()) for c in samples["token_cells"]]
    assert newlines == [0] * 5 or newlines == samples["grid_rows"].to_list()  # anyres: one newline per grid row
    wide = samples.filter(pl.col("image_width") == 200).row(0, named=True)  # landscape is wider
    assert wide["grid_cols"] > wide["grid_rows"]
    assert main(["select", str(run), "--keep", "4,2", "--alphas", "0.5", "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    uniform = sel.filter(pl.col("method") == "uniform")
    assert (uniform["on_grid_share"] == 1.0).all() and uniform["mean_row"].is_not_nan().all()
    joined = sel.join(samples.select("sample_id", "n_image_tokens"), on="sample_id")
    assert (joined["keep_ratio"] - joined["keep"] / joined["n_image_tokens"]).abs().max() < 1e-12
    assert main(["eval", str(run), "--timing-samples", "1", "--compare-mask", "2", "--quiet"]) == 0
    acc = pl.read_parquet(run / "eval" / "accuracy.parquet")
    assert acc.filter(pl.col("method") == "full").height == 2  # one full control per layer, whatever N
    assert (acc["n"] == 5).all()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()


@pytest.mark.parametrize("agg_layer", [0, 1])
def test_uniform_control_is_a_lattice_on_each_images_own_grid(family, agg_layer):
    arch, loaded = family
    inputs = _batch(loaded, arch)
    with torch.no_grad(), apply_fastv(loaded.model, agg_layer=agg_layer, keep=2, method="uniform") as m:
        m(**inputs)
        kept = m.last_selection_metadata["kept_indices"]
    assert kept.tolist() == [list(k) for k in registry()[arch].contract.uniform_keep_2]


@pytest.mark.parametrize("arch", ["LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"])
def test_newline_policy_keep_keeps_every_image_newline_outside_the_budget(arch, tmp_path):
    """newline="keep": the positions whose input embedding IS the model's image_newline vector
    are all kept, and exactly `keep` other image tokens; select --newline-tokens keep replays
    the same sets offline."""
    import json

    import polars as pl

    from fastv_analysis.cli.main import main

    model_dir = registry()[arch].tiny(tmp_path / "m", seed=1)
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    model = loaded.model
    inputs = _batch(loaded, arch)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    is_newline = (seen["embeds"] == model.model.image_newline.to(seen["embeds"].dtype)).all(dim=-1)  # [B, S]
    image = inputs["input_ids"] == get_adapter(model).image_token_id
    assert is_newline.any(dim=1).all() and not (is_newline & ~image).any()
    for agg_layer in (0, 2):
        with torch.no_grad(), apply_fastv(model, agg_layer=agg_layer, keep=3, newline="keep", sample_ids=[0, 1]) as m:
            m(**inputs)
            kept = m.last_gen_attention_mask
        assert kept[is_newline].all()
        assert ((kept & image & ~is_newline).sum(dim=1) == 3).all()

    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    _image((200, 90), 4).save(data / "images" / "0.png")
    (data / "questions.jsonl").write_text(json.dumps({"question_id": "q0", "image": "images/0.png",
                                                      "text": "what color?", "answer": "red"}) + "\n")
    run = tmp_path / "run"
    assert main(["capture", "--model", str(model_dir), "--data", str(data / "questions.jsonl"), "--out", str(run),
                 "--agg-layers", "2", "--max-new-tokens", "2", "--quiet"]) == 0
    assert main(["select", str(run), "--keep", "3", "--methods", "avg_all_heads,random", "--newline-tokens", "keep",
                 "--quiet"]) == 0
    sel = pl.read_parquet(run / "select" / "selections.parquet")
    alone = dict(loaded.processor(text=[build_prompt(loaded.processor, "what color?")],
                                  images=[_image((200, 90), 4)], return_tensors="pt"))
    for method in ("avg_all_heads", "random"):
        with torch.no_grad(), apply_fastv(model, agg_layer=2, keep=3, method=method, newline="keep",
                                          sample_ids=[0]) as m:
            m(**alone)
            online = m.last_selection_metadata["kept_indices"][0].tolist()
        assert sel.filter(pl.col("method") == method)["kept"].to_list() == [online]
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0


def _own_decode_loop(model, inputs, mode, cache_kwarg, steps=4, agg_layer=0):
    """A user's decode loop: prefill, then one token at a time through ``model(...)`` with the
    cache under ``cache_kwarg`` and neither position ids nor a mask; next-token logits per step."""
    from transformers import DynamicCache

    with torch.no_grad(), apply_fastv(model, agg_layer=agg_layer, keep=3, mode=mode, sample_ids=[0]) as m:
        cache = DynamicCache(config=model.config.get_text_config())
        logits = [m(**inputs, use_cache=True, **{cache_kwarg: cache}).logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(m(input_ids=token, use_cache=True, **{cache_kwarg: cache}).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("agg_layer", [0, 2])
@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])
def test_own_decode_loop_without_position_ids_drop_equals_mask(family, cache_kwarg, agg_layer):
    """Decoding through model(...) without position ids: at K = 0 the drop-mode cache holds only
    the kept tokens, and a model that counts positions from the cache length (Qwen's M-RoPE
    offsets too) must still place each new token where mask mode does; the deprecated
    past_key_values keyword (still accepted by 5.24) must keep the hooks on while decoding."""
    import warnings

    arch, loaded = family
    own = get_adapter(loaded.model).cache_kwarg  # "cache" from 5.24 on, "past_key_values" in 5.23
    if cache_kwarg != own and cache_kwarg != "past_key_values":
        pytest.skip(f"this transformers names the cache {own!r} only")
    alone = _one(_batch(loaded, arch), 1, loaded, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values is deprecated in 5.24
        out = {mode: _own_decode_loop(loaded.model, alone, mode, cache_kwarg, agg_layer=agg_layer)
               for mode in ("drop", "mask")}
    assert (out["drop"] - out["mask"]).abs().max() <= 1e-4
    assert torch.equal(out["drop"], _own_decode_loop(loaded.model, alone, "drop", own, agg_layer=agg_layer))


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_apply_fastv_refuses_attention_implementations_without_a_4d_mask(family, impl, monkeypatch):
    """flash_attention_2 hands the layers a 2D padding mask and flex_attention a BlockMask: the
    hooks gather a 4D mask, so apply_fastv (and the recorder) refuse them in one line, also
    when the implementation is switched after apply_fastv."""
    arch, loaded = family
    model = loaded.model
    inputs = _one(_batch(loaded, arch), 0, loaded, arch)
    text_config = get_adapter(model).language_model.config
    monkeypatch.setattr(text_config, "_attn_implementation", impl)
    for install in (lambda: apply_fastv(model, agg_layer=1, keep=2), lambda: AttentionRecorder(model, [1])):
        with pytest.raises(ValueError, match=f"{arch}: the text decoder runs attn_implementation='{impl}'; "
                                             "FastV's hooks support sdpa or eager only") as err:
            install()
        assert "\n" not in str(err.value)
    monkeypatch.setattr(text_config, "_attn_implementation", "sdpa")
    with apply_fastv(model, agg_layer=1, keep=2) as m:
        monkeypatch.setattr(text_config, "_attn_implementation", impl)
        with pytest.raises(ValueError, match="support sdpa or eager only"), torch.no_grad():
            m(**inputs)


def test_qwen_own_decode_loop_with_a_mask_answers_as_generate(family):
    """M-RoPE decoding with the 2D mask and no position ids (which the unmodified Qwen model
    cannot run: it derives ids for the whole mask) on the mixed, left-padded batch at K = 0:
    the hooks place each token by the mask's running count + the prompt's rope deltas, as
    generate does."""
    from transformers import DynamicCache

    arch, loaded = family
    if get_adapter(loaded.model).default_position_ids(1, 1, "cpu").dim() != 3:
        pytest.skip("M-RoPE families only (a Llama decoder counts from the cache, ignoring the mask)")
    inputs = _batch(loaded, arch)
    own = {get_adapter(loaded.model).cache_kwarg: None}  # this transformers' name for the cache
    with torch.no_grad(), apply_fastv(loaded.model, agg_layer=0, keep=3, sample_ids=[0, 1]) as m:
        expected = m.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        own = dict.fromkeys(own, DynamicCache(config=loaded.model.config.get_text_config()))
        out, mask, tokens = m(**inputs, use_cache=True, **own), inputs["attention_mask"], []
        for _ in range(5):
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            out = m(input_ids=tokens[-1], attention_mask=mask, use_cache=True, **own)
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_cache_and_cached_calls_go_through_the_adapter(family):
    """new_cache / next_token_logits / cache_length / repeat_cache: a prefill into the adapter's
    cache gives the model's own next-token logits; repeating the cache to batch 3 makes the next
    step give three rows equal to the batch-1 step's."""
    arch, loaded = family
    model, adapter = loaded.model, get_adapter(loaded.model)
    inputs = _one(_batch(loaded, arch), 0, loaded, arch)
    seq_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        expected = model(**inputs).logits[:, -1]
        caches = [adapter.new_cache(), adapter.new_cache()]
        logits = [adapter.next_token_logits(model, cache, **inputs) for cache in caches]
        assert logits[0].shape == expected.shape and torch.allclose(logits[0], expected, atol=1e-5)
        assert adapter.cache_length(caches[0]) == adapter.cache_length(caches[0], adapter.num_layers - 1) == seq_len
        adapter.repeat_cache(caches[1], range(adapter.num_layers), 3)
        token = logits[0].argmax(-1, keepdim=True)
        mask = torch.ones(1, seq_len + 1, dtype=torch.long)
        step = {}
        for n, cache in zip((1, 3), caches):
            position_ids, state = adapter.prompt_positions(dict(inputs), inputs["attention_mask"])
            ids = adapter.decode_positions(mask.expand(n, -1), state)
            step[n] = adapter.next_token_logits(model, cache, input_ids=token.expand(n, -1),
                                                attention_mask=mask.expand(n, -1), position_ids=ids)
    assert step[3].shape[0] == 3 and adapter.cache_length(caches[1]) == seq_len + 1
    assert torch.allclose(step[3], step[1].expand(3, -1), atol=1e-5)


def test_a_family_module_is_all_loading_and_the_report_need(monkeypatch):
    """A module listed in adapters.MODULES that declares FAMILIES is supported everywhere:
    get_adapter builds it, load_model's class check and the report's geometry read it."""
    import sys
    import types

    from fastv_analysis import adapters
    from fastv_analysis.adapters import Contract, Family
    from fastv_analysis.report.grids import base_tile, grid_extent
    from fastv_analysis.layout import TokenLayout

    module = types.ModuleType("fastv_analysis.adapters.made_up")
    module.FAMILIES = (Family("MadeUpForConditionalGeneration", lambda model: ("built", model), lambda *a, **k: None,
                              Contract(None, ((0,), (0,))), grid_extent="image", base_tile=True),)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(adapters, "MODULES", (*adapters.MODULES, "made_up"))
    adapters.registry.cache_clear()
    try:
        made_up = type("MadeUpForConditionalGeneration", (torch.nn.Module,), {})()
        assert get_adapter(made_up) == ("built", made_up)
        assert adapters.SUPPORTED[-1] == "MadeUpForConditionalGeneration"
        assert grid_extent("MadeUpForConditionalGeneration") == "image" and grid_extent("Unknown") == "crop"
        layout = TokenLayout.anyres(4, 2, 2)
        assert base_tile(layout, "MadeUpForConditionalGeneration") == 2 and base_tile(layout, "Unknown") == 0
    finally:
        adapters.registry.cache_clear()


def test_hub_kernels_are_off_and_a_kernelized_model_is_refused(family, monkeypatch):
    """transformers 5.25 loads with hub kernels on by default; load_model loads without them, and
    apply_fastv / the recorder refuse in one line a model kernelized on a device where kernels
    replace layers (the hooks and the row recompute are checked on the PyTorch layers only);
    on the CPU, where no kernel maps, such a model is accepted."""
    from fastv_analysis.adapters import base

    arch, loaded = family
    assert not loaded.model.use_kernels
    monkeypatch.setattr(loaded.model, "_use_kernels", True, raising=False)
    apply_fastv(loaded.model, agg_layer=1, keep=2).remove()  # CPU: every layer is still PyTorch's
    monkeypatch.setattr(base, "_device_type", lambda model: "cuda")
    for install in (lambda: apply_fastv(loaded.model, agg_layer=1, keep=2),
                    lambda: AttentionRecorder(loaded.model, [1])):
        with pytest.raises(ValueError, match=f"{arch}: the model was loaded with hub kernels") as err:
            install()
        assert "\n" not in str(err.value) and "use_kernels=False" in str(err.value)


def test_family_hooks_are_installed_with_fastvs_and_see_the_kept_positions(family, monkeypatch):
    """An adapter's family_hooks are installed and removed with FastV's; sequence_positions(layer)
    is None before K and in mask mode, the kept positions from K on in drop mode."""
    arch, loaded = family
    model = loaded.model
    inputs = _batch(loaded, arch)
    seen = []

    own = type(get_adapter(model)).family_hooks  # the family's own (Qwen3-VL: DeepStack) stay on

    def family_hooks(self, fastv):
        return own(self, fastv) + [self.layers[i].register_forward_pre_hook(
            lambda mod, args, i=i: seen.append((i, fastv.sequence_positions(i)))) for i in range(self.num_layers)]

    monkeypatch.setattr(type(get_adapter(model)), "family_hooks", family_hooks)
    for mode in ("drop", "mask"):
        seen.clear()
        with torch.no_grad(), apply_fastv(model, agg_layer=1, keep=3, mode=mode) as m:
            m(**inputs)
            kept = m.prompt.kept_positions
        assert [i for i, _ in seen] == list(range(len(get_adapter(model).layers)))
        assert all(p is None for i, p in seen if i < 1 or mode == "mask")
        assert all(torch.equal(p, kept) for i, p in seen if i >= 1 and mode == "drop")
    seen.clear()
    with torch.no_grad():
        model(**inputs)
    assert seen == []
