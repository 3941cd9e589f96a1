"""Gemma3 and PaliGemma beyond the registry-wide contract (tests/test_adapters.py).

Gemma3's sliding-window layers (the tiny checkpoint's window is 8 tokens, shorter than every
prompt): the masks a decode step gets after a K = 0 drop are transformers' own on the keys
that remain, and a window longer than the prompt prunes as exactly. PaliGemma: the prompt
of a checkpoint without a chat template, and the loss on the processor's labels."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastv_analysis.adapters import registry
from fastv_analysis.adapters.gemma3 import decode_masks
from fastv_analysis.loading import build_prompt, load_model
from fastv_analysis.pruning import apply_fastv

ARCH = "Gemma3ForConditionalGeneration"
QUESTIONS = ["what color is the object?", "is there a red square in the picture or not?"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = registry()[ARCH].tiny(tmp_path_factory.mktemp("gemma3") / "m", seed=1)
    return load_model(str(path), device="cpu", dtype="float32")


def _batch(loaded):
    rng = np.random.default_rng(0)
    images = [[Image.fromarray((rng.random((40 + 20 * i, 50, 3)) * 255).astype("uint8"))] for i in range(2)]
    prompts = [build_prompt(loaded.processor, q) for q in QUESTIONS]
    return dict(loaded.processor(text=prompts, images=images, return_tensors="pt", padding=True))


def _decode_step_masks(model, inputs):
    """The two masks the model itself builds for the first decode step after an unpruned prefill
    (full caches, so the keys are the whole prompt + the new token)."""
    from transformers import DynamicCache

    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs["attention_mask"])

    cache = DynamicCache()
    with torch.no_grad():
        out = model(**inputs, use_cache=True, past_key_values=cache)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), attention_mask=mask, past_key_values=cache,
                  use_cache=True)
        finally:
            handle.remove()
    return mask, seen


def test_decode_masks_are_transformers_own_on_an_unpruned_prompt(loaded):
    """With every prompt position kept, decode_masks gives the masks Gemma3Model builds
    (causal + padding; the local one also the window, counted in the prompt's indices)."""
    inputs = _batch(loaded)
    mask2d, own = _decode_step_masks(loaded.model, inputs)
    seq_len = inputs["input_ids"].shape[1]
    window = loaded.model.config.text_config.sliding_window
    assert seq_len > window and (inputs["attention_mask"][:, 0] == 0).any()  # the window cuts the prompt; padding
    ours = decode_masks(mask2d, torch.arange(seq_len).expand(2, -1), seq_len, 1, window, torch.float32)
    for kind in ("full_attention", "sliding_attention"):
        expected = own[kind]
        expected = expected if expected.dtype == torch.bool else expected == 0
        assert torch.equal(ours[kind] == 0, expected.expand_as(ours[kind])), kind


@pytest.mark.parametrize("agg_layer", [0, 1, 2])
def test_a_window_longer_than_the_prompt_drops_as_it_masks(loaded, agg_layer):
    """The same checkpoint with a 64-token window (longer than the prompt): drop == mask."""
    model, text = loaded.model, loaded.model.config.text_config
    inputs = _batch(loaded)
    assert inputs["input_ids"].shape[1] < 64
    old = text.sliding_window
    text.sliding_window = 64
    try:
        out, tokens = {}, {}
        with torch.no_grad():
            for mode in ("drop", "mask"):
                with apply_fastv(model, agg_layer=agg_layer, keep=3, mode=mode) as m:
                    out[mode] = m(**inputs).logits[:, -1]
                    tokens[mode] = m.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        text.sliding_window = old
    assert (out["drop"] - out["mask"]).abs().max() <= 1e-4
    assert torch.equal(tokens["drop"], tokens["mask"])


def test_a_loop_whose_prefill_passes_no_cache_drops_as_it_masks(loaded):
    """A user's loop that lets the prefill create its cache (use_cache=True, none passed) and
    decodes with the one it returns: under the hooks that cache is a full one, so the window
    of the local layers is still counted in the prompt's indices (the window cuts the prompt)."""
    model = loaded.model
    inputs = {k: v[1:] for k, v in _batch(loaded).items()}
    out = {}
    with torch.no_grad():
        for mode in ("drop", "mask"):
            with apply_fastv(model, agg_layer=1, keep=3, mode=mode) as m:
                first = m(**inputs, use_cache=True)
                cache, logits, mask = first.past_key_values, [first.logits[:, -1]], inputs["attention_mask"]
                for _ in range(4):
                    mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
                    step = m(input_ids=logits[-1].argmax(-1, keepdim=True), attention_mask=mask,
                             past_key_values=cache, use_cache=True)
                    logits.append(step.logits[:, -1])
            out[mode] = torch.stack(logits)
    assert (out["drop"] - out["mask"]).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    path = registry()["PaliGemmaForConditionalGeneration"].tiny(tmp_path_factory.mktemp("paligemma") / "m", seed=1)
    return load_model(str(path), device="cpu", dtype="float32")


def test_paligemma_without_a_chat_template_gets_its_familys_prompt(paligemma):
    """No chat template: the family's <image>{question}, the image first; the processor adds
    <bos> after the image and ends the prefix with a newline."""
    processor = paligemma.processor
    assert not getattr(processor, "chat_template", None)
    prompt = build_prompt(processor, "what color is the object?")
    assert prompt == "<image>what color is the object?"
    image = Image.fromarray(np.zeros((40, 60, 3), dtype="uint8"))
    ids = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    tok = processor.tokenizer
    assert ids[:16] == [tok.image_token_id] * 16 and ids[16] == tok.bos_token_id
    assert ids[-1] == tok.convert_tokens_to_ids("\n")


@pytest.mark.parametrize("agg_layer", [0, 1, 2])
def test_paligemma_loss_on_a_suffix_drops_as_it_masks(paligemma, agg_layer):
    """The processor's labels (a suffix's ids after the -100 prefix): in drop mode the loss is
    the model's own on the labels at the kept positions, equal to mask mode's."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((40, 60, 3)) * 255).astype("uint8")) for _ in range(2)]
    prompts = [build_prompt(paligemma.processor, q) for q in QUESTIONS]
    inputs = dict(paligemma.processor(text=prompts, images=images, suffix=["red", "a red square"],
                                      return_tensors="pt", padding=True))
    assert (inputs["labels"] != -100).sum() >= 4
    loss = {}
    with torch.no_grad():
        full = paligemma.model(**inputs).loss
        for mode in ("drop", "mask"):
            with apply_fastv(paligemma.model, agg_layer=agg_layer, keep=3, mode=mode) as m:
                loss[mode] = m(**inputs).loss
    assert torch.isfinite(loss["drop"]) and abs(float(loss["drop"] - loss["mask"])) <= 1e-4
    assert abs(float(loss["drop"] - full)) > 1e-4  # it did prune


@pytest.mark.parametrize("arch", ["PaliGemmaForConditionalGeneration", ARCH])
def test_decoding_a_left_padded_batch_after_a_k0_drop_scores_as_mask_mode(arch, tmp_path):
    """A user's decode loop (the 2D mask grown each step, no position ids) on a left-padded batch,
    drop vs mask at K = 0: the model builds its masks and positions above the decoder, and
    they must place the kept prompt + generated tokens where mask mode does."""
    from transformers import DynamicCache

    loaded = load_model(str(registry()[arch].tiny(tmp_path / "m", seed=1)), device="cpu", dtype="float32")
    inputs = _batch(loaded)
    assert (inputs["attention_mask"][:, 0] == 0).any()
    scores = {}
    with torch.no_grad():
        for mode in ("drop", "mask"):
            with apply_fastv(loaded.model, agg_layer=0, keep=3, mode=mode) as m:
                cache = DynamicCache(config=loaded.model.config.get_text_config())
                logits = [m(**inputs, use_cache=True, past_key_values=cache).logits[:, -1]]
                mask = inputs["attention_mask"]
                for _ in range(4):
                    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                    logits.append(m(input_ids=logits[-1].argmax(-1, keepdim=True), attention_mask=mask,
                                    past_key_values=cache, use_cache=True).logits[:, -1])
            scores[mode] = torch.stack(logits)
    assert (scores["drop"] - scores["mask"]).abs().max() <= 1e-4


def test_paligemma_2s_gemma2_decoder_is_refused_in_one_line():
    """PaliGemma 2 is the same HF class with a Gemma2 decoder (sliding window, soft-capped
    attention logits): refused by name rather than pruned with the wrong cache and rows."""
    import transformers

    from fastv_analysis.adapters import get_adapter

    text = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=3,
                                          projection_dim=16, hidden_size=16, vocab_size=64)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    with pytest.raises(ValueError, match="gemma2 text decoder") as err:
        get_adapter(model)
    assert "\n" not in str(err.value)


def test_gemma3_layout_is_the_images_grid_with_pan_and_scan_crops_off_it(loaded):
    """16 tokens: the 4 x 4 grid; 48 (the image + 2 pan-and-scan crops, 48 is no square): the
    grid, then 32 tokens off it; a count that no number of crops gives is refused in one line."""
    from fastv_analysis.adapters import get_adapter
    from fastv_analysis.layout import OFF_GRID

    adapter = get_adapter(loaded.model)
    one, cropped = adapter.token_layouts({}, [16, 48])
    assert (one.rows, one.cols) == (4, 4) and one.cells.tolist() == list(range(16))
    assert (cropped.rows, cropped.cols) == (4, 4)
    assert cropped.cells[:16].tolist() == list(range(16)) and (cropped.cells[16:] == OFF_GRID).all()
    with pytest.raises(ValueError, match="not a multiple of the 16"):
        adapter.token_layouts({}, [20])
