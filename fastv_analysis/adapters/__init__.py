"""Model-specific knowledge, one module per architecture family, chosen by HF class name.

This package is the only code that knows transformers' calling conventions: where the
image tokens are, what a decoder layer / attention module / text decoder is called with
(names, positions, the cache keyword, M-RoPE's 3-row position ids), how to gather those
inputs at kept positions and how to recompute a layer's attention rows. ``pruning``,
``capture`` and ``evaluate`` read and rewrite calls only through an :class:`Adapter`, so a
transformers release that renames a keyword is a fix here. Adding an architecture = one
module here that ends with ``FAMILIES`` (its HF classes, adapter builder, tiny checkpoint,
image geometry and contract facts: :class:`.family.Family`) and its name in
:data:`MODULES`; loading, the report and the contract tests read the registry. The
base class is in :mod:`.base`, the cache conventions in :mod:`.cache`.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .base import (ATTENTION_IMPLEMENTATIONS, DEPRECATED_CACHE_KWARG, Adapter, AttentionCall, DecoderCall,
                   LayerCall, ModelCall)
from .family import Contract, Family, registry

MODULES = ("llava", "qwen2_vl", "internvl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "paligemma", "mistral3")
"""The family modules (one per family, each ending with ``FAMILIES``), imported on first use."""


def family(name: str) -> Family:
    """The :class:`Family` of HF class ``name``; ValueError for unsupported ones."""
    found = registry().get(name)
    if found is None:
        raise ValueError(f"unsupported model class {name}: supported are {', '.join(registry())}")
    return found


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, by its class name; ValueError for unsupported ones."""
    return family(type(model).__name__).build(model)


def __getattr__(name: str):
    """``SUPPORTED`` (the HF class names, in registry order), ``GRID_EXTENT`` (name -> ``crop`` /
    ``image``) and ``BASE_TILE`` (names with an anyres base tile), read off the registry."""
    if name == "SUPPORTED":
        return tuple(registry())
    if name == "GRID_EXTENT":
        return {n: f.grid_extent for n, f in registry().items()}
    if name == "BASE_TILE":
        return frozenset(n for n, f in registry().items() if f.base_tile)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ATTENTION_IMPLEMENTATIONS", "DEPRECATED_CACHE_KWARG", "MODULES", "Adapter", "AttentionCall", "Contract",
           "DecoderCall", "Family", "LayerCall", "ModelCall", "family", "get_adapter", "registry", "replace"]
