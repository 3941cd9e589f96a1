"""Idefics3 (``Idefics3ForConditionalGeneration``): SigLIP tower, pixel shuffle, MLP connector
and a Llama decoder at ``model.model.text_model``, read from transformers' ``modeling_idefics3.py``
and ``processing_idefics3.py`` (5.23-5.25).

What matters for pruning:

* **several spans per image.** With image splitting the processor resizes the image so both
  sides are multiples of the tile (``max_image_size``), cuts it into ``R x C`` tiles in raster
  order and appends the whole image resized to one tile (the *global* image). The prompt holds
  ``<fake_token_around_image><row_i_col_j>`` + ``s^2`` ``<image>`` per tile, ``\\n`` after each
  tile row, then ``\\n<fake_token_around_image><global-img>`` + ``s^2`` ``<image>``
  ``<fake_token_around_image>``. Every image token carries the one ``image_token_id``; the
  tokens between spans are text and are never pruned. An image no larger than one tile is
  one span (the global image only).
* **pixel shuffle**: each tile's ``(side / patch)^2`` patches are folded ``scale_factor^2`` to
  one token, keeping the raster (``Idefics3Connector.pixel_shuffle``), so a tile is an
  ``s x s`` grid, ``s = side / patch / scale_factor``.

Layout rule (:func:`tiles_layout`): the processor drops its ``rows`` / ``cols`` from what it
returns, so they are read off ``input_ids``: the spans are the runs of image tokens, the last
one is the global image (off the grid), and a tile span starts a new tile row unless exactly
the two tokens ``<fake_token_around_image><row_i_col_j>`` separate it from the previous one
(a row ends with a ``\\n`` token). The spatial grid is the ``R s x C s`` raster of the tiles,
spanning the whole image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Adapter
from .family import Contract, Family
from .llava import decoder_fields

IN_ROW_GAP = 2
"""Tokens between two tile spans of one row: ``<fake_token_around_image><row_i_col_j>``."""


def tile_side(config) -> int:
    """Tokens along one side of a tile: image_size / patch_size / scale_factor."""
    vision = config.vision_config
    return vision.image_size // vision.patch_size // config.scale_factor


def _spans(is_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each run of image tokens."""
    edges = np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def tiles_layout(input_ids: torch.Tensor, image_token_id: int, side: int):
    """The layout of one prompt's image: ``R x C`` tiles of ``side x side`` tokens on one
    ``R side x C side`` grid, the global image's tokens OFF_GRID (module docstring)."""
    from ..layout import OFF_GRID, TokenLayout

    starts, ends = _spans(input_ids.detach().cpu().numpy() == image_token_id)
    per_tile = side * side
    if len(starts) == 0 or ((ends - starts) != per_tile).any():
        raise RuntimeError(f"image spans of {(ends - starts).tolist()} tokens, expected {per_tile} each")
    if len(starts) == 1:
        return TokenLayout.grid(side, side)
    gaps = starts[1:-1] - ends[:-2]  # between consecutive tile spans
    row_of = np.concatenate([[0], np.cumsum(gaps != IN_ROW_GAP)])
    rows = int(row_of[-1]) + 1
    cols = len(row_of) // rows
    if rows * cols != len(row_of) or (np.bincount(row_of) != cols).any():
        raise RuntimeError(f"{len(row_of)} tiles do not form rows of equal length (row of each: {row_of.tolist()})")
    col_of = np.arange(len(row_of)) % cols
    r, c = np.divmod(np.arange(per_tile), side)
    cells = ((row_of[:, None] * side + r) * (cols * side) + col_of[:, None] * side + c).ravel()
    return TokenLayout(rows * side, cols * side, np.concatenate([cells, np.full(per_tile, OFF_GRID)]))


class Idefics3Adapter(Adapter):
    """Idefics3 / SmolVLM: tiles + global image laid out on the tiles' grid."""

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError(f"{self.architecture} needs input_ids to find its image's tile spans")
        side = tile_side(self.model.config)
        out = []
        for b, n in enumerate(n_image):
            try:
                layout = tiles_layout(ids[b], self.image_token_id, side)
            except RuntimeError as err:
                raise RuntimeError(f"{self.architecture}, batch element {b}: {err}") from None
            if layout.n_tokens != int(n):
                raise RuntimeError(f"{self.architecture}, batch element {b}: {layout.n_tokens} tile tokens, {n} image "
                                   "tokens")
            out.append(layout)
        return out


def build(model: nn.Module) -> Adapter:
    return Idefics3Adapter(image_token_id=model.config.image_token_id, vision_tower=model.model.vision_model,
                           **decoder_fields(model, model.model.text_model))


IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "\n",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
"""The special tokens of Idefics3's prompt; ``\\n`` is one as in its BPE tokenizer (the toy's
word-level one would drop it, and the row ends with it)."""

# Idefics3's chat format (HuggingFaceM4/Idefics3-8B-Llama3), without the Llama-3 BOS text.
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def save_tiny(out_dir: str | Path, seed: int = 0, prefix: str = "Idefics3", tile: int = 56,
              longest_edge: int = 224) -> Path:
    """A tiny ``{prefix}ForConditionalGeneration`` (Idefics3 or SmolVLM, whose classes mirror
    Idefics3's): a 1-layer SigLIP-style tower on ``tile`` px tiles (patch 14, pixel shuffle 2:
    2 x 2 tokens a tile), images resized to a longest edge of ``longest_edge`` px and split into
    up to 4 x 4 tiles + the global image, a 3-layer Llama decoder (GQA), the family's chat format.
    SmolVLM's processor is built image-only (its video processor needs torchvision)."""
    import importlib

    import transformers

    from ..toy.checkpoint import PATCH_SIZE, TINY_VISION, build_tokenizer, save_checkpoint
    from ..toy.families import _randomise, _text_sizes, image_only

    smol = prefix == "SmolVLM"
    template = ("<|im_start|>" if smol else "") + IDEFICS3_CHAT_TEMPLATE
    tok = build_tokenizer("<image>", IDEFICS3_TOKENS + (("<|im_start|>", "<video>") if smol else ()))
    tok.chat_template = template
    side = tile // PATCH_SIZE // 2
    pil = importlib.import_module(f"transformers.models.{prefix.lower()}.image_processing_pil_{prefix.lower()}")
    image_processor = getattr(pil, f"{prefix}ImageProcessorPil")(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, do_image_splitting=True)
    processor_cls = getattr(transformers, f"{prefix}Processor")
    processor = (image_only(processor_cls) if smol else processor_cls)(
        image_processor=image_processor, tokenizer=tok, image_seq_len=side * side, chat_template=template)
    text = transformers.LlamaConfig(max_position_embeddings=2048, **_text_sizes(tok))
    vision = getattr(transformers, f"{prefix}VisionConfig")(image_size=tile, patch_size=PATCH_SIZE, **TINY_VISION)
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, scale_factor=2,
                                                      image_token_id=tok.convert_tokens_to_ids("<image>"),
                                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    _randomise(model, seed)
    return save_checkpoint(model, out_dir, processor)


CONTRACT = Contract(
    # tiles of 56 px, 2 x 2 tokens each; longest edge resized to 224 (4 tiles), the short side to a multiple
    # of 56: 56 x 56 -> 4 x 4 tiles (an 8 x 8 grid, 17 spans, 68 tokens); 200 x 90 -> 224 x 100 -> 2 x 4 tiles
    # (4 x 8 grid, 36 tokens). Lattice at keep 2: 8 x 8: r = 2, c = 1 -> cells (2, 4), (6, 4) = tiles (1, 2),
    # (3, 2), their token (0, 0) -> tokens 4 * (1 * 4 + 2) = 24, 4 * (3 * 4 + 2) = 56; 4 x 8: r = 1, c = 2 ->
    # cells (2, 2), (2, 6) = tiles (1, 1), (1, 3) -> tokens 4 * 5 = 20, 4 * 7 = 28.
    # The CLI run's five: 120 x 80 -> 224 x 150 -> 3 x 4 tiles; 80 x 120 -> 4 x 3; 200 x 90 -> 2 x 4.
    sizes=((56, 56), (200, 90)), uniform_keep_2=((24, 56), (20, 28)),
    mixed_grids=((8, 8), (6, 8), (8, 6), (8, 8), (4, 8)))
"""The contract facts of the tiny Idefics3 / SmolVLM checkpoints (:func:`save_tiny`)."""

FAMILIES = (
    Family("Idefics3ForConditionalGeneration", build, save_tiny, CONTRACT,
           note="tiles + global image as separate spans (text tokens between them stay), pixel shuffle; "
                "laid out on the tiles' grid, the global image off it"),
)
