"""Gemma3 (``Gemma3ForConditionalGeneration``): SigLIP tower, average-pooled projector and a
Gemma3 decoder at ``model.model.language_model``, read from transformers'
``modeling_gemma3.py`` (5.23-5.25). What matters for pruning:

* **masks built above the decoder**: ``Gemma3Model`` hands the text decoder a dict of two
  prepared 4D masks, ``full_attention`` and ``sliding_attention``, and each layer gets its
  type's. The image tokens of one image attend to each other **bidirectionally**
  (``token_type_ids``: causal OR same-image block), and the local layers AND a sliding
  window on top. From K on each layer's mask is gathered at the kept positions as
  everywhere, so a kept image token still sees the kept tokens of its own block both ways
  and the window stays counted in the original prompt's indices; at K = 0 the prepared
  masks themselves are gathered (:mod:`~fastv_analysis.pruning.rewrite`).
* **sliding-window layers** (5 local : 1 global): the KV cache of a local layer keeps only
  its last ``sliding_window - 1`` entries and transformers sizes its decode mask by how
  many tokens that layer has seen, so after a drop its entries no longer sit at the
  prompt's indices (and mask mode's key set spans the whole prompt). Under FastV's hooks
  the adapter swaps the local layers' cache for a full one before a pruned prefill (the
  window lives on in the masks, which count original indices): in drop mode every layer's
  cache then holds the kept prompt positions + the generated tokens, and the decode masks
  built on an unpruned layer (K > 0) are gathered at those keys; after a
  K = 0 drop no layer is unpruned, so each decode step's two masks are built here from the
  keys' original indices (:func:`decode_masks`).
* **q/k norm**: attention rows are recomputed through the layer's own ``q_norm`` /
  ``k_norm`` (:func:`~fastv_analysis.adapters.qwen3_vl.qk_norm_rows`); the scale is
  ``query_pre_attn_scalar ** -0.5``.
* every image gives ``mm_tokens_per_image`` tokens (one square grid), framed by
  ``<start_of_image>`` / ``<end_of_image>``.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .base import Adapter
from .family import Contract, Family
from .llava import decoder_fields
from .qwen3_vl import qk_norm_rows


def _full_cache(fastv, module, args, kwargs):
    """Model pre-hook: before a pruned prefill, the local layers' sliding caches become full ones
    (a call that caches without passing a cache gets a full one, not the decoder's own)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if fastv.phase != "prefill":
        return None
    adapter = fastv.adapter
    cache = adapter.cache_of(kwargs)
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if not (adapter.model.config.get_text_config().use_cache if use_cache is None else use_cache):
            return None
        return args, {**kwargs, adapter.cache_kwarg: DynamicCache()}
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            if getattr(layer, "is_initialized", layer.keys is not None):
                raise adapter.missing("an empty cache", "a pruned prefill")
            cache.layers[i] = DynamicLayer()
    return None


def decode_masks(mask2d: torch.Tensor, kept: torch.Tensor, prompt_len: int, q_len: int, window: int,
                 dtype: torch.dtype) -> dict:
    """The ``full_attention`` / ``sliding_attention`` additive masks ``[B, 1, q, kv]`` of a decode
    step after a K = 0 drop: keys are the kept prompt positions + the generated tokens
    (``mask2d`` ``[B, kv]`` in those keys' order, fillers 0), queries the last ``q_len`` of
    them; causal and the window counted in the original prompt's indices."""
    from ..pruning.cut import decode_key_positions

    keys = decode_key_positions(kept, prompt_len, prompt_len + mask2d.shape[1] - kept.shape[1])
    queries = keys[:, -q_len:]
    causal = (keys[:, None, :] <= queries[:, :, None]) & mask2d.bool()[:, None, :]
    local = causal & (keys[:, None, :] > queries[:, :, None] - window)
    lowest = torch.finfo(dtype).min

    def additive(allowed):
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, lowest)[:, None]

    return {"full_attention": additive(causal), "sliding_attention": additive(local)}


def _decode_call(fastv, module, args, kwargs):
    """``Gemma3Model`` pre-hook: in a decode step after a K = 0 drop, hand it the two masks in
    original indices (it then builds none) and the unpruned positions; the text decoder's
    own K = 0 rewrite passes such a prepared call through."""
    from ..pruning.rewrite import rewrite_decoder_input

    prompt, adapter = fastv.prompt, fastv.adapter
    if fastv.phase != "decode" or prompt.agg_layer != 0 or prompt.mode != "drop":
        return None
    call = adapter.decoder_call(args, kwargs)
    if call.input_ids is None and call.inputs_embeds is None:
        raise adapter.missing("input_ids or inputs_embeds", "the model while decoding")
    new = rewrite_decoder_input(adapter, prompt, "decode", call, fastv.positions_given)
    tokens = call.input_ids if call.input_ids is not None else call.inputs_embeds
    batch, q_len = tokens.shape[0], tokens.shape[1]
    mask2d = new.attention_mask
    if mask2d is None:  # no padding, no fillers: every cached key and the new ones
        mask2d = torch.ones(batch, adapter.cache_length(call.cache) + q_len, dtype=torch.long, device=tokens.device)
    window = adapter.language_model.config.sliding_window
    masks = decode_masks(mask2d, prompt.kept_positions, prompt.seq_len, q_len, window, adapter.dtype)
    kwargs = {**kwargs, "attention_mask": masks}
    if new.position_ids is not None:
        kwargs["position_ids"] = new.position_ids
    return args, kwargs


class Gemma3Adapter(Adapter):
    """Gemma3: masks prepared above the decoder, full caches for the local layers under the hooks."""

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        """The image's own square grid (``mm_tokens_per_image`` tokens, first in the prompt);
        pan-and-scan crops after it, when the processor makes them, are off the grid."""
        import numpy as np

        from ..layout import OFF_GRID, TokenLayout

        per_image = int(self.model.config.mm_tokens_per_image)
        side = math.isqrt(per_image)
        out = []
        for n in map(int, n_image):
            if n < per_image or n % per_image:
                raise ValueError(f"{self.architecture}: {n} image tokens in a prompt, not a multiple of the "
                                 f"{per_image} every image and crop gives")
            cells = np.concatenate([np.arange(per_image), np.full(n - per_image, OFF_GRID)]).astype(np.int64)
            out.append(TokenLayout(side, side, cells))
        return out

    def family_hooks(self, fastv) -> list:
        return [self.model.register_forward_pre_hook(partial(_full_cache, fastv), with_kwargs=True),
                self.model.model.register_forward_pre_hook(partial(_decode_call, fastv), with_kwargs=True)]


def build(model: nn.Module) -> Adapter:
    fields = decoder_fields(model, model.model.language_model)
    return Gemma3Adapter(image_token_id=model.config.image_token_id, vision_tower=model.model.vision_tower,
                         **{**fields, "rows": qk_norm_rows})


GEMMA3_TOKENS = ("<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>")
GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
"""Gemma3's chat format (turns, an image as ``<start_of_image>``, which the processor expands
to ``<start_of_image>``, N ``<image_soft_token>``, ``<end_of_image>``), without the BOS text."""


def _tokenizer():
    """The toy word-level tokenizer with Gemma3's named image tokens (the processor reads
    ``boi_token`` / ``eoi_token`` / ``image_token`` off the tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from ..toy.checkpoint import build_tokenizer

    base = build_tokenizer("<image_soft_token>", GEMMA3_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=1024, padding_side="left",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    return tok


def save_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """``Gemma3ForConditionalGeneration``: SigLIP on 32 px images, patch 8 (4 x 4 patches, no
    pooling: 16 image tokens, the whole image resized), 3 Gemma3 decoder layers local,
    local, global (as the 5 : 1 pattern ends) with q/k norm, GQA (head_dim 8) and a sliding
    window of 8 tokens, shorter than every prompt (about 30 tokens), Gemma3's chat format."""
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ..toy.checkpoint import TINY_VISION, save_checkpoint
    from ..toy.families import _randomise, _text_sizes

    tok = _tokenizer()
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                             chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=16)
    text = dict(_text_sizes(tok), head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=2048,
                rms_norm_eps=1e-6, sliding_window=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    vision = dict(TINY_VISION, image_size=32, patch_size=8, vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                                       image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                                       eoi_token_id=tok.eoi_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


FAMILIES = (
    Family("Gemma3ForConditionalGeneration", build, save_tiny_checkpoint,
           # every image resized to 32 x 32: 16 tokens on a 4 x 4 grid. r = ceil(sqrt(2)) = 2, c = 1 -> rows 1, 3,
           # col 2 -> 1 * 4 + 2 = 6, 3 * 4 + 2 = 14
           Contract(sizes=None, uniform_keep_2=((6, 14), (6, 14))),
           note="image tokens bidirectional among themselves (token-type mask, gathered with the kept set), "
                "sliding-window layers 5 : 1 (window counted in original indices: full caches in drop mode), "
                "q/k norm, masks built above the decoder"),
)
