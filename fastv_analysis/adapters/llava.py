"""LLaVA (LlavaForConditionalGeneration): vision tower + projector + a Llama-family decoder.

The decoder's own ``apply_rotary_pos_emb`` and ``repeat_kv`` are taken from the module
that defines its attention class, so a Mistral/Qwen2/Vicuna text backbone uses its own
RoPE code rather than a copy.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..attention import llama_attention_rows
from . import Adapter


def build(model: nn.Module) -> Adapter:
    language_model = model.model.language_model
    layers = language_model.layers
    text = model.config.text_config
    modeling = inspect.getmodule(type(layers[0].self_attn))
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return Adapter(
        architecture=type(model).__name__,
        model=model,
        layers=layers,
        language_model=language_model,
        attention=lambda i: layers[i].self_attn,
        apply_rotary=modeling.apply_rotary_pos_emb,
        repeat_kv=modeling.repeat_kv,
        attention_rows=llama_attention_rows,
        num_layers=text.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        image_token_id=model.config.image_token_id,
        vision_tower=model.model.vision_tower,
        cache_kwarg="cache" if "cache" in inspect.signature(type(layers[0]).forward).parameters else "past_key_values",
    )
