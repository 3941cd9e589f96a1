"""The :class:`Adapter` every family builds on: what transformers' modules are called
with (:class:`ModelCall`, :class:`AttentionCall`, :class:`LayerCall`, :class:`DecoderCall`),
how to read and rewrite those calls, positions and the attention-implementation check.
A family module (``llava``, ``qwen2_vl``, ``internvl``) subclasses or configures it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..positions import take_positions
from .cache import CacheCalls
from .readouts import Readouts


@dataclass(frozen=True)
class ModelCall:
    """What the top-level model was called with (None where absent)."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cache: Any
    position_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionCall:
    """An attention module's inputs: layernormed hidden states, RoPE ``(cos, sin)``, 4D mask."""

    hidden_states: torch.Tensor
    position_embeddings: tuple | None
    attention_mask: torch.Tensor | None


@dataclass(frozen=True)
class LayerCall:
    """A decoder layer's inputs (residual stream, 4D mask, RoPE, text position ids, cache)."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    position_embeddings: tuple | None
    position_ids: torch.Tensor | None
    cache: Any


@dataclass(frozen=True)
class DecoderCall:
    """The text decoder's inputs: embeddings, 2D mask, position ids (M-RoPE: 3 or 4 rows)."""

    inputs_embeds: torch.Tensor | None
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    cache: Any


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
"""The text decoder's attention implementations the hooks support: both hand every layer a 4D
mask (or None for plain causal), which the hooks gather along query and key dims.
flash_attention_2 takes a 2D padding mask and flex_attention a BlockMask instead."""

DEPRECATED_CACHE_KWARG = "past_key_values"
"""transformers 5.24 renamed it to ``cache`` and still accepts it (deprecated until 5.40)."""


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def check_kernels(model: nn.Module, architecture: str) -> None:
    """One-line ValueError for a model kernelized with hub kernels on a device where they
    replace layers (transformers 5.25 loads with ``use_kernels=True`` by default;
    :func:`~fastv_analysis.loading.load_model` passes False). ``kernelize`` swaps RMSNorm /
    rotary / activation forwards for hub kernels on CUDA, ROCm and XPU (and again on
    ``.eval()`` after a move), so the attention the model runs is no longer the Python
    ``apply_rotary_pos_emb`` the row recompute uses: the hooks are checked on the PyTorch
    forwards only. On the CPU the kernel mapping has no entry, so every layer keeps
    transformers' own forward (checked on 5.25 + kernels 0.19.1) and such a model is
    accepted as it is."""
    if getattr(model, "use_kernels", False) and _device_type(model) != "cpu":
        raise ValueError(f"{architecture}: the model was loaded with hub kernels (use_kernels=True, transformers "
                         "5.25's default); FastV's hooks and attention rows are checked on the PyTorch layers "
                         "only: load it with use_kernels=False or call model.reset_kernels()")


@dataclass(frozen=True)
class Adapter(CacheCalls, Readouts):
    """One loaded model as the hooks see it (no state of its own).

    layers:          the decoder layers, in order (hooks go on these).
    language_model:  the text decoder that owns ``layers`` (takes inputs_embeds).
    attention:       ``attention(i)`` -> layer i's self-attention module.
    apply_rotary:    the model's own ``apply_rotary_pos_emb(q, k, cos, sin)``.
    repeat_kv:       the model's own ``repeat_kv(x, n_rep)`` (grouped-query attention).
    rows:            ``rows(adapter, module, call, query_positions)`` -> ``[B, H, Q, S]``
                     float32 softmax rows recomputed from one attention call.
    image_token_id:  the placeholder id of image tokens in ``input_ids``.
    vision_tower:    the module whose first input is the pixel values (the random
                     control keys each sample by them; generate encodes images before
                     the first forward, so the top-level call may never see them).
    cache_kwarg:     the keyword the model and its layers take the KV cache under
                     (``past_key_values`` up to transformers 5.23, ``cache`` from 5.24).
    vision_kind:     which hooks of :mod:`.vision` read the tower (``clip_cls``, ``qwen_merge``, None).

    The methods below are transformers' calling conventions as of 5.23 / 5.24 for the
    Llama-family decoders; a family with other conventions overrides them.
    """

    architecture: str
    model: nn.Module
    layers: nn.ModuleList
    language_model: nn.Module
    attention: Callable[[int], nn.Module]
    apply_rotary: Callable
    repeat_kv: Callable
    rows: Callable
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    image_token_id: int
    vision_tower: nn.Module
    cache_kwarg: str = "past_key_values"
    vision_kind: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- reading calls -----------------------------------------------------------------------

    def missing(self, what: str, where: str) -> RuntimeError:
        """The error for an input the adapter expected and did not get: never prune silently."""
        return RuntimeError(f"{self.architecture}: {where} was called without {what} under transformers "
                            f"{_transformers_version()}; the {type(self).__name__} knows transformers 5.23-5.24's "
                            "calling conventions (see fastv_analysis/adapters)")

    def cache_of(self, kwargs: dict) -> Any:
        """The KV cache of a call: under ``cache_kwarg``, or under the deprecated
        ``past_key_values`` that 5.24 still renames (the new name wins when both are given,
        as transformers' ``deprecate_kwarg`` does)."""
        cache = kwargs.get(self.cache_kwarg)
        if cache is None and self.cache_kwarg != DEPRECATED_CACHE_KWARG:
            cache = kwargs.get(DEPRECATED_CACHE_KWARG)
        return cache

    def attention_implementation(self) -> str:
        """The text decoder's attention implementation (None, as transformers does, is eager)."""
        return getattr(self.language_model.config, "_attn_implementation", None) or "eager"

    @property
    def attention_kernel(self) -> str | None:
        """The attention implementation the model's top-level config records (None when unset):
        what eval's numerics key names, so answers of another kernel are not reused."""
        return getattr(self.model.config, "_attn_implementation", None)

    @property
    def max_positions(self) -> int:
        """The longest sequence (prompt + answer) the text decoder takes; 2**30 where its
        config names no ``max_position_embeddings``."""
        config = self.model.config
        return int(getattr(getattr(config, "text_config", config), "max_position_embeddings", 1 << 30))

    def check_attention_implementation(self) -> None:
        """One-line ValueError unless the text decoder runs a supported implementation (and no
        hub kernels: :func:`check_kernels`)."""
        check_kernels(self.model, self.architecture)
        impl = self.attention_implementation()
        if impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"{self.architecture}: the text decoder runs attn_implementation={impl!r}; FastV's hooks "
                             f"support {' or '.join(ATTENTION_IMPLEMENTATIONS)} only (load the model with "
                             "attn_implementation=\"sdpa\" or call model.set_attn_implementation(\"sdpa\"))")

    def model_call(self, args: tuple, kwargs: dict) -> ModelCall:
        return ModelCall(input_ids=kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None),
                         attention_mask=kwargs.get("attention_mask"), cache=self.cache_of(kwargs),
                         position_ids=kwargs.get("position_ids"))

    def vision_pixels(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))

    def attention_call(self, args: tuple, kwargs: dict) -> AttentionCall:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1:
            position_embeddings = args[1]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 2:
            mask = args[2]
        if position_embeddings is None:
            raise self.missing("position_embeddings", "an attention module")
        return AttentionCall(hidden, position_embeddings, mask)

    def layer_call(self, args: tuple, kwargs: dict) -> LayerCall:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        if hidden is None:
            raise self.missing("hidden_states", "a decoder layer")
        return LayerCall(hidden, kwargs.get("attention_mask"), kwargs.get("position_embeddings"),
                         kwargs.get("position_ids"), self.cache_of(kwargs))

    def decoder_call(self, args: tuple, kwargs: dict) -> DecoderCall:
        return DecoderCall(kwargs.get("inputs_embeds"), kwargs.get("input_ids"), kwargs.get("attention_mask"),
                           kwargs.get("position_ids"), self.cache_of(kwargs))

    # -- rewriting calls ---------------------------------------------------------------------

    def with_layer_call(self, args: tuple, kwargs: dict, call: LayerCall) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of a decoder-layer call carrying ``call``'s values."""
        new = dict(kwargs)
        if "hidden_states" in kwargs or not args:
            new["hidden_states"] = call.hidden_states
        else:
            args = (call.hidden_states, *args[1:])
        new["attention_mask"] = call.attention_mask
        if call.position_embeddings is not None:
            new["position_embeddings"] = call.position_embeddings
        if call.position_ids is not None:
            new["position_ids"] = call.position_ids
        return args, new

    def with_decoder_call(self, args: tuple, kwargs: dict, call: DecoderCall) -> tuple[tuple, dict]:
        new = dict(kwargs)
        for name in ("inputs_embeds", "attention_mask", "position_ids"):
            value = getattr(call, name)
            if value is not None:
                new[name] = value
        return args, new

    # -- positions ---------------------------------------------------------------------------

    def gather_rope(self, position_embeddings: tuple, positions: torch.Tensor) -> tuple:
        """RoPE ``(cos, sin)`` ``[B, S, D]`` at ``positions`` ``[B, M]``."""
        return tuple(take_positions(t, positions, dim=1) for t in position_embeddings)

    def gather_position_ids(self, position_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Position ids ``[B, S]`` (or ``[R, B, S]``: M-RoPE's rows) at ``positions`` ``[B, M]``."""
        if position_ids.dim() == 3:
            return take_positions(position_ids.transpose(0, 1), positions, dim=2).transpose(0, 1)
        return take_positions(position_ids, positions, dim=1)

    def default_position_ids(self, batch: int, seq_len: int, device) -> torch.Tensor:
        """The ids a text decoder derives when given none (prefill from 0)."""
        return torch.arange(seq_len, device=device).expand(batch, -1)

    def step_position_ids(self, start: int, q_len: int, batch: int, attention_mask: torch.Tensor | None,
                          device) -> torch.Tensor:
        """The ids the model derives for ``q_len`` new tokens called without position ids, had
        its cache the unpruned prompt's length: ``start`` = prompt + tokens generated so far
        (decoding after a K = 0 prefill, whose cache holds only the kept tokens). A Llama
        decoder counts from the cache length and ignores the mask."""
        return torch.arange(start, start + q_len, device=device).unsqueeze(0)

    def prompt_positions(self, inputs: dict, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Explicit position ids of one prompt for :func:`~fastv_analysis.pruning.prefill_shared`,
        and the state :meth:`decode_positions` needs (here none): what ``generate`` passes."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0), None

    def decode_positions(self, attention_mask: torch.Tensor, state: Any) -> torch.Tensor:
        """Position ids ``[C, 1]`` of the next token of every row of a shared decode."""
        return attention_mask.long().sum(dim=1, keepdim=True) - 1

    def attention_rows(self, module: nn.Module, call: AttentionCall, query_positions: torch.Tensor,
                       rope: bool = True) -> torch.Tensor:
        return self.rows(self, module, call, query_positions, rope=rope)

    def family_hooks(self, fastv) -> list:
        """Handles of hooks a family adds beside FastV's own, installed and removed with them:
        for inputs the text decoder threads past its layers (Qwen3-VL's DeepStack). ``fastv``
        tells the running phase (``fastv.phase``) and, per layer, which prompt positions the
        layer runs on (``fastv.sequence_positions(layer)``). None here."""
        return []

    def layout_inputs(self, processor, images: list) -> dict:
        """What :meth:`token_layouts` needs beside the processor's output, from the ``processor``
        and the PIL ``images`` (capture has both; InternVL's exact tile grids). None here."""
        return {}

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        """One :class:`~fastv_analysis.layout.TokenLayout` per batch element, from the model's
        inputs (the processor's output): here one square grid (LLaVA-1.5's 24 x 24)."""
        from ..layout import TokenLayout

        return [TokenLayout.for_tokens(int(n)) for n in n_image]
