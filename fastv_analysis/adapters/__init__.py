"""Model-specific knowledge, one module per architecture, chosen by HF class name.

Everything else in fastv_analysis talks to a model only through an :class:`Adapter`:
the decoder layers, their attention modules, the text config numbers and the image
token id. Adding LLaVA-NeXT or Qwen2-VL means adding one module here and one entry in
``_BUILDERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """What the hooks need to know about one loaded model (no state of its own).

    layers:          the decoder layers, in order (hooks go on these).
    language_model:  the text decoder that owns ``layers`` (takes inputs_embeds).
    attention:       ``attention(i)`` -> layer i's self-attention module.
    apply_rotary:    the model's own ``apply_rotary_pos_emb(q, k, cos, sin)``.
    repeat_kv:       the model's own ``repeat_kv(x, n_rep)`` (grouped-query attention).
    attention_rows:  ``attention_rows(adapter, module, hidden_states, position_embeddings,
                     attention_mask, query_positions)`` -> ``[B, H, Q, S]`` float32
                     softmax rows, recomputed from one attention module's inputs.
    image_token_id:  the placeholder id of image tokens in ``input_ids``.
    vision_tower:    the module whose first input is the pixel values (the random
                     control keys each sample by them; generate encodes images before
                     the first forward, so the top-level call may never see them).
    cache_kwarg:     the keyword the model and its layers take the KV cache under
                     (``past_key_values`` up to transformers 5.23, ``cache`` from 5.24).
    """

    architecture: str
    model: nn.Module
    layers: nn.ModuleList
    language_model: nn.Module
    attention: Callable[[int], nn.Module]
    apply_rotary: Callable
    repeat_kv: Callable
    attention_rows: Callable
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    image_token_id: int
    vision_tower: nn.Module
    cache_kwarg: str = "past_key_values"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _llava(model: nn.Module) -> Adapter:
    from .llava import build

    return build(model)


_BUILDERS: dict[str, Callable[[nn.Module], Adapter]] = {
    "LlavaForConditionalGeneration": _llava,
    "LlavaNextForConditionalGeneration": _llava,  # same decoder recipe; anyres tiles + newline tokens in the span
}

SUPPORTED = tuple(_BUILDERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, by its class name; ValueError for unsupported ones."""
    name = type(model).__name__
    if name not in _BUILDERS:
        raise ValueError(f"unsupported model class {name}: supported are {', '.join(SUPPORTED)}")
    return _BUILDERS[name](model)


__all__ = ["Adapter", "SUPPORTED", "get_adapter"]
