"""The KV cache and cached calls, as transformers spells them (``DynamicCache``,
``use_cache``, ``logits_to_keep``, per-layer ``batch_repeat_interleave``): mixed into
:class:`~fastv_analysis.adapters.base.Adapter`, so pruning's decode paths never name them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class CacheCalls:
    """Building, measuring and repeating the text decoder's KV cache, and one cached step.
    Needs ``self.model`` and ``self.cache_kwarg`` (the adapter's)."""

    def new_cache(self) -> Any:
        """An empty KV cache for the text decoder (transformers' ``DynamicCache``)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config())

    def cache_length(self, cache: Any, layer: int = 0) -> int:
        """Tokens ``cache`` holds at ``layer`` (what the next call appends after)."""
        return cache.get_seq_length(layer)

    def repeat_cache(self, cache: Any, layers: Iterable[int], repeats: int) -> None:
        """Repeat the batch-1 entries of ``layers`` to batch ``repeats``, in place."""
        for i in layers:
            cache.layers[i].batch_repeat_interleave(repeats)

    def next_token_logits(self, model: Callable, cache: Any, **inputs) -> torch.Tensor:
        """``[B, V]`` logits of the token after ``inputs``: ``model`` (the model or a wrapper
        of it) called with ``cache`` under :attr:`cache_kwarg`, appending to it, the language
        model head on the last position only."""
        out = model(**inputs, use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache})
        return out.logits[:, -1, :]
