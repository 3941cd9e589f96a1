"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: vision tower + projector + a Llama-family decoder.

All three keep the decoder at ``model.model.language_model`` with ``layers[i].self_attn``
and one placeholder id for every image token (LLaVA-NeXT's and OneVision's
``image_newline`` tokens included). The decoder's own ``apply_rotary_pos_emb`` and
``repeat_kv`` are taken from the module that defines its attention class, so a
Mistral/Qwen2/Vicuna text backbone uses its own RoPE code rather than a copy.
"""

from __future__ import annotations

import inspect

from torch import nn

from . import Adapter
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


def build(model: nn.Module) -> Adapter:
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index  # LLaVA-OneVision's name for it
    return Adapter(image_token_id=image_token_id, vision_tower=model.model.vision_tower,
                   **decoder_fields(model, model.model.language_model))
