"""InternVL (transformers' ``InternVLForConditionalGeneration``): InternViT tower, pixel shuffle,
MLP projector and a Qwen2 / Llama decoder at ``model.model.language_model``.

The decoder is a plain Llama-family one (1-D positions), so only the layout is InternVL's own.
Each image is cut into ``T`` tiles of ``vision_config.image_size`` px by the GotOcr2 image
processor (``crop_to_patches`` / ``max_patches``), and when ``T > 1`` a *thumbnail* (the whole
image resized to one tile) is appended as the last tile. Every tile gives ``s x s`` tokens
in raster order (``s`` = tile / patch x ``downsample_ratio``; the pixel shuffle keeps the
raster), all with ``image_token_id`` (``<IMG_CONTEXT>``), between ``<img>`` / ``</img>``
tokens that are not image tokens.

Layout rule (:meth:`InternVLAdapter.token_layouts`): the processor returns neither the
tiles' rows x cols nor the image sizes, so the tile grid cannot be rebuilt exactly (6
tiles may be 2 x 3, 3 x 2 or 1 x 6). The one grid known exactly is the tile that covers
the whole image: with ``N = s^2`` image tokens that is the only tile, an ``s x s`` grid;
with ``N = (T + 1) s^2`` (``T > 1``) it is the thumbnail, the LAST ``s^2`` tokens, an
``s x s`` grid, and the ``T s^2`` tile tokens before it are OFF_GRID. The uniform control
is then a lattice on the thumbnail (see :func:`fastv_analysis.layout.uniform_tokens`).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from .base import Adapter
from .family import Contract, Family, lazy
from .llava import decoder_fields


def tile_side(config) -> int:
    """Tokens along one side of a tile: (image_size / patch_size) x downsample_ratio."""
    vision = config.vision_config
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(round(size // patch * config.downsample_ratio))


def thumbnail_layout(side: int, n_tokens: int):
    """One tile: an ``side x side`` grid; tiles + thumbnail: the last ``side^2`` tokens on the
    grid, the rest OFF_GRID (module docstring)."""
    from ..layout import OFF_GRID, TokenLayout

    per_tile = side * side
    if n_tokens % per_tile or n_tokens // per_tile == 2:  # 2 = 1 tile + thumbnail: never made
        raise RuntimeError(f"{n_tokens} image tokens are not 1 or T + 1 > 2 tiles of {per_tile}")
    off = n_tokens - per_tile
    return TokenLayout(side, side, np.concatenate([np.full(off, OFF_GRID), np.arange(per_tile)]).astype(np.int64))


class InternVLAdapter(Adapter):
    """InternVL: tiles + thumbnail laid out by the thumbnail's grid."""

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        side = tile_side(self.model.config)
        out = []
        for n in n_image:
            try:
                out.append(thumbnail_layout(side, int(n)))
            except RuntimeError as err:
                raise RuntimeError(f"{self.architecture}: {err}") from None
        return out


def build(model: nn.Module) -> Adapter:
    return InternVLAdapter(image_token_id=model.config.image_token_id, vision_tower=model.model.vision_tower,
                           **decoder_fields(model, model.model.language_model))


FAMILIES = (
    Family("InternVLForConditionalGeneration", build, lazy("fastv_analysis.toy.families", "save_tiny_internvl_checkpoint"),
           # tiny one: max_patches=1, every image one 112 px tile = 16 tokens on a 4 x 4 grid: r = ceil(sqrt(2))
           # = 2, c = 1 -> rows 1, 3, col 2 -> cells (= tokens) 1 * 4 + 2 = 6, 3 * 4 + 2 = 14
           Contract(sizes=None, uniform_keep_2=((6, 14), (6, 14))),
           note="tiles + thumbnail, one placeholder id per token; laid out on the thumbnail"),
)
