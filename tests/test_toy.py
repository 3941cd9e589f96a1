"""The embedded default: toy scene generator, tiny random checkpoint, shipped toy LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastv_analysis.toy import scenes
from fastv_analysis.toy.checkpoint import NUM_IMAGE_TOKENS, save_tiny_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ROOT / "data" / "toy-llava"
TOY_VQA = ROOT / "data" / "toy-vqa" / "questions.jsonl"


def _chat(processor, text):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


def test_same_seed_gives_identical_scene_image_and_questions():
    a_objs, a_qas = scenes.make_sample(123, n_questions=3)
    b_objs, b_qas = scenes.make_sample(123, n_questions=3)
    assert a_objs == b_objs and a_qas == b_qas
    assert scenes.render(a_objs).tobytes() == scenes.render(b_objs).tobytes()
    c_objs, _ = scenes.make_sample(124)
    assert c_objs != a_objs


def test_answers_agree_with_the_scene():
    seen = set()
    for seed in range(80):
        objs, qas = scenes.make_sample(seed, n_questions=3)
        assert len({(o.color, o.shape) for o in objs}) == 1  # one group of identical objects
        for qa in qas:
            seen.add((qa.category, qa.answer))
            words = qa.text.rstrip("?").lower().split()
            if qa.category == "count":
                assert scenes.NUMBERS.index(qa.answer) == len(objs)
            elif qa.category == "exist":
                assert qa.answer == ("yes" if words[3] == objs[0].color else "no")
            else:
                assert qa.category == "color" and qa.answer == objs[0].color
                assert words[-1] == ("object" if len(objs) == 1 else "objects")
    # every answer word of every category occurs (no category is stuck on one answer)
    assert {a for c, a in seen if c == "count"} == {"one", "two", "three", "four"}
    assert {a for c, a in seen if c == "exist"} == {"yes", "no"}
    assert {a for c, a in seen if c == "color"} == set(scenes.COLORS)


def test_objects_are_blocks_of_whole_patches_with_colour_in_every_patch():
    img = np.asarray(scenes.render([scenes.Obj(3, 13, "red", "cross", size=2)])).astype(int)
    ys, xs = np.nonzero((img != scenes.BACKGROUND).any(-1))
    assert (ys.min() // 14, ys.max() // 14, xs.min() // 14, xs.max() // 14) == (3, 4, 13, 14)
    # each patch holds the fill colour and the glyph (fill - GLYPH_SHADE), nothing else
    patch = img[3 * 14 : 4 * 14, 13 * 14 : 14 * 14].reshape(-1, 3)
    fill = np.array(scenes.COLORS["red"])
    assert {tuple(v) for v in patch} == {tuple(fill), tuple(fill - scenes.GLYPH_SHADE)}
    for seed in range(40):
        objs, _ = scenes.make_sample(seed)
        assert scenes.MIN_OBJECTS <= len(objs) <= scenes.MAX_OBJECTS
        assert all(o.size == scenes.OBJECT_SIZE for o in objs)
        cells = [(o.row + i, o.col + j) for o in objs for i in range(o.size) for j in range(o.size)]
        assert len(set(cells)) == len(cells)  # no overlap
        assert max(r for r, _ in cells) < 24
        cols = {c for _, c in cells}
        assert max(cols) < 11 or min(cols) > 12  # all on one side of the empty middle columns


def test_train_split_never_contains_an_eval_scene():
    eval_keys = {scenes.scene_key(o) for _, o, _ in scenes.eval_split()}
    # an excluded key is skipped: feed the eval scene keys of training samples themselves
    first = scenes.train_sample(0)[0]
    assert scenes.train_sample(0, exclude={scenes.scene_key(first)})[0] != first
    for i in range(300):
        assert scenes.scene_key(scenes.train_sample(i, eval_keys)[0]) not in eval_keys
    assert scenes.TRAIN_SEED_BASE + 10**8 < scenes.EVAL_SEED_BASE


def test_shipped_split_is_what_the_generator_writes(tmp_path):
    lines = [json.loads(x) for x in TOY_VQA.read_text().splitlines()]
    assert len(lines) >= 400 and len({x["image"] for x in lines}) >= 200
    assert {x["category"] for x in lines} == set(scenes.CATEGORIES)
    regenerated = scenes.write_eval_split(tmp_path, n_images=5)
    fresh = [json.loads(x) for x in regenerated.read_text().splitlines()]
    assert fresh == lines[: len(fresh)]
    shipped_png = TOY_VQA.parent / lines[0]["image"]
    assert (tmp_path / fresh[0]["image"]).read_bytes() == shipped_png.read_bytes()


def test_training_pixels_equal_the_processor_pixels(tmp_path):
    from transformers import AutoProcessor

    from fastv_analysis.toy.train import pixels

    save_tiny_random_checkpoint(tmp_path / "ck")
    proc = AutoProcessor.from_pretrained(tmp_path / "ck")
    img = scenes.render(scenes.make_sample(7)[0])
    ref = proc.image_processor(images=[img], return_tensors="np")["pixel_values"][0]
    assert np.abs(ref - pixels(img)).max() < 1e-5


def test_tiny_random_checkpoint_round_trips_through_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = save_tiny_random_checkpoint(tmp_path / "tiny", text={"num_hidden_layers": 3})
    proc = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.text_config.num_hidden_layers == 3
    assert type(proc.image_processor).__name__ == "CLIPImageProcessorPil"
    assert sum(p.numel() for p in model.parameters()) < 300_000
    objs, qas = scenes.make_sample(1)
    batch = proc(images=[scenes.render(objs)], text=[_chat(proc, qas[0].text)], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == NUM_IMAGE_TOKENS
    with torch.no_grad():
        logits = model(**batch).logits
        again = LlavaForConditionalGeneration.from_pretrained(out).eval()(**batch).logits
    assert torch.equal(logits, again)
    gen = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert gen.shape[1] <= batch["input_ids"].shape[1] + 2


def test_chat_template_renders_the_llava_1_5_prompt(tmp_path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(save_tiny_random_checkpoint(tmp_path / "ck"))
    assert _chat(proc, "Is there a red cross?") == "USER: <image>\nIs there a red cross? ASSISTANT:"
    ids = proc.tokenizer("USER: <image>\nIs there a red cross? ASSISTANT:")["input_ids"]
    assert proc.tokenizer.unk_token_id not in ids and ids[0] == proc.tokenizer.bos_token_id


@pytest.mark.slow
def test_shipped_toy_llava_loads_offline_and_answers_shipped_questions(monkeypatch):
    """Load path + weights regression: Auto classes offline, 576 image tokens, real answers.

    The bar sits a few questions under the measured accuracy on these 40 (README's toy
    section has the full-split numbers); an untrained model answers ~0%: its greedy token
    is almost never the one answer word.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from fastv_analysis.data import load_questions

    MIN_CORRECT = 36  # of 40 (the shipped model answers all 480 questions of the split)
    files = {p.name for p in TOY_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert sum(p.stat().st_size for p in TOY_MODEL.iterdir()) < 25 * 2**20
    proc = AutoProcessor.from_pretrained(TOY_MODEL)
    model = LlavaForConditionalGeneration.from_pretrained(TOY_MODEL).eval()
    assert model.config.text_config.num_hidden_layers >= 8
    qs = load_questions(TOY_VQA)[:40]
    correct = 0
    for s in range(0, len(qs), 20):
        chunk = qs[s : s + 20]
        batch = proc(images=[Image.open(q.image) for q in chunk], text=[_chat(proc, q.text) for q in chunk],
                     return_tensors="pt", padding=True)
        assert ((batch["input_ids"] == model.config.image_token_id).sum(1) == NUM_IMAGE_TOKENS).all()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        answers = proc.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(a.strip().lower() == q.answer for a, q in zip(answers, chunk))
    assert correct >= MIN_CORRECT
