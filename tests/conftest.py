"""Shared pytest fixtures.

Model-side fixtures (tiny random LLaVA, prompt builder) are in the block below; other
stages add their own blocks.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------
# Tiny random LLaVA (model-side core: attention.py, pruning/)
# ----------------------------------------------------------------------------------------

TINY_VOCAB = 96
TINY_IMAGE_TOKEN_ID = 95
TINY_PAD_TOKEN_ID = 0


def make_tiny_llava(
    num_kv_heads: int = 4,
    layers: int = 4,
    heads: int = 4,
    hidden: int = 32,
    image_size: int = 56,
    patch_size: int = 14,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    init_std: float = 0.15,
):
    """A LlavaForConditionalGeneration small enough for CPU tests, float32, eval mode.

    image_size / patch_size = 4 gives (4 x 4) = 16 image tokens per image. Weights are
    drawn with a larger std than HF's default 0.02 so attention is far from uniform and
    the equivalence tests actually discriminate.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        pad_token_id=TINY_PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=TINY_IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "norm" in name:
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * init_std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = TINY_PAD_TOKEN_ID
    return model.eval()


def n_image_tokens(model) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def make_llava_inputs(
    model,
    before: list[int] | int = 3,
    after: list[int] | int = 4,
    left_pad: list[int] | int = 0,
    batch: int | None = None,
    seed: int = 0,
) -> dict:
    """input_ids / attention_mask / pixel_values with one image span per element.

    ``before``/``after``: text tokens before/after the image span, per element (lists)
    or shared (ints). Shorter prompts are left-padded to the longest, plus ``left_pad``
    extra pad tokens per element.
    """
    sizes = [len(x) for x in (before, after, left_pad) if isinstance(x, list)]
    batch = batch or (sizes[0] if sizes else 1)
    before = before if isinstance(before, list) else [before] * batch
    after = after if isinstance(after, list) else [after] * batch
    left_pad = left_pad if isinstance(left_pad, list) else [left_pad] * batch
    n_image = n_image_tokens(model)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for b, a in zip(before, after):
        text = torch.randint(3, TINY_IMAGE_TOKEN_ID, (b + a,), generator=generator).tolist()
        rows.append(text[:b] + [TINY_IMAGE_TOKEN_ID] * n_image + text[b:])
    length = max(len(r) + p for r, p in zip(rows, left_pad))
    input_ids = torch.full((batch, length), TINY_PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    vision = model.config.vision_config
    pixel_values = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def unpadded(inputs: dict, i: int) -> dict:
    """Element i of a left-padded batch, with its padding removed (batch of 1)."""
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
        "pixel_values": inputs["pixel_values"][i : i + 1],
    }


def hook_snapshot(model) -> dict:
    """Every hook on every submodule, by id: equal snapshots = no hook left behind.

    (transformers installs its own output-capturing hooks on the first forward, so
    compare snapshots taken after a warm-up forward rather than testing for none.)
    """
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return {name: tuple(tuple(getattr(module, k).keys()) for k in kinds) for name, module in model.named_modules()}


@pytest.fixture
def tiny_llava():
    """Factory fixture: ``tiny_llava(num_kv_heads=2, layers=4, ...)`` -> fresh model."""
    return make_tiny_llava


@pytest.fixture
def llava_inputs():
    """Factory fixture: ``llava_inputs(model, before=3, after=4, left_pad=0, batch=None)``."""
    return make_llava_inputs


# ----------------------------------------------------------------------------------------
# Stages (capture, select, eval): tiny random checkpoints saved like real ones, question files
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from fastv_analysis.toy.checkpoint import save_tiny_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {
        "mha": save_tiny_random_checkpoint(root / "mha", seed=1, text={"num_hidden_layers": 3}),
        "gqa": save_tiny_random_checkpoint(root / "gqa", seed=2, text={"num_hidden_layers": 3, "num_attention_heads": 4,
                                                                       "num_key_value_heads": 2}),
    }


def write_questions(folder, n=5, broken=None):
    """A question file with n samples and random-pixel PNGs; ``broken`` tweaks the lines."""
    from fastv_analysis.testing import write_random_questions

    return write_random_questions(folder, n, broken=broken)


def assert_one_pair_per_sample(pred, acc) -> int:
    """Every McNemar p of ``acc`` (accuracy.parquet) equals scipy's exact binomial test on
    one (configuration, reference) pair per sample of ``pred`` (predictions.parquet),
    references joined by configuration id: ``full`` at the layer, the plain
    ``avg_all_heads`` and ``random`` at the layer and keep. Returns how many p were checked."""
    import polars as pl
    from scipy.stats import binomtest

    checked = 0
    for row in acc.iter_rows(named=True):
        mine = pred.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("config") == row["config"],
                           pl.col("keep").eq_missing(row["keep"]))
        assert mine["sample_id"].n_unique() == mine.height == row["n"]
        ratio = row.get("ratio")
        for ref, col in (("full", "vs_full"), ("avg_all_heads", "vs_avg"), ("random", "vs_random")):
            if ref != "full" and ratio is not None:
                ref = f"{ref} ratio {ratio:g}"
            other = pred.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("config") == ref)
            if ref != "full":
                other = other.filter(pl.col("keep").eq_missing(row["keep"]))
            if row["config"] in (ref, "full") or other.height == 0:
                assert row[f"mcnemar_p_{col}"] is None
                continue
            assert other["sample_id"].n_unique() == other.height  # one reference row per sample
            pairs = mine.join(other.select("sample_id", pl.col("correct").alias("ref")), on="sample_id")
            a, b = pairs["correct"].to_numpy(), pairs["ref"].to_numpy()
            only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
            expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
            assert row[f"mcnemar_p_{col}"] == pytest.approx(expected, rel=1e-12), (row["config"], ref)
            checked += 1
    return checked


def assert_same_tables(eval_a, eval_b) -> list[str]:
    """Every parquet table and answers file of two eval folders is identical but for
    measured times (:func:`fastv_analysis.compare.table_differences`). Returns the tables."""
    from fastv_analysis.compare import table_differences, table_names

    assert table_differences(eval_a, eval_b, stages=("",)) == []
    return sorted(table_names(eval_a))


def write_sized_questions(folder, sizes, name="questions.jsonl"):
    """A question file whose images (random pixels, seeded by position) have the given
    ``(width, height)`` sizes: one "what color?" question per image, its path returned."""
    import json

    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    lines = []
    for i, (w, h) in enumerate(sizes):
        pixels = (np.random.default_rng(i).random((h, w, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"images/{i}.png", "text": "<image>\nwhat color?",
                                 "answer": "red", "category": "color"}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


REPLAY_SIZES = ((56, 56), (196, 112), (120, 80))
REPLAY_TEXTS = ("what color is it?", "is there a cat in the picture?", "how many?")


def write_replay_questions(folder, texts=REPLAY_TEXTS, sizes=REPLAY_SIZES, name="q.jsonl"):
    """The replay tests' question file: images of three sizes (so three N), random pixels from
    one stream seeded 3, the i-th asking ``texts[i]``; its path returned."""
    import json

    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"images/{i}.png", "text": texts[i],
                                 "answer": "red"}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def replay_run(root, arch, agg_layers, store, select_args, texts=REPLAY_TEXTS):
    """The replay tests' run: a tiny ``arch`` checkpoint (seed 2), :func:`write_replay_questions`,
    ``capture --agg-layers agg_layers --store store``, then ``select`` with ``select_args``;
    returns ``(model path, run path)``."""
    from fastv_analysis.adapters import registry
    from fastv_analysis.cli.main import main

    model = registry()[arch].tiny(root / "m", seed=2)
    data = write_replay_questions(root / "d", texts=texts)
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data), "--out", str(run), "--agg-layers",
                 agg_layers, "--max-new-tokens", "1", "--quiet", "--store", store]) == 0
    assert main(["select", str(run), *select_args, "--quiet"]) == 0
    return model, run
