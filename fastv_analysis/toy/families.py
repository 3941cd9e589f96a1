"""Tiny random checkpoints of every supported architecture, for tests and examples.

Each one is transformers' own model class built from its own config classes (2-3
decoder layers, a 1-layer vision tower), with the toy's word-level tokenizer carrying the
family's placeholder and special tokens, the family's own PIL image processor and a chat
template in the family's format. Images of different sizes give different numbers of
image tokens wherever the family does (anyres tiles, dynamic resolution).

The processors of Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision also own a *video* processor
that imports torchvision; the tests' CPU torch build has no working torchvision, so these
processors are built image-only (:func:`image_only`). A GPU user installs torchvision and
gets the full processor; :func:`fastv_analysis.loading.load_model` falls back to the
image-only one when the video processor cannot be imported.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CHAT_TEMPLATE, IMAGE_TOKEN, PATCH_SIZE, TINY_TEXT, TINY_VISION, build_tokenizer, \
    save_checkpoint, save_tiny_llava_next_checkpoint, save_tiny_random_checkpoint

QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")
QWEN_IMAGE_TOKEN = "<|image_pad|>"

# Qwen2-VL's chat format (im_start/im_end turns; an image renders as vision_start, one
# image_pad that the processor expands, vision_end), reduced to what a question needs.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_only(processor_cls: type) -> type:
    """``processor_cls`` without its video processor (images only; no torchvision needed).

    ProcessorMixin reads a processor's parts from its ``__init__`` signature, so a subclass
    whose signature lacks ``video_processor`` is a complete image processor. It keeps the
    class name, so what it saves loads as the real class where torchvision exists.
    """

    import inspect

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        processor_cls.__init__(self, image_processor, tokenizer, None, **kwargs)

    from transformers import ProcessorMixin

    signature = inspect.signature(processor_cls.__init__)  # its settings are saved by this signature
    __init__.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name != "video_processor"])
    # SmolVLM's own apply_chat_template reads its video processor's frame settings; without one
    # the template renders as every other processor's does
    return type(processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": processor_cls.__module__,
                                                           "apply_chat_template": ProcessorMixin.apply_chat_template})


def _randomise(model, seed: int, scale: float = 0.15) -> None:
    """Larger weights than HF's init, so attention is far from uniform (sharper tests)."""
    import torch

    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _text_sizes(tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                **{**TINY_TEXT, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2})


def save_tiny_llava_onevision_checkpoint(out_dir: str | Path, seed: int = 0, image_size: int = 56) -> Path:
    """``LlavaOnevisionForConditionalGeneration``: SigLIP tower (all patches, no CLS), anyres
    tiles of ``image_size`` px with ``image_newline`` tokens, unpadding and the
    ``anyres_max_9`` cap, Qwen2 decoder; LLaVA-1.5's prompt format with the toy tokenizer."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers import Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = build_tokenizer(IMAGE_TOKEN, ("<video>",))
    grid = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    patches = (image_size // PATCH_SIZE) ** 2
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                        image_grid_pinpoints=grid),
        tokenizer=tok, num_image_tokens=patches, vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE)
    text = Qwen2Config(max_position_embeddings=2048, **_text_sizes(tok))
    vision = SiglipVisionConfig(image_size=image_size, patch_size=PATCH_SIZE, **TINY_VISION)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=grid,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


def _save_tiny_qwen(out_dir, seed: int, version: str) -> Path:
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL"}[version]
    tok = build_tokenizer(QWEN_IMAGE_TOKEN, QWEN_TOKENS)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    # 28 px per merged token: 56 x 56 -> 2 x 2 tokens, 196 x 112 -> 7 x 4
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, patch_size=PATCH_SIZE,
                                               merge_size=2, temporal_patch_size=2)
    processor = image_only(getattr(transformers, f"{prefix}Processor"))(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    text = dict(max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                **_text_sizes(tok))
    vision = dict(depth=1, hidden_size=TINY_VISION["hidden_size"], num_heads=2, patch_size=PATCH_SIZE,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"])
    if version == "2":
        vision = dict(depth=1, embed_dim=TINY_VISION["hidden_size"], hidden_size=text["hidden_size"], num_heads=2,
                      patch_size=PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2)
    else:
        vision.update(intermediate_size=TINY_VISION["intermediate_size"], fullatt_block_indexes=[0], window_size=56)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", QWEN_IMAGE_TOKEN), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                                      **ids)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


def save_tiny_qwen2_vl_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """``Qwen2VLForConditionalGeneration``: dynamic resolution (28 px per image token after
    the 2 x 2 merge), M-RoPE (3-D positions, mrope_section [1, 1, 2]), Qwen's chat format."""
    return _save_tiny_qwen(out_dir, seed, "2")


def save_tiny_qwen2_5_vl_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """``Qwen2_5_VLForConditionalGeneration``: as Qwen2-VL with the 2.5 vision tower
    (windowed attention, SwiGLU, RMSNorm)."""
    return _save_tiny_qwen(out_dir, seed, "2.5")


def save_tiny_llava_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """``LlavaForConditionalGeneration`` (LLaVA-1.5: 336 px, 576 image tokens) with 3 decoder
    layers and grouped-query attention, as the other families here."""
    return save_tiny_random_checkpoint(out_dir, seed, text={"num_hidden_layers": 3, "num_attention_heads": 4,
                                                            "num_key_value_heads": 2})


INTERNVL_TOKENS = ("<img>", "</img>", "<video>", "<|im_start|>", "<|im_end|>")
INTERNVL_IMAGE_TOKEN = "<IMG_CONTEXT>"
# InternVL3's chat format (Qwen2 turns; an image renders as one <IMG_CONTEXT> line, which the
# processor expands to <img>, image_seq_length x tiles <IMG_CONTEXT>, </img>).
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")


def save_tiny_internvl_checkpoint(out_dir: str | Path, seed: int = 0, tile: int = 112, max_patches: int = 1) -> Path:
    """``InternVLForConditionalGeneration``: InternViT-style tower (CLS dropped) on ``tile`` px
    tiles, 2 x 2 pixel shuffle (``tile`` / 28 tokens a side: 4 x 4 = 16), MLP projector, Qwen2
    decoder, InternVL3's chat format. ``max_patches=1``: one tile per image whatever its size,
    so every image gives 16 image tokens (the GotOcr2 processor's tiles + thumbnail would give
    16 x (tiles + 1); the adapter lays those out too, see ``adapters/internvl.py``). ``max_patches``
    > 1: dynamic tiling, up to that many tiles + the thumbnail, as the released checkpoints do."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = build_tokenizer(INTERNVL_IMAGE_TOKEN, INTERNVL_TOKENS)
    # InternVLProcessor reads these named tokens off its tokenizer (saved in tokenizer_config.json)
    tok._set_model_specific_special_tokens(dict(
        context_image_token=INTERNVL_IMAGE_TOKEN, start_image_token="<img>", end_image_token="</img>",
        video_token="<video>"))
    tok.chat_template = INTERNVL_CHAT_TEMPLATE
    tokens_per_tile = (tile // PATCH_SIZE // 2) ** 2
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile},
                                               crop_to_patches=max_patches > 1, min_patches=1, max_patches=max_patches)
    processor = image_only(InternVLProcessor)(image_processor=image_processor, tokenizer=tok,
                                              image_seq_length=tokens_per_tile, chat_template=INTERNVL_CHAT_TEMPLATE)
    text = Qwen2Config(max_position_embeddings=2048, **_text_sizes(tok))
    vision = dict(image_size=[tile, tile], patch_size=[PATCH_SIZE, PATCH_SIZE], **TINY_VISION)
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=tok.convert_tokens_to_ids(INTERNVL_IMAGE_TOKEN),
                            image_seq_length=tokens_per_tile, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


def __getattr__(name: str):
    """``TINY_CHECKPOINTS``: architecture -> ``fn(out_dir, seed=0) -> path``, read off the adapter
    registry (each family declares its own tiny checkpoint: ``Family.tiny``)."""
    if name == "TINY_CHECKPOINTS":
        from ..adapters import registry

        return {arch: family.tiny for arch, family in registry().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
