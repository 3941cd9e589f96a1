"""Where each image token comes from: the image processor's resize/crop and the patch grid.

LLaVA-1.5's CLIP image processor (transformers' ``CLIPImageProcessor``, and
``LlavaImageProcessor`` with ``do_pad``) turns an original ``width x height`` image into the
pixels the vision tower encodes in up to three steps:

1. ``do_pad`` (``LlavaImageProcessor`` only): pad to a square of side ``max(width, height)``,
   the image at offset ``(max - short) // 2`` along its short side;
2. ``do_resize`` with ``size = {"shortest_edge": s}``: the short side becomes ``s`` and the
   long side ``int(s * long / short)`` (truncated, as ``get_resize_output_image_size`` does);
   ``size = {"height": h, "width": w}`` resizes to exactly ``w x h``;
3. ``do_center_crop`` to ``crop_size = {"height": ch, "width": cw}``: the crop starts at
   ``((W' - cw) // 2, (H' - ch) // 2)`` of the resized ``W' x H'`` image (a negative start
   means zero padding, as the PIL/NumPy backend pads: ``ceil`` of half the missing pixels
   before the image).

The vision tower then cuts the ``cw x ch`` crop into ``patch_size`` squares: a
``(ch // p) x (cw // p)`` grid of image tokens in raster order (row-major, top-left first)
— 24 x 24 = 576 tokens for LLaVA-1.5's 336 / 14. Token ``i`` is row ``i // cols``, column
``i % cols``.

Everything here is a pure function of the image size and an :class:`ImageGeometry`, read
from the processor (:func:`geometry_from_processor`) or the model's files
(:func:`load_geometry`: ``preprocessor_config.json``, or ``processor_config.json``'s
``image_processor``, and ``config.json``'s ``vision_config.patch_size``). The LLaVA-1.5
values (shortest edge 336, crop 336 x 336, patch 14) are used only as the documented
fallback when no configuration can be found, and the geometry says so in ``source``.
Boxes are ``(x0, y0, x1, y1)`` in original-image pixel coordinates, ``x1``/``y1`` exclusive
(a box can extend past the image where the processor padded).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

FALLBACK_SOURCE = "fallback: LLaVA-1.5 defaults (shortest edge 336, crop 336 x 336, patch 14)"


@dataclass(frozen=True)
class ImageGeometry:
    """The processor settings that decide which original pixels each image token covers."""

    do_resize: bool = True
    shortest_edge: int | None = 336      # size={"shortest_edge": s}
    resize_height: int | None = None     # size={"height": h, "width": w} (used when shortest_edge is None)
    resize_width: int | None = None
    do_center_crop: bool = True
    crop_height: int = 336
    crop_width: int = 336
    patch_size: int = 14
    pad_to_square: bool = False          # LlavaImageProcessor's do_pad
    source: str = FALLBACK_SOURCE

    @property
    def is_fallback(self) -> bool:
        return self.source == FALLBACK_SOURCE


DEFAULT_GEOMETRY = ImageGeometry()


def _get(obj: Any, key: str, default=None):
    """A setting from a dict, a transformers SizeDict or an image processor attribute."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        value = obj.get(key, default)
    else:
        value = getattr(obj, key, default)
        if value is default and hasattr(obj, "get"):
            try:
                value = obj.get(key, default)
            except TypeError:
                pass
    return default if value is None else value


def geometry_from_settings(settings: Any, patch_size: int | None = None, source: str = "processor") -> ImageGeometry:
    """An :class:`ImageGeometry` from an image processor, or its config dict
    (``do_resize``, ``size``, ``do_center_crop``, ``crop_size``, ``do_pad``, ``image_processor_type``).

    ``patch_size`` is the vision tower's (``vision_config.patch_size``); without it the
    settings' own ``patch_size`` is used, else the fallback 14.
    """
    size = _get(settings, "size")
    crop = _get(settings, "crop_size")
    shortest = _get(size, "shortest_edge")
    height, width = _get(size, "height"), _get(size, "width")
    if isinstance(size, int):  # very old configs: an int means the shortest edge
        shortest = size
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    kind = _get(settings, "image_processor_type", type(settings).__name__ if not isinstance(settings, dict) else "")
    do_pad = bool(_get(settings, "do_pad", False)) and "Llava" in str(kind)
    do_resize = bool(_get(settings, "do_resize", True)) and (shortest is not None or (height and width))
    do_crop = bool(_get(settings, "do_center_crop", True)) and crop is not None
    patch = patch_size or _get(settings, "patch_size") or DEFAULT_GEOMETRY.patch_size
    if isinstance(patch, (list, tuple)):  # InternVL's vision_config: [height, width]
        patch = patch[0]
    return ImageGeometry(
        do_resize=do_resize,
        shortest_edge=int(shortest) if shortest is not None else None,
        resize_height=int(height) if shortest is None and height else None,
        resize_width=int(width) if shortest is None and width else None,
        do_center_crop=do_crop,
        crop_height=int(_get(crop, "height", DEFAULT_GEOMETRY.crop_height)),
        crop_width=int(_get(crop, "width", DEFAULT_GEOMETRY.crop_width)),
        patch_size=int(patch),
        pad_to_square=do_pad,
        source=source,
    )


def geometry_from_processor(processor: Any, patch_size: int | None = None) -> ImageGeometry:
    """From a loaded processor (``LlavaProcessor``: its ``image_processor`` is used) or image processor."""
    image_processor = getattr(processor, "image_processor", processor)
    patch = patch_size or getattr(processor, "patch_size", None)
    return geometry_from_settings(image_processor, patch, source=f"processor {type(image_processor).__name__}")


def _model_file(model: str, filename: str) -> Path | None:
    """A file of a local model folder, or of a hub model already in the local cache (never downloads)."""
    local = Path(model) / filename
    if local.is_file():
        return local
    if Path(model).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(model), filename)
    except Exception:  # not a repo id, no hub client: no cached file
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def load_geometry(model: str | None) -> ImageGeometry:
    """The geometry of ``model`` (a local folder or a cached hub id) from its saved files;
    :data:`DEFAULT_GEOMETRY` (``source`` says fallback) where none can be read."""
    if not model:
        return DEFAULT_GEOMETRY
    patch = None
    config_file = _model_file(model, "config.json")
    if config_file is not None:
        try:
            patch = _get(json.loads(config_file.read_text()).get("vision_config"), "patch_size")
        except (OSError, ValueError, AttributeError):
            patch = None
    for filename, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = _model_file(model, filename)
        if path is None:
            continue
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if key is not None:
            if not isinstance(settings.get(key), dict):
                continue
            patch = patch or settings.get("patch_size")
            settings = settings[key]
        return geometry_from_settings(settings, patch, source=str(path))
    return replace(DEFAULT_GEOMETRY, patch_size=int(patch)) if patch else DEFAULT_GEOMETRY


def grid_shape(geometry: ImageGeometry, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the image-token grid (24 x 24 for LLaVA-1.5). Without a center crop the
    grid depends on the resized image, so ``width``/``height`` are then needed."""
    if geometry.do_center_crop:
        ch, cw = geometry.crop_height, geometry.crop_width
    else:
        if width is None or height is None:
            raise ValueError("without a center crop the token grid depends on the image size: pass width and height")
        cw, ch = _resized(width, height, geometry)[2:]
    return ch // geometry.patch_size, cw // geometry.patch_size


def _padded(width: int, height: int, geometry: ImageGeometry) -> tuple[int, int, int, int]:
    """(offset_x, offset_y, width, height) of the canvas after the optional pad to square."""
    if not geometry.pad_to_square or width == height:
        return 0, 0, width, height
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2, side, side


def _resized(width: int, height: int, geometry: ImageGeometry) -> tuple[int, int, int, int]:
    """(canvas_w, canvas_h, resized_w, resized_h)."""
    _, _, w, h = _padded(width, height, geometry)
    if not geometry.do_resize:
        return w, h, w, h
    if geometry.shortest_edge is not None:
        s = geometry.shortest_edge
        if w <= h:
            return w, h, s, int(s * h / w)
        return w, h, int(s * w / h), s
    return w, h, geometry.resize_width, geometry.resize_height


def resized_size(width: int, height: int, geometry: ImageGeometry = DEFAULT_GEOMETRY) -> tuple[int, int]:
    """(width, height) of the image after the processor's (pad and) resize."""
    return _resized(width, height, geometry)[2:]


def _crop_in_resized(width: int, height: int, geometry: ImageGeometry) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h) of the crop in resized-image pixels (negative: padded)."""
    rw, rh = resized_size(width, height, geometry)
    if not geometry.do_center_crop:
        return 0, 0, rw, rh
    cw, ch = geometry.crop_width, geometry.crop_height
    # (R - c) // 2 is the crop start when R >= c (floor, as both backends do) and minus the
    # NumPy backend's ceil((c - R) / 2) of zero padding before the image when R < c.
    return (rw - cw) // 2, (rh - ch) // 2, cw, ch


def _to_original(x: np.ndarray, y: np.ndarray, width: int, height: int, geometry: ImageGeometry):
    cw_, ch_, rw, rh = _resized(width, height, geometry)
    ox, oy, _, _ = _padded(width, height, geometry)
    return x * (cw_ / rw) - ox, y * (ch_ / rh) - oy


def crop_box(width: int, height: int, geometry: ImageGeometry = DEFAULT_GEOMETRY) -> tuple[float, float, float, float]:
    """The part of the original ``width x height`` image the model sees, ``(x0, y0, x1, y1)``
    in original pixels (x1, y1 exclusive). For a 672 x 336 image and LLaVA-1.5:
    ``(168, 0, 504, 336)``."""
    left, top, cw, ch = _crop_in_resized(width, height, geometry)
    x, y = _to_original(np.array([left, left + cw], float), np.array([top, top + ch], float), width, height, geometry)
    return float(x[0]), float(y[0]), float(x[1]), float(y[1])


def token_boxes(indices, width: int, height: int, geometry: ImageGeometry = DEFAULT_GEOMETRY,
                grid: tuple[int, int] | None = None) -> np.ndarray:
    """``[k, 4]`` boxes ``(x0, y0, x1, y1)`` in original pixels of image tokens ``indices``.

    ``grid`` (rows, cols) overrides the processor's patch grid (for a model whose token count
    is not the patch grid's): the crop is then split into ``rows x cols`` equal cells.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    left, top, cw, ch = _crop_in_resized(width, height, geometry)
    if grid is None:
        rows, cols = grid_shape(geometry, width, height)
        cell_w = cell_h = float(geometry.patch_size)
    else:
        rows, cols = grid
        cell_w, cell_h = cw / cols, ch / rows
    if idx.size and (idx.min() < 0 or idx.max() >= rows * cols):
        raise ValueError(f"token index out of range for a {rows} x {cols} grid: {idx.min()}..{idx.max()}")
    r, c = idx // cols, idx % cols
    x0, y0 = _to_original(left + c * cell_w, top + r * cell_h, width, height, geometry)
    x1, y1 = _to_original(left + (c + 1) * cell_w, top + (r + 1) * cell_h, width, height, geometry)
    return np.stack([x0, y0, x1, y1], axis=-1).astype(float)


def token_box(index: int, width: int, height: int, geometry: ImageGeometry = DEFAULT_GEOMETRY,
              grid: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """Box ``(x0, y0, x1, y1)`` in original pixels of image token ``index`` (raster order)."""
    return tuple(float(v) for v in token_boxes([index], width, height, geometry, grid)[0])


def model_view(image, geometry: ImageGeometry = DEFAULT_GEOMETRY):
    """The pixels the vision tower encodes (before rescale/normalise), as a PIL image of the
    crop size: (pad,) resize (bicubic) and center crop of ``image`` (a PIL image)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    ox, oy, pw, ph = _padded(w, h, geometry)
    if (ox, oy, pw, ph) != (0, 0, w, h):
        canvas = Image.new("RGB", (pw, ph), (122, 116, 104))  # CLIP mean colour, as LlavaImageProcessor pads
        canvas.paste(image, (ox, oy))
        image = canvas
    rw, rh = resized_size(w, h, geometry)
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.BICUBIC)
    left, top, cw, ch = _crop_in_resized(w, h, geometry)
    return image.crop((left, top, left + cw, top + ch))  # PIL pads outside the image with black


def token_grid_for(n_tokens: int, geometry: ImageGeometry, width: int, height: int) -> tuple[int, int] | None:
    """None when the processor's patch grid has exactly ``n_tokens`` cells, else the square
    grid to spread ``n_tokens`` over the crop (``ValueError`` when ``n_tokens`` is not square)."""
    rows, cols = grid_shape(geometry, width, height)
    if rows * cols == n_tokens:
        return None
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} image tokens fit neither the {rows} x {cols} patch grid nor a square grid")
    return side, side
