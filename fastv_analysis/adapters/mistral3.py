"""Mistral3 (``Mistral3ForConditionalGeneration``, Mistral-Small-3.1 and its kin): Pixtral vision
tower, a learned 2 x 2 patch merger, and a Mistral decoder at ``model.model.language_model``,
read from transformers' ``modeling_mistral3.py`` and ``processing_pixtral.py`` (5.23-5.25).

What matters for pruning:

* **row breaks.** The Pixtral processor resizes each image (longest edge, never up) to whole
  merged patches of ``patch_size x spatial_merge_size`` px and writes ``rows`` rows of ``cols``
  ``[IMG]`` tokens, each row followed by ``[IMG_BREAK]``, the last one by ``[IMG_END]``
  instead. The model scatters image features at ``[IMG]`` only; the break tokens keep their
  own token embeddings. The image span is all three (the adapter's ``image_token_id`` is the
  tuple of their ids), and the break tokens are its NEWLINE tokens, as LLaVA-NeXT's
  ``image_newline``: the ``newline`` policy (``apply_fastv(newline=...)``, ``select
  --newline-tokens``) ranks them with the ``[IMG]`` tokens (``prune``, the default: the budget
  counts every token of the image span) or keeps every one outside the budget (``keep``).
* **the grid of each sample** is read off the row breaks: ``rows`` = the span's break tokens,
  ``cols`` = the ``[IMG]`` tokens before each (checked equal per row, and against
  ``image_sizes // (patch_size x spatial_merge_size)``); the merger folds the patches in raster
  order, so the ``[IMG]`` tokens are the grid's raster.
* **no torchvision needed.** transformers' ``PixtralProcessor`` module imports the torchvision
  image processor for one helper its PIL twin also defines; :func:`pixtral_processor_class`
  imports it with the PIL module in that place (where torchvision is missing), so the tiny
  checkpoint and :func:`~fastv_analysis.loading.load_model` use transformers' own processor.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Adapter
from .family import Contract, Family
from .llava import decoder_fields

_PIXTRAL = "transformers.models.pixtral"


def merged_patch(config) -> int:
    """Pixels along one side of an image token: vision patch_size x spatial_merge_size."""
    return config.vision_config.patch_size * config.spatial_merge_size


def pixtral_processor_class() -> type:
    """transformers' own ``PixtralProcessor``, importable where torchvision is not (module docstring)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available() or f"{_PIXTRAL}.processing_pixtral" in sys.modules:
        return importlib.import_module(f"{_PIXTRAL}.processing_pixtral").PixtralProcessor
    fast = f"{_PIXTRAL}.image_processing_pixtral"
    sys.modules[fast] = importlib.import_module(f"{_PIXTRAL}.image_processing_pil_pixtral")
    try:
        return importlib.import_module(f"{_PIXTRAL}.processing_pixtral").PixtralProcessor
    finally:
        del sys.modules[fast]


def load_processor(name: str):
    """The processor of checkpoint ``name`` (:class:`~.family.Family` ``processor``)."""
    return pixtral_processor_class().from_pretrained(name)


def break_layout(ids: np.ndarray, image_id: int, break_ids: tuple[int, int]):
    """The layout of one image span (``[IMG]`` x cols + a break, ``rows`` times): the ``[IMG]``
    tokens on a rows x cols raster, the breaks NEWLINE; RuntimeError if the rows differ."""
    from ..layout import TokenLayout

    ends = np.flatnonzero(np.isin(ids, break_ids))
    if len(ends) == 0 or ends[-1] != len(ids) - 1:
        raise RuntimeError("the image span does not end with [IMG_END]")
    lengths = np.diff(np.concatenate([[-1], ends])) - 1
    if (lengths != lengths[0]).any() or lengths[0] == 0 or not (np.delete(ids, ends) == image_id).all():
        raise RuntimeError(f"image rows of {lengths.tolist()} [IMG] tokens, expected equal rows")
    return TokenLayout.anyres(0, len(ends), int(lengths[0]))


class Mistral3Adapter(Adapter):
    """Mistral3: each image's ``[IMG]`` grid and its row breaks, read off ``input_ids``."""

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        from ..pruning import is_image_token

        ids, sizes = inputs.get("input_ids"), inputs.get("image_sizes")
        if ids is None:
            raise ValueError(f"{self.architecture} needs input_ids to find its image rows")
        side = merged_patch(self.model.config)
        out = []
        for b, n in enumerate(n_image):
            row = ids[b].detach().cpu()
            span = row[is_image_token(row, self.image_token_id)].numpy()
            try:
                layout = break_layout(span, self.image_token_id[0], self.image_token_id[1:])
            except RuntimeError as err:
                raise RuntimeError(f"{self.architecture}, batch element {b}: {err}") from None
            expected = None if sizes is None else tuple(int(v) // side for v in sizes[b])
            if layout.n_tokens != int(n) or expected not in (None, (layout.rows, layout.cols)):
                raise RuntimeError(f"{self.architecture}, batch element {b}: a {layout.rows} x {layout.cols} grid "
                                   f"of {layout.n_tokens} span tokens, the prompt holds {n}, image_sizes give "
                                   f"{expected}")
            out.append(layout)
        return out


TEKKEN_BREAK_OFFSETS = (2, 3)
"""``[IMG_BREAK]`` and ``[IMG_END]`` minus ``[IMG]`` in Mistral's tekken tokenizer (10, 12, 13 in
every released Mistral3 / Pixtral checkpoint; the config names only ``[IMG]``)."""


def image_token_ids(model: nn.Module) -> tuple[int, int, int]:
    """``([IMG], [IMG_BREAK], [IMG_END])`` ids: the config's ``image_break_token_id`` /
    ``image_end_token_id`` where it has them (the tiny checkpoint does), else tekken's. A wrong
    guess is refused by :func:`break_layout` (the span would not end with a break)."""
    config = model.config
    image = config.image_token_id
    brk, end = (getattr(config, name, None) for name in ("image_break_token_id", "image_end_token_id"))
    brk = image + TEKKEN_BREAK_OFFSETS[0] if brk is None else brk
    end = image + TEKKEN_BREAK_OFFSETS[1] if end is None else end
    return image, brk, end


def build(model: nn.Module) -> Adapter:
    return Mistral3Adapter(image_token_id=image_token_ids(model), vision_tower=model.model.vision_tower,
                           **decoder_fields(model, model.model.language_model))


MISTRAL3_TOKENS = ("[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]")
# Mistral's instruction format, reduced to what a question needs (Mistral-Small-3.1 renders an
# image as [IMG], which the processor expands).
MISTRAL3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}[IMG]"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}</s>"
    "{% endif %}{% endfor %}"
)


def save_tiny_checkpoint(out_dir: str | Path, seed: int = 0, longest_edge: int = 224) -> Path:
    """``Mistral3ForConditionalGeneration``: a 1-layer Pixtral tower (patch 14, 2-D RoPE), the
    2 x 2 patch merger (28 px per image token), images kept at their size up to a longest
    edge of ``longest_edge`` px, a 3-layer Mistral decoder (GQA), Mistral's [INST] format."""
    import transformers
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from ..toy.checkpoint import PATCH_SIZE, TINY_VISION, build_tokenizer, save_checkpoint
    from ..toy.families import _randomise, _text_sizes

    tok = build_tokenizer("[IMG]", MISTRAL3_TOKENS)
    tok.chat_template = MISTRAL3_CHAT_TEMPLATE
    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                                               patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE})
    processor = pixtral_processor_class()(image_processor=image_processor, tokenizer=tok, patch_size=PATCH_SIZE,
                                          spatial_merge_size=2, chat_template=MISTRAL3_CHAT_TEMPLATE,
                                          image_token="[IMG]", image_break_token="[IMG_BREAK]",
                                          image_end_token="[IMG_END]")
    text = transformers.MistralConfig(max_position_embeddings=2048, sliding_window=None, **_text_sizes(tok))
    vision = transformers.PixtralVisionConfig(image_size=longest_edge, patch_size=PATCH_SIZE, head_dim=8,
                                              **TINY_VISION)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2,
                                         image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                                         image_break_token_id=tok.convert_tokens_to_ids("[IMG_BREAK]"),
                                         image_end_token_id=tok.convert_tokens_to_ids("[IMG_END]"),
                                         vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


FAMILIES = (
    Family("Mistral3ForConditionalGeneration", build, save_tiny_checkpoint,
           # 28 px per image token, no upscaling: rows = ceil(h / 28), cols = ceil(w / 28); each row of [IMG]
           # ended by a break token (token = cell + row). 84 x 84 -> 3 x 3 (12 tokens), 200 x 90 -> 4 x 8 (36).
           # Lattice at keep 2: 3 x 3: r = 2, c = 1 -> rows 0, 2, col 1 -> cells 1, 7 -> tokens 1, 9; 4 x 8: r = 1,
           # c = 2 -> row 2, cols 2, 6 -> cells 18, 22 -> tokens 20, 24. The CLI run's five: 56 x 56 -> 2 x 2,
           # 120 x 80 -> 3 x 5, 80 x 120 -> 5 x 3, 200 x 90 -> 4 x 8.
           Contract(sizes=((84, 84), (200, 90)), uniform_keep_2=((1, 9), (20, 24)),
                    mixed_grids=((2, 2), (3, 5), (5, 3), (2, 2), (4, 8))),
           processor=load_processor,
           note="[IMG_BREAK] after each row, [IMG_END] after the last: the image span's newline tokens (policy "
                "flag --newline-tokens); each sample's grid from its row breaks"),
)
