"""Model-specific knowledge, one module per architecture family, chosen by HF class name.

This package is the only code that knows transformers' calling conventions: where the
image tokens are, what a decoder layer / attention module / text decoder is called with
(names, positions, the cache keyword, M-RoPE's 3-row position ids), how to gather those
inputs at kept positions and how to recompute a layer's attention rows. ``pruning``,
``capture`` and ``evaluate`` read and rewrite calls only through an :class:`Adapter`, so a
transformers release that renames a keyword is a fix here. Adding an architecture = one
module here, one entry in ``_BUILDERS`` and its row in the contract test
(``tests/test_adapters.py``). The base class is in :mod:`.base`, the cache conventions in
:mod:`.cache`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from .base import (ATTENTION_IMPLEMENTATIONS, DEPRECATED_CACHE_KWARG, Adapter, AttentionCall, DecoderCall,
                   LayerCall, ModelCall)


def _llava(model: nn.Module) -> Adapter:
    from .llava import build

    return build(model)


def _qwen2_vl(model: nn.Module) -> Adapter:
    from .qwen2_vl import build

    return build(model)


def _internvl(model: nn.Module) -> Adapter:
    from .internvl import build

    return build(model)


_BUILDERS: dict[str, Callable[[nn.Module], Adapter]] = {
    "LlavaForConditionalGeneration": _llava,
    "LlavaNextForConditionalGeneration": _llava,  # same decoder recipe; anyres tiles + newline tokens in the span
    "LlavaOnevisionForConditionalGeneration": _llava,  # as LLaVA-NeXT, Qwen2 decoder
    "Qwen2VLForConditionalGeneration": _qwen2_vl,  # M-RoPE: 3-row position ids, dynamic resolution
    "Qwen2_5_VLForConditionalGeneration": _qwen2_vl,
    "InternVLForConditionalGeneration": _internvl,  # tiles + thumbnail, one placeholder id per token
}

SUPPORTED = tuple(_BUILDERS)

GRID_EXTENT: dict[str, str] = {
    "LlavaForConditionalGeneration": "crop",
    "LlavaNextForConditionalGeneration": "image",
    "LlavaOnevisionForConditionalGeneration": "image",
    "Qwen2VLForConditionalGeneration": "image",
    "Qwen2_5_VLForConditionalGeneration": "image",
    "InternVLForConditionalGeneration": "image",
}
"""What part of the original image the spatial grid of a sample's
:class:`~fastv_analysis.layout.TokenLayout` spans: ``crop``, the processor's center crop
(LLaVA-1.5's CLIP processor resizes the short side and crops the centre;
:mod:`fastv_analysis.grid` places it), or ``image``, the whole image (the anyres unpadded
high-resolution grid, Qwen2-VL's smart_resize of the whole image, InternVL's thumbnail or
single tile). Unknown architectures: ``crop`` (the geometry's fallback)."""

BASE_TILE = frozenset({"LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"})
"""Architectures whose off-grid tokens before the grid are one square base tile: the whole
image resized to one tile (anyres). InternVL's off-grid tiles have no known arrangement."""


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, by its class name; ValueError for unsupported ones."""
    name = type(model).__name__
    if name not in _BUILDERS:
        raise ValueError(f"unsupported model class {name}: supported are {', '.join(SUPPORTED)}")
    return _BUILDERS[name](model)


__all__ = ["ATTENTION_IMPLEMENTATIONS", "DEPRECATED_CACHE_KWARG", "Adapter", "BASE_TILE", "GRID_EXTENT", "AttentionCall", "DecoderCall", "LayerCall", "ModelCall", "SUPPORTED", "get_adapter", "replace"]
