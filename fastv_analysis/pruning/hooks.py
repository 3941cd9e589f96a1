"""The hook set on one model, installed and removed as one context (:meth:`FastVHooks.installed`):
every handle is removed in ``finally``, so the model is never edited beyond the ``with``. At
most one set is live per model. Each forward is classified on entry (a prefill of a new
prompt, a decode step of the cached one, or neither); the hooks then ask
:mod:`~fastv_analysis.pruning.online` to rank at K-1 and
:mod:`~fastv_analysis.pruning.rewrite` to rewrite the calls from K on."""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from functools import partial, wraps

import torch
from torch import nn

from .config import FastVConfig
from ..vision_probe import NAMES as VISION_NAMES
from ..vision_probe import VisionTap
from .online import Ranker, needed_inputs, needs_embeddings, needs_hidden
from .cut import is_image_token
from .prompt import Prompt, new_prompt
from .rewrite import Memo, rewrite_decoder_input, rewrite_layer

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, FastVHooks]" = weakref.WeakKeyDictionary()
"""model -> its live hook set: two sets of FastV hooks on one model would both fire."""


def _pre_hook(module: nn.Module, fn):
    return module.register_forward_pre_hook(fn, with_kwargs=True)


class _Restore:
    """A handle that removes an instance attribute shadowing the class's method."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


class FastVHooks:
    """FastV's hooks on ``model`` and the state of the running forward.

    config:  the live :class:`FastVConfig` (read when a prompt begins and while ranking).
    prompt:  what the last prefill decided (:class:`~fastv_analysis.pruning.prompt.Prompt`).
    phase:   "prefill" | "decode" | None for the running forward.
    """

    def __init__(self, model: nn.Module, adapter, config: FastVConfig):
        self.model, self.adapter, self.config = model, adapter, config
        self.prompt: Prompt | None = None
        self.phase: str | None = None
        self.positions_given = False  # whether the running forward's caller passed position ids
        self.memo = Memo()
        self.pixels: torch.Tensor | None = None  # what the vision tower last encoded
        self.vision = VisionTap(adapter, self._vision_names)  # the vision-side inputs (VisionZip, VisPruner)
        self.vision_grid: torch.Tensor | None = None  # and the grid it was given (Qwen's grid_thw)
        self.vision_sizes: torch.Tensor | None = None  # and the image sizes of its tiles (LLaVA-NeXT, OneVision)

    @contextmanager
    def installed(self):
        """Install every hook; on exit remove them all and forget the per-prompt state."""
        if _ACTIVE.get(self.model) is not None:
            raise ValueError("this model already has FastV hooks installed; remove() them first "
                             "(switch settings through .fastv instead of stacking wrappers)")
        adapter, handles = self.adapter, []
        _ACTIVE[self.model] = self
        try:
            handles.append(_pre_hook(adapter.model, self.on_model))
            handles.append(adapter.model.register_forward_hook(self.after_model, always_call=True))
            handles.append(_pre_hook(adapter.vision_tower, self.on_vision))
            handles.extend(self.vision.install())
            handles.append(_pre_hook(adapter.language_model, self.on_language_model))
            for i, layer in enumerate(adapter.layers):
                handles.append(_pre_hook(layer, partial(self.on_layer, i)))
                handles.append(adapter.attention(i).register_forward_hook(partial(self.on_attention, i),
                                                                          with_kwargs=True))
            handles.extend(adapter.family_hooks(self))
            handles.extend(self._image_sizes_hook())
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.prompt, self.phase = None, None
            self.memo.clear()
            if _ACTIVE.get(self.model) is self:
                del _ACTIVE[self.model]

    def _image_sizes_hook(self) -> list:
        """Record the ``image_sizes`` the model's ``get_image_features`` is called with. generate
        calls it before the prefill (mm_encoder_outputs) and drops ``image_sizes`` from the
        forward's kwargs, so the tile layouts (LLaVA-NeXT, OneVision) are known only there. A
        method, not a module: wrapped on the instance, the wrapper removed with the hooks."""
        base = getattr(self.adapter.model, "base_model", None)
        method = getattr(base, "get_image_features", None)
        if method is None or "image_sizes" not in inspect.signature(method).parameters:
            return []
        signature = inspect.signature(method)

        @wraps(method)  # the same signature: generate picks the kwargs it passes by it
        def recording(*args, **kwargs):
            self.vision_sizes = signature.bind_partial(*args, **kwargs).arguments.get("image_sizes")
            return method(*args, **kwargs)

        base.get_image_features = recording
        return [_Restore(base, "get_image_features")]

    def sequence_positions(self, layer: int) -> torch.Tensor | None:
        """In a prefill, the original prompt positions ``[B, M]`` of the sequence decoder layer
        ``layer`` runs on (drop mode from K on: the governing cut's kept positions, fillers
        included); None where it runs on the whole prompt, or outside a prefill. For a
        family's own hooks (:meth:`~fastv_analysis.adapters.base.Adapter.family_hooks`)."""
        prompt = self.prompt
        if self.phase != "prefill" or prompt.mode != "drop" or layer < prompt.agg_layer:
            return None
        return prompt.governing(layer).kept_positions

    def ranker(self) -> Ranker:
        return Ranker(self.config, self.adapter, self.pixels, self.vision)

    def _vision_names(self) -> tuple[str, ...]:
        """The vision-side inputs the configured strategy reads, while an image is encoded for a
        prefill: inside its forward, or just before it (generate encodes the image before its
        first forward call, with no forward running). Decode steps encode nothing."""
        if self.phase == "decode":
            return ()
        return tuple(n for n in needed_inputs(self.config) if n in VISION_NAMES)

    def on_model(self, module, args, kwargs):
        """Decide what this forward is: a new prompt (prefill), a decode step, or neither."""
        self.memo.clear()
        self.phase = None
        config, adapter = self.config, self.adapter
        call = adapter.model_call(args, kwargs)
        input_ids, cache = call.input_ids, call.cache
        self.positions_given = call.position_ids is not None
        if self.prompt is not None and self.prompt.owns(cache) and adapter.cache_length(cache) > 0:
            self.phase = "decode"  # continues as its prefill decided, whatever .fastv says now
            return None
        if not config.use_fast_v or input_ids is None or (cache is not None and adapter.cache_length(cache) > 0) or (
                config.image_start is None and not is_image_token(input_ids, adapter.image_token_id).any()):
            self.prompt = None
            return None
        adapter.check_attention_implementation()  # set_attn_implementation may have switched it
        self.prompt = new_prompt(config, adapter, input_ids, call.attention_mask)
        self.prompt.inputs = kwargs
        if kwargs.get("image_grid_thw") is None and self.vision_grid is not None:
            # generate encoded the image before this call (mm_encoder_outputs): the layouts read
            # the grid the vision tower was given
            self.prompt.inputs = {**kwargs, "image_grid_thw": self.vision_grid}
        if kwargs.get("image_sizes") is None and self.vision_sizes is not None:  # likewise the tiles' image sizes
            self.prompt.inputs = {**self.prompt.inputs, "image_sizes": self.vision_sizes}
        if kwargs.get("pixel_values") is None and self.pixels is not None:  # and the pixels (InternVL's tiles)
            self.prompt.inputs = {**self.prompt.inputs, "pixel_values": self.pixels}
        self.vision.image_sizes = self.prompt.inputs.get("image_sizes")  # LLaVA-NeXT's tiles -> tokens
        self.phase = "prefill"
        return None

    def after_model(self, module, args, output):
        """Forget the per-forward state, so direct calls of a submodule are never pruned (and a
        later prompt never ranks by this one's vision tower)."""
        if self.phase == "prefill":
            self.vision.clear()
        self.phase, self.pixels, self.vision_grid, self.vision_sizes = None, None, None, None
        self.memo.clear()

    def on_vision(self, module, args, kwargs):
        """Remember the pixels being encoded: in generate this runs before the prefill."""
        self.pixels = self.adapter.vision_pixels(args, kwargs)
        self.vision_grid = kwargs.get("grid_thw")

    def on_language_model(self, module, args, kwargs):
        """K = 0: choose the kept set once the image is encoded; in drop mode prune the input."""
        prompt = self.prompt
        if self.phase is None:
            return None
        call = self.adapter.decoder_call(args, kwargs)
        if prompt.positions == "compact":
            self._decoder_ids(prompt, call)
        if self.phase == "prefill" and prompt.agg_layer == 0 and prompt.kept_mask is None:
            self.ranker().at_input(prompt, call.inputs_embeds)
        if prompt.agg_layer != 0 or prompt.mode != "drop":
            return None
        new = rewrite_decoder_input(self.adapter, prompt, self.phase, call, self.positions_given)
        return self.adapter.with_decoder_call(args, kwargs, new)

    def _decoder_ids(self, prompt: Prompt, call) -> None:
        """The running forward's decoder position ids, full format (as the model derives them
        when the call has none: from 0 in a prefill, from layer 0's cache length after it)."""
        ids = call.position_ids
        if ids is None:
            embeds = call.inputs_embeds if call.inputs_embeds is not None else call.input_ids
            batch, q_len = embeds.shape[0], embeds.shape[1]
            past = 0 if self.phase == "prefill" else self.adapter.cache_length(call.cache)
            ids = self.adapter.default_position_ids(batch, past + q_len, embeds.device)[..., past:]
        if self.phase == "prefill":
            prompt.mrope = ids.dim() == 3
        prompt.decoder_ids = ids

    def on_layer(self, layer: int, module, args, kwargs):
        """Decoder layer ``layer``'s call: keep the residual stream at K-1 when the strategy
        reads it; from K on, rewrite the call under the prompt's cut."""
        prompt = self.prompt
        deciding = self.phase == "prefill" and prompt.kept_mask is None
        if deciding and layer == prompt.agg_layer - 1 and needs_hidden(self.config):
            prompt.hidden_in = self.adapter.layer_call(args, kwargs).hidden_states
        if deciding and layer == 0 and needs_embeddings(self.config):
            prompt.embeds_in = self.adapter.layer_call(args, kwargs).hidden_states
        if self.phase is None or layer < prompt.agg_layer:
            return None
        call = self.adapter.layer_call(args, kwargs)
        if deciding and layer == prompt.agg_layer and prompt.pending is not None:
            self.ranker().finish_cut(prompt, call.hidden_states)
        if self.phase == "prefill" and prompt.cache is None and call.cache is not None:
            prompt.cache = weakref.ref(call.cache)
        new = rewrite_layer(self.adapter, prompt, self.phase, layer, call, self.memo)
        return None if new is None else self.adapter.with_layer_call(args, kwargs, new)

    def on_attention(self, layer: int, module, args, kwargs, output):
        """Layer ``layer``'s attention in a prefill: rank there if it is a cut's K-1."""
        if self.phase == "prefill":
            self.ranker().on_attention(self.prompt, layer, module, args, kwargs)
        return None
