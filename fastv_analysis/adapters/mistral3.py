"""Mistral3 (``Mistral3ForConditionalGeneration``, Mistral-Small-3.1 and its kin): Pixtral vision
tower, a learned 2 x 2 patch merger, and a Mistral decoder at ``model.model.language_model``,
read from transformers' ``modeling_mistral3.py`` and ``processing_pixtral.py`` (5.23-5.25).

What matters for pruning:

* **row breaks are text.** The Pixtral processor resizes each image (longest edge, never up)
  to whole merged patches of ``patch_size x spatial_merge_size`` px and writes ``rows`` rows of
  ``cols`` ``[IMG]`` tokens, each row followed by ``[IMG_BREAK]``, the last one by
  ``[IMG_END]`` instead. The model scatters image features at ``[IMG]`` (``image_token_id``)
  only: ``[IMG_BREAK]`` / ``[IMG_END]`` keep their own token embeddings, like every text token,
  so they are not among the ranked image tokens and always stay (LLaVA-NeXT's
  ``image_newline`` is an image feature with the image token id, and is ranked by default).
* **the grid of each sample** is ``image_sizes // (patch_size x spatial_merge_size)``: the
  processor returns the resized ``(height, width)`` of each image and the merger folds the
  patches in raster order, so the N = rows x cols ``[IMG]`` tokens are the grid's raster.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import Adapter
from .family import Contract, Family
from .llava import decoder_fields


def merged_patch(config) -> int:
    """Pixels along one side of an image token: vision patch_size x spatial_merge_size."""
    return config.vision_config.patch_size * config.spatial_merge_size


class Mistral3Adapter(Adapter):
    """Mistral3: every ``[IMG]`` token on the image's rows x cols grid, from ``image_sizes``."""

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        from ..layout import TokenLayout

        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"{self.architecture} needs the processor's image_sizes to lay out its image tokens")
        side = merged_patch(self.model.config)
        out = []
        for b, n in enumerate(n_image):
            height, width = (int(v) for v in sizes[b])
            rows, cols = height // side, width // side
            if rows * cols != int(n):
                raise RuntimeError(f"{self.architecture}, batch element {b}: image_sizes {height} x {width} gives "
                                   f"{rows} x {cols} tokens of {side} px, the prompt holds {n}")
            out.append(TokenLayout.grid(rows, cols))
        return out


def build(model: nn.Module) -> Adapter:
    return Mistral3Adapter(image_token_id=model.config.image_token_id, vision_tower=model.model.vision_tower,
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
    processor = transformers.PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH_SIZE,
                                              spatial_merge_size=2, chat_template=MISTRAL3_CHAT_TEMPLATE,
                                              image_token="[IMG]", image_break_token="[IMG_BREAK]",
                                              image_end_token="[IMG_END]")
    text = transformers.MistralConfig(max_position_embeddings=2048, sliding_window=None, **_text_sizes(tok))
    vision = transformers.PixtralVisionConfig(image_size=longest_edge, patch_size=PATCH_SIZE, head_dim=8,
                                              **TINY_VISION)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2,
                                         image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                                         vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


FAMILIES = (
    Family("Mistral3ForConditionalGeneration", build, save_tiny_checkpoint,
           # 28 px per image token, no upscaling: rows = ceil(h / 28), cols = ceil(w / 28). 84 x 84 -> 3 x 3
           # (9 tokens), 200 x 90 -> 4 x 8 (32). Lattice at keep 2: 3 x 3: r = 2, c = 1 -> rows 0, 2, col 1 -> 1, 7;
           # 4 x 8: r = 1, c = 2 -> row 2, cols 2, 6 -> 18, 22. The CLI run's five: 56 x 56 -> 2 x 2,
           # 120 x 80 -> 3 x 5, 80 x 120 -> 5 x 3, 200 x 90 -> 4 x 8.
           Contract(sizes=((84, 84), (200, 90)), uniform_keep_2=((1, 7), (18, 22)),
                    mixed_grids=((2, 2), (3, 5), (5, 3), (2, 2), (4, 8))),
           note="[IMG_BREAK] after each row and [IMG_END] are text tokens (never pruned); each sample's grid "
                "from image_sizes"),
)
