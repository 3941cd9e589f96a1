"""PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP tower, one linear projector and a
Gemma decoder at ``model.model.language_model``, read from transformers'
``modeling_paligemma.py`` (5.23-5.25). What matters for pruning:

* **prefix-LM**: the image and the prompt (``token_type_ids`` 0) attend to each other
  bidirectionally, the answer causally. ``PaliGemmaModel`` builds the 4D mask *above* the
  text decoder and hands it over ready: from K on each layer's mask is gathered at the
  kept positions as everywhere (a kept image token still sees the whole kept prefix), and
  at K = 0 the prepared mask itself is gathered along queries and keys
  (:mod:`~fastv_analysis.pruning.rewrite`). While decoding after a K = 0 drop the 2D mask
  and the position ids are rewritten where the model builds its mask
  (:func:`_decode_call`), so the mask lines up with the cache of kept tokens.
* **1-indexed positions**: ``PaliGemmaModel`` numbers tokens from 1 (``generate`` adds 1 to
  its ids); kept tokens keep theirs.
* **labels**: the processor always returns ``labels`` (the prefix -100, a ``suffix`` its
  ids). In a drop-mode prefill the logits cover the kept positions only, so the labels are
  held back and the model's own loss is formed on the labels at the kept positions
  (:func:`_take_labels`, :func:`_kept_loss`); drop == mask for the loss too.
* the image tokens come first, then ``<bos>``, the prompt and ``"\\n"``; no chat template:
  the family's ``prompt_template`` is ``<image>{question}`` (the processor adds the rest).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Adapter
from .family import Contract, Family
from .llava import decoder_fields


def _decode_call(fastv, module, args, kwargs):
    """``PaliGemmaModel`` pre-hook: in a decode step after a K = 0 drop, hand it the 2D mask of
    the kept prompt + generated tokens and the unpruned positions (the model builds the 4D
    mask from them against the cache of kept tokens); the text decoder's own K = 0 rewrite
    passes such a prepared call through."""
    from ..pruning.rewrite import rewrite_decoder_input

    prompt, adapter = fastv.prompt, fastv.adapter
    if fastv.phase != "decode" or prompt.agg_layer != 0 or prompt.mode != "drop":
        return None
    new = rewrite_decoder_input(adapter, prompt, "decode", adapter.decoder_call(args, kwargs), fastv.positions_given)
    kwargs = dict(kwargs)
    if new.attention_mask is not None:
        kwargs["attention_mask"] = new.attention_mask
    if new.position_ids is not None:
        kwargs["position_ids"] = new.position_ids
    return args, kwargs


def _take_labels(fastv, state: dict, module, args, kwargs):
    """Model pre-hook: in a drop-mode prefill hold the ``labels`` back (the logits will cover
    the kept positions only); :func:`_kept_loss` forms the loss."""
    state.clear()
    if fastv.phase != "prefill" or fastv.prompt.mode != "drop" or kwargs.get("labels") is None:
        return None
    state["labels"] = kwargs["labels"]
    return args, {**kwargs, "labels": None}


def _kept_loss(fastv, state: dict, module, args, output):
    """Model hook: the model's own loss on the labels at the positions the logits cover (the
    last layer's kept positions; fillers -100). A pruned image token is prefix, -100 in
    mask mode as well, so the loss equals mask mode's."""
    from ..positions import take_positions

    labels = state.pop("labels", None)
    prompt = fastv.prompt
    if labels is None or prompt is None or prompt.kept_mask is None:
        return None
    cut = prompt.governing(fastv.adapter.num_layers - 1)
    logits = output.logits
    kept = take_positions(labels.to(logits.device), cut.kept_positions.to(logits.device), dim=1)
    if cut.fillers is not None:
        kept = kept.masked_fill(cut.fillers.to(kept.device), -100)
    if kept.shape[1] != logits.shape[1]:  # logits_to_keep: the loss needs every position's logits
        raise ValueError(f"{fastv.adapter.architecture}: labels need the logits of every position; "
                         "call without logits_to_keep")
    output.loss = module.loss_function(logits=logits, labels=kept, vocab_size=module.config.text_config.vocab_size)
    return output


class PaliGemmaAdapter(Adapter):
    """PaliGemma: the prefix-LM mask prepared above the decoder, positions from 1."""

    def family_hooks(self, fastv) -> list:
        state: dict = {}
        return [self.model.model.register_forward_pre_hook(partial(_decode_call, fastv), with_kwargs=True),
                self.model.register_forward_pre_hook(partial(_take_labels, fastv, state), with_kwargs=True),
                self.model.register_forward_hook(partial(_kept_loss, fastv, state))]

    def next_token_logits(self, model, cache, **inputs) -> torch.Tensor:
        """The base step without ``labels``: the processor's training targets (it always returns
        them) need the logits of every position, a cached step keeps the last one only."""
        inputs.pop("labels", None)
        return super().next_token_logits(model, cache, **inputs)

    def default_position_ids(self, batch: int, seq_len: int, device) -> torch.Tensor:
        return torch.arange(1, seq_len + 1, device=device).expand(batch, -1)

    def step_position_ids(self, start: int, q_len: int, batch: int, attention_mask: torch.Tensor | None,
                          device) -> torch.Tensor:
        return torch.arange(start + 1, start + 1 + q_len, device=device).unsqueeze(0)

    def prompt_positions(self, inputs: dict, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``generate``'s ids (the mask's running count from 0) + 1, as PaliGemma's
        ``prepare_inputs_for_generation`` adds."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + 1, None

    def decode_positions(self, attention_mask: torch.Tensor, state: Any) -> torch.Tensor:
        return attention_mask.long().sum(dim=1, keepdim=True)


def build(model: nn.Module) -> Adapter:
    """The adapter of a PaliGemma with a Gemma decoder; a ValueError for PaliGemma 2's Gemma2
    decoder (sliding-window layers and attention logit soft-capping: neither its cache nor its
    attention rows are handled here)."""
    text = model.config.text_config
    if getattr(text, "sliding_window", None) is not None or getattr(text, "attn_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} with a {text.model_type} text decoder (PaliGemma 2: sliding-window "
                         "layers, attention logit soft-capping) is not supported; PaliGemma's Gemma decoder is")
    return PaliGemmaAdapter(image_token_id=model.config.image_token_id, vision_tower=model.model.vision_tower,
                            **decoder_fields(model, model.model.language_model))


def save_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """``PaliGemmaForConditionalGeneration``: SigLIP on 32 px images, patch 8 (4 x 4 = 16 image
    tokens, the whole image resized), 3 Gemma decoder layers with GQA (head_dim 8); the
    toy tokenizer with ``\\n`` as a token (the processor ends the prefix with it), no chat
    template."""
    import transformers
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from ..toy.checkpoint import TINY_VISION, build_tokenizer, save_checkpoint
    from ..toy.families import _randomise, _text_sizes

    tok = build_tokenizer("<image>", ("\n",))
    tok.chat_template = None
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=16)
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    text = dict(_text_sizes(tok), head_dim=8, max_position_embeddings=2048, rms_norm_eps=1e-6)
    vision = dict(TINY_VISION, image_size=32, patch_size=8, vision_use_head=False)
    config = transformers.PaliGemmaConfig(text_config=transformers.GemmaConfig(**text),
                                          vision_config=transformers.SiglipVisionConfig(**vision),
                                          image_token_index=tok.image_token_id, projection_dim=text["hidden_size"],
                                          hidden_size=text["hidden_size"], vocab_size=len(tok),
                                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


FAMILIES = (
    Family("PaliGemmaForConditionalGeneration", build, save_tiny_checkpoint,
           # every image resized to 32 x 32: 16 tokens on a 4 x 4 grid. r = ceil(sqrt(2)) = 2, c = 1 -> rows 1, 3,
           # col 2 -> 1 * 4 + 2 = 6, 3 * 4 + 2 = 14
           Contract(sizes=None, uniform_keep_2=((6, 14), (6, 14))),
           note="prefix-LM (image + prompt bidirectional, mask built above the decoder), 1-indexed positions, "
                "image first, no chat template (prompt <image>{question}), the processor's labels",
           prompt_template="<image>{question}"),
)
