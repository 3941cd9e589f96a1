"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): the Qwen2-VL recipe plus three things that
matter for pruning, read from transformers' ``modeling_qwen3_vl.py`` (5.23-5.25):

* **interleaved M-RoPE**: the text rotary embedding interleaves the T / H / W frequencies
  (``mrope_section``, e.g. [24, 20, 20]) instead of blocking them. The decoder hands every
  layer ``(cos, sin)`` already merged per position, so gathering them at kept positions (and
  the 4-row position ids at K = 0) keeps each token's own 3-D position, as for Qwen2-VL.
* **q/k norm**: attention RMS-normalises each head of q and k before RoPE; attention rows
  are recomputed through the layer's own ``q_norm`` / ``k_norm`` (:func:`qk_norm_rows`).
* **DeepStack**: the vision tower's ``deepstack_visual_indexes`` blocks give extra features
  that the text decoder adds to the image tokens' hidden states after each of its first
  ``len(deepstack_visual_indexes)`` layers, at ``visual_pos_masks``. With FastV's hooks on,
  the adapter takes them out of the decoder's call and adds them itself after those layers,
  at the image positions of the sequence each layer actually runs on (all of them, or in
  drop mode from K on the kept ones: the mask and the features sliced with the same kept
  set), so pruning at or before a DeepStack layer is exact (drop == mask).

What FastV's K means here: layer K's input is pruned; DeepStack features still reach the kept
image tokens after every DeepStack layer >= K, and the pruned ones never get theirs. With
Qwen3-VL-2B/4B/8B's three DeepStack features (decoder layers 0, 1, 2), FastV's usual K = 2
prunes inside DeepStack: the kept tokens get the last feature after layer 2.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..positions import take_positions
from .base import Adapter
from .family import Contract, Family
from .llava import decoder_fields
from .qwen2_vl import QwenVLAdapter
from .rows import llama_attention_rows


def qk_norm_rows(adapter, module: nn.Module, call, query_positions: torch.Tensor, rope: bool = True) -> torch.Tensor:
    """Attention rows of a q/k-norm layer: the Llama recompute with q_proj / k_proj followed by
    the layer's own per-head ``q_norm`` / ``k_norm``, as its forward does before RoPE."""
    head_dim = adapter.head_dim

    def normed(proj, norm):
        return lambda x: norm(proj(x).view(*x.shape[:-1], -1, head_dim)).flatten(-2)

    own = SimpleNamespace(q_proj=normed(module.q_proj, module.q_norm), k_proj=normed(module.k_proj, module.k_norm),
                          scaling=module.scaling)
    return llama_attention_rows(adapter, own, call, query_positions, rope=rope)


def _take_deepstack(fastv, state: dict, module, args, kwargs):
    """Text decoder pre-hook: in a prefill, hold the DeepStack features as ``[B, S, D]`` (zero
    off the image) and call the decoder without them."""
    state.clear()
    embeds, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
    if fastv.phase != "prefill" or embeds is None:
        return None
    if mask is None or mask.dim() != 2:
        raise fastv.adapter.missing("a 2D visual_pos_masks beside deepstack_visual_embeds", "the text decoder")
    dense = []
    for features in embeds:
        full = features.new_zeros(*mask.shape, features.shape[-1])
        full[mask.to(full.device)] = features
        dense.append(full)
    state["dense"] = dense
    return args, {**kwargs, "deepstack_visual_embeds": None, "visual_pos_masks": None}


def _add_deepstack(fastv, state: dict, layer: int, module, args, output):
    """After decoder layer ``layer`` < the DeepStack depth: add its features at the image
    positions of the sequence the layer ran on (the model's own ``h[mask] + features``)."""
    dense = state.get("dense")
    if dense is None or layer >= len(dense):
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    positions = fastv.sequence_positions(layer)
    add = dense[layer] if positions is None else take_positions(dense[layer], positions, dim=1)
    hidden = hidden + add.to(hidden.device, hidden.dtype)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen2-VL's M-RoPE conventions, q/k-norm rows, DeepStack under the hooks."""

    def family_hooks(self, fastv) -> list:
        state: dict = {}
        depth = len(self.model.config.vision_config.deepstack_visual_indexes)
        handles = [self.language_model.register_forward_pre_hook(partial(_take_deepstack, fastv, state),
                                                                 with_kwargs=True),
                   self.model.register_forward_hook(lambda *_: state.clear(), always_call=True)]
        handles += [self.layers[i].register_forward_hook(partial(_add_deepstack, fastv, state, i))
                    for i in range(min(depth, self.num_layers))]
        return handles


def build(model: nn.Module) -> Adapter:
    fields = decoder_fields(model, model.model.language_model)
    return Qwen3VLAdapter(image_token_id=model.config.image_token_id, vision_tower=model.model.visual,
                          **{**fields, "rows": qk_norm_rows})


def save_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """``Qwen3VLForConditionalGeneration``: 3 decoder layers with q/k norm and interleaved
    M-RoPE (head_dim 8, mrope_section [2, 1, 1]), a 2-block vision tower with DeepStack
    features from both blocks (added after decoder layers 0 and 1), patch 16 merged 2 x 2
    (32 px per image token), Qwen's chat format."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..toy.checkpoint import TINY_VISION, build_tokenizer, save_checkpoint
    from ..toy.families import QWEN_CHAT_TEMPLATE, QWEN_IMAGE_TOKEN, QWEN_TOKENS, _randomise, _text_sizes, image_only

    tok = build_tokenizer(QWEN_IMAGE_TOKEN, QWEN_TOKENS)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64, patch_size=16,
                                               merge_size=2, temporal_patch_size=2)
    processor = image_only(transformers.Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                          chat_template=QWEN_CHAT_TEMPLATE)
    text = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, head_dim=8, **_text_sizes(tok),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=TINY_VISION["hidden_size"], intermediate_size=TINY_VISION["intermediate_size"],
                  num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=text["hidden_size"], num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", QWEN_IMAGE_TOKEN), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


FAMILIES = (
    Family("Qwen3VLForConditionalGeneration", build, save_tiny_checkpoint,
           # smart_resize to 32 px per merged token (banker's rounding): 56 x 56 -> 2 x 2; 196 x 112 -> 4 x 6
           # (112 / 32 = 3.5 -> 4, 196 / 32 = 6.1 -> 6). Lattice at keep 2: 2 x 2: r = 2, c = 1 -> rows 0, 1,
           # col 1 -> 1, 3; 4 x 6: r = 2, c = 1 -> rows 1, 3, col 3 -> 9, 21. The CLI run's five sizes:
           # 120 x 80 -> 2 x 4 (80 / 32 = 2.5 -> 2), 80 x 120 -> 4 x 2, 200 x 90 -> 3 x 6.
           Contract(sizes=((56, 56), (196, 112)), uniform_keep_2=((1, 3), (9, 21)),
                    mixed_grids=((2, 2), (2, 4), (4, 2), (2, 2), (3, 6))),
           note="interleaved M-RoPE, q/k norm, DeepStack features added after the first decoder layers "
                "(sliced to the kept tokens)"),
)
