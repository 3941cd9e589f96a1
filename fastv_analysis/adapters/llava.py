"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: vision tower + projector + a Llama-family decoder.

All three keep the decoder at ``model.model.language_model`` with ``layers[i].self_attn``
and one placeholder id for every image token (LLaVA-NeXT's and OneVision's
``image_newline`` tokens included). The decoder's own ``apply_rotary_pos_emb`` and
``repeat_kv`` are taken from the module that defines its attention class, so a
Mistral/Qwen2/Vicuna text backbone uses its own RoPE code rather than a copy.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .base import Adapter
from .family import Contract, Family, lazy
from .rows import llama_attention_rows


def decoder_fields(model: nn.Module, language_model: nn.Module) -> dict:
    """The Adapter fields every Llama-family text decoder shares."""
    layers = language_model.layers
    text = model.config.get_text_config()
    modeling = inspect.getmodule(type(layers[0].self_attn))
    num_heads = text.num_attention_heads
    return dict(
        architecture=type(model).__name__,
        model=model,
        layers=layers,
        language_model=language_model,
        attention=lambda i: layers[i].self_attn,
        apply_rotary=modeling.apply_rotary_pos_emb,
        repeat_kv=modeling.repeat_kv,
        rows=llama_attention_rows,
        num_layers=text.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        cache_kwarg="cache" if "cache" in inspect.signature(type(layers[0]).forward).parameters else "past_key_values",
    )


class AnyresAdapter(Adapter):
    """LLaVA-NeXT / OneVision: a base tile, then the unpadded high-resolution grid whose rows
    each end with an ``image_newline`` token."""

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"{self.architecture} needs the processor's image_sizes to lay out its tiles")
        return [anyres_layout(self.model, sizes[b], int(n)) for b, n in enumerate(n_image)]


def anyres_layout(model: nn.Module, image_size: torch.Tensor, n_tokens: int):
    """The layout of one anyres image, read off the model's own ``pack_image_features``.

    Feature vectors of ones go in for every tile and a zero vector as the newline, so the
    packed output says which positions are newlines and how long each unpadded row is,
    exactly as this transformers version packs (unpadding, OneVision's anyres_max
    down-sampling included).
    """
    from ..layout import TokenLayout

    config = model.config
    modeling = inspect.getmodule(type(model.model))
    side = config.vision_config.image_size // config.vision_config.patch_size
    grid_h, grid_w = modeling.get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints,
                                                          config.vision_config.image_size)
    features = [torch.ones(1 + grid_h * grid_w, side * side, 1)]
    pack = model.model.pack_image_features
    params = inspect.signature(pack).parameters
    kwargs = {"image_newline": torch.zeros(1)}
    if "vision_feature_select_strategy" in params:
        kwargs["vision_feature_select_strategy"] = config.vision_feature_select_strategy
    if "vision_aspect_ratio" in params:
        kwargs["vision_aspect_ratio"] = config.vision_aspect_ratio
    with torch.no_grad():
        packed, lengths = pack(features, image_size[None].cpu(), **kwargs)
    marks = packed[0][:, 0]
    if marks.shape[0] != n_tokens:
        raise RuntimeError(f"{type(model).__name__}: the packed layout has {marks.shape[0]} tokens, the prompt "
                           f"{n_tokens}; pack_image_features changed under this transformers version")
    body = marks[side * side:]
    rows = int((body == 0).sum())
    cols = body.shape[0] // rows - 1 if rows else 0
    return TokenLayout.anyres(side * side, rows, cols)


def build(model: nn.Module) -> Adapter:
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index  # LLaVA-OneVision's name for it
    cls = AnyresAdapter if hasattr(model.model, "pack_image_features") else Adapter
    clip_cls = type(model).__name__ in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration") and \
        getattr(config, "vision_feature_select_strategy", None) == "default" and \
        getattr(config.vision_config, "model_type", "") == "clip_vision_model"  # CLS dropped before the projector
    return cls(image_token_id=image_token_id, vision_tower=model.model.vision_tower,
               vision_kind="clip_cls" if clip_cls else None, **decoder_fields(model, model.model.language_model))


_TOY = "fastv_analysis.toy.families"
_ANYRES = Contract(sizes=((56, 56), (200, 90)),
                   # 16 base-tile tokens, then rows of the high-res grid each ended by a newline (token = 16 + cell
                   # + row). 4 x 4 grid: rows 1, 3, col 2 -> cells 6, 14 -> tokens 23, 33; 4 x 8 grid: r = 1,
                   # c = 2 -> row 2, cols 2, 6 -> cells 18, 22 -> tokens 36, 40
                   uniform_keep_2=((23, 33), (36, 40)))
FAMILIES = (
    Family("LlavaForConditionalGeneration", build, lazy(_TOY, "save_tiny_llava_checkpoint"),
           # fixed 336 x 336: every image gives 576 tokens. 24 x 24: r = ceil(sqrt(2)) = 2, c = 1 -> rows 6,
           # 18, col 12 -> 6 * 24 + 12, 18 * 24 + 12
           Contract(sizes=None, uniform_keep_2=((156, 444), (156, 444))), grid_extent="crop",
           note="CLIP center crop, 24 x 24 = 576 tokens, one span"),
    Family("LlavaNextForConditionalGeneration", build, lazy(_TOY, "save_tiny_llava_next_checkpoint"), _ANYRES,
           base_tile=True, note="anyres: base tile + unpadded grid, one image_newline token per row (policy flag)"),
    Family("LlavaOnevisionForConditionalGeneration", build, lazy(_TOY, "save_tiny_llava_onevision_checkpoint"),
           _ANYRES, base_tile=True, note="as LLaVA-NeXT, anyres_max_9 down-sampling, Qwen2 decoder"),
)
