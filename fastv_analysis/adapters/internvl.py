"""InternVL (transformers' ``InternVLForConditionalGeneration``): InternViT tower, pixel shuffle,
MLP projector and a Qwen2 / Llama decoder at ``model.model.language_model``.

The decoder is a plain Llama-family one (1-D positions), so only the layout is InternVL's own.
Each image is cut into ``T`` tiles of ``vision_config.image_size`` px by the GotOcr2 image
processor (``crop_to_patches`` / ``max_patches``), and when ``T > 1`` a *thumbnail* (the whole
image resized to one tile) is appended as the last tile. Every tile gives ``s x s`` tokens
in raster order (``s`` = tile / patch x ``downsample_ratio``; the pixel shuffle keeps the
raster), all with ``image_token_id`` (``<IMG_CONTEXT>``), between ``<img>`` / ``</img>``
tokens that are not image tokens.

Layout rule (:meth:`InternVLAdapter.token_layouts`): the tiles are the image resized to
``cols x rows`` tiles (stretched, no padding), the grid chosen by GotOcr2's closest-aspect-ratio
rule, a pure function of the image size and the processor's ``min_patches`` / ``max_patches`` /
``size`` (:func:`tile_grid`, transformers' own ``get_optimal_tiled_canvas``). Tile ``i`` is at
row ``i // cols``, column ``i % cols``, so the ``T = rows x cols`` tiles' tokens are placed on one
``(rows s) x (cols s)`` grid covering the whole image (:func:`tiles_layout`); the thumbnail (the
last ``s^2`` tokens, the whole image at one tile) is OFF_GRID, like LLaVA-NeXT's base tile. One
tile (``N = s^2``) is an ``s x s`` grid.

Where the grid comes from: capture has the image and the processor and passes the exact grid
(:meth:`InternVLAdapter.layout_inputs`). Online (``apply_fastv``) the model is called with
``pixel_values`` only: the processor drops ``num_patches`` and returns no image size, so
``T`` (from N) is known but not its arrangement (6 tiles may be 2 x 3, 3 x 2, 1 x 6 or
6 x 1). It is read off the pixels instead (:func:`infer_tile_grid`): the tiles put together
as ``rows x cols`` and area-resized to one tile must match the thumbnail, and the other
arrangements scramble it (mean squared error ~0.015 against ~1 on the tiny checkpoint's random
images). An image that looks the same under two arrangements (a flat or symmetric one) can
make the two disagree; ``tests/test_internvl_tiles.py`` checks online == capture. With no
pixels at all (a forward given ``inputs_embeds``) only the thumbnail is laid out
(:func:`thumbnail_layout`, the tiles OFF_GRID). One image per prompt is assumed, as capture
makes them (several images' tiles in one prompt are not split apart).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


def tile_grid(width: int, height: int, image_processor) -> tuple[int, int]:
    """``(rows, cols)`` of the tiles GotOcr2's processor cuts a ``width x height`` image into
    (``(1, 1)``: one tile, no thumbnail), by transformers' own closest-aspect-ratio rule."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    size = image_processor.size
    tile = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    if not image_processor.crop_to_patches or image_processor.max_patches <= 1:
        return 1, 1
    cols, rows = get_optimal_tiled_canvas((int(height), int(width)), tile, image_processor.min_patches,
                                          image_processor.max_patches)
    return (1, 1) if rows * cols == 1 else (int(rows), int(cols))


def tiles_layout(side: int, rows: int, cols: int):
    """The layout of ``rows x cols`` tiles (raster order, ``side x side`` tokens each, raster
    inside) on one ``(rows side) x (cols side)`` grid, then the thumbnail's ``side^2`` tokens
    OFF_GRID (none when there is one tile)."""
    from ..layout import OFF_GRID, TokenLayout

    if rows * cols == 1:
        return TokenLayout.grid(side, side)
    tile = np.arange(rows * cols)[:, None]
    token = np.arange(side * side)[None, :]
    r = (tile // cols) * side + token // side
    c = (tile % cols) * side + token % side
    cells = (r * cols * side + c).ravel()
    return TokenLayout(rows * side, cols * side, np.concatenate([cells, np.full(side * side, OFF_GRID)]))


def infer_tile_grid(pixels: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of one image's ``[T + 1, 3, t, t]`` tiles + thumbnail, read off the pixels:
    the arrangement whose mosaic, area-resized to one tile, is closest to the thumbnail (the
    first such, fewest rows, on a tie)."""
    tiles, thumb = pixels[:-1].float(), pixels[-1].float()
    n, t = tiles.shape[0], thumb.shape[-1]
    best, grid = float("inf"), (1, n)
    for rows in (r for r in range(1, n + 1) if n % r == 0):
        cols = n // rows
        mosaic = tiles.reshape(rows, cols, 3, t, t).permute(2, 0, 3, 1, 4).reshape(1, 3, rows * t, cols * t)
        err = float((F.interpolate(mosaic, size=(t, t), mode="area")[0] - thumb).pow(2).mean())
        if err < best:
            best, grid = err, (rows, cols)
    return grid


class InternVLAdapter(Adapter):
    """InternVL: every tile on one grid over the whole image, the thumbnail off it."""

    def layout_inputs(self, processor, images: list) -> dict:
        """The exact tile grids of ``images`` (PIL), for :meth:`token_layouts` (capture)."""
        return {"tile_grids": [tile_grid(*image.size, processor.image_processor) for image in images]}

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        side = tile_side(self.model.config)
        grids, pixels, start, out = inputs.get("tile_grids"), inputs.get("pixel_values"), 0, []
        for b, n in enumerate(n_image):
            n_tiles, rest = divmod(int(n), side * side)
            if rest or n_tiles == 2:  # 2 = 1 tile + thumbnail: never made
                raise RuntimeError(f"{self.architecture}: {n} image tokens are not 1 or T + 1 > 2 tiles of "
                                   f"{side * side}")
            if n_tiles == 1:
                grid = (1, 1)
            elif grids is not None:
                grid = tuple(grids[b])
            elif pixels is not None:
                grid = infer_tile_grid(pixels[start:start + n_tiles])
            else:
                out.append(thumbnail_layout(side, int(n)))
                start += n_tiles
                continue
            if grid[0] * grid[1] + (n_tiles > 1) != n_tiles:
                raise RuntimeError(f"{self.architecture}: a {grid[0]} x {grid[1]} tile grid does not give the "
                                   f"prompt's {n} image tokens ({n_tiles} tiles of {side * side})")
            out.append(tiles_layout(side, *grid))
            start += n_tiles
        return out


def build(model: nn.Module) -> Adapter:
    return InternVLAdapter(image_token_id=model.config.image_token_id, vision_tower=model.model.vision_tower,
                           **decoder_fields(model, model.model.language_model))


FAMILIES = (
    Family("InternVLForConditionalGeneration", build, lazy("fastv_analysis.toy.families", "save_tiny_internvl_checkpoint"),
           # tiny one: max_patches=1, every image one 112 px tile = 16 tokens on a 4 x 4 grid: r = ceil(sqrt(2))
           # = 2, c = 1 -> rows 1, 3, col 2 -> cells (= tokens) 1 * 4 + 2 = 6, 3 * 4 + 2 = 14
           Contract(sizes=None, uniform_keep_2=((6, 14), (6, 14))),
           base_tile="last", note="tiles + thumbnail, one placeholder id per token; the tiles on one grid over the "
           "image, the thumbnail after it (a base tile)"),
)
