"""Section 9: example images with each method's kept tokens where the processor took them from,
and which samples to show.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from .. import grid as image_grid
from .configs import one_config_per_method
from .grids import DEFAULT_ARCHITECTURE, base_tile, base_tile_tokens, cell_boxes, grid_extent, token_layouts
from .style import method_label, new_figure


MARK = {True: "\u2713", False: "\u2717"}  # check mark / ballot x

KEPT_FILL = (0.0, 0.9, 1.0, 0.35)          # translucent cyan inside each kept token

KEPT_EDGE = (0.0, 0.9, 1.0, 1.0)           # bright cyan outline over a black one: visible on any background

BASE_EDGE = (1.0, 0.55, 0.0, 1.0)          # orange dashed outline: a kept anyres base-tile token


def _load_image(path) -> np.ndarray | None:
    """float RGB ``[H, W, 3]`` in [0, 1], or None where the file is gone or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=float) / 255
    except (OSError, ValueError, TypeError):
        return None


def _correctness(predictions: pl.DataFrame | None, layer: int, keeps) -> dict:
    """``{(sample_id, config, keep): (correct, prediction)}`` of eval's answers at ``layer``
    (the ``full`` control under its own keep N)."""
    if predictions is None:
        return {}
    p = predictions.filter(pl.col("agg_layer") == layer,
                           pl.col("keep").is_in(list(keeps)) | (pl.col("config") == "full"))
    return {(s, c, k): (bool(ok), pred) for s, c, k, ok, pred in
            p.select("sample_id", "config", "keep", "correct", "prediction").iter_rows()}


def example_sample_ids(samples: pl.DataFrame, n: int = 3, predictions: pl.DataFrame | None = None,
                       configs: list[str] | None = None, keep: int | None = None,
                       agg_layer: int | None = None) -> list[int]:
    """``n`` samples with different images: first those where the shown configurations at
    ``keep`` disagree (some answer right, some wrong), one per category while categories
    last, then the rest in sample order."""
    ids = samples["sample_id"].to_list()
    image = dict(zip(ids, samples["image"].to_list()))
    category = dict(zip(ids, samples["category"].to_list())) if "category" in samples.columns else {}
    mixed: set[int] = set()
    if predictions is not None and configs and keep is not None:
        p = predictions.filter(pl.col("config").is_in(configs), pl.col("keep") == keep)
        if agg_layer is not None:
            p = p.filter(pl.col("agg_layer") == agg_layer)
        agg = p.group_by("sample_id").agg(pl.col("correct").cast(pl.Int64).sum().alias("ok"), pl.len().alias("n"))
        mixed = set(agg.filter((pl.col("ok") > 0) & (pl.col("ok") < pl.col("n")))["sample_id"].to_list())
    order = [s for s in ids if s in mixed] + [s for s in ids if s not in mixed]
    chosen: list[int] = []
    for need_new_category in (True, False):
        for s in order:
            if len(chosen) == n:
                return chosen
            if s in chosen or image[s] in {image[c] for c in chosen}:
                continue
            if need_new_category and category.get(s) in {category.get(c) for c in chosen}:
                continue
            chosen.append(s)
    return chosen


def _draw_image_with_tokens(ax, image: np.ndarray | None, size: tuple[int, int], boxes, geometry,
                            extent: str = "crop", base_boxes=None):
    """The original image; for a grid over the processor's crop (``extent="crop"``) what the
    crop drops greyed out (dashed line: the crop); each kept grid token (``boxes``, original
    pixels) a cyan box with a black outline, each kept base-tile token (``base_boxes``) an
    orange dashed outline."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    w, h = size
    x0, y0, x1, y1 = image_grid.crop_box(w, h, geometry) if extent == "crop" else (0, 0, w, h)
    if image is not None:
        cols = (np.arange(w) + 0.5 < x0) | (np.arange(w) + 0.5 > x1)
        rows = (np.arange(h) + 0.5 < y0) | (np.arange(h) + 0.5 > y1)
        outside = rows[:, None] | cols[None, :]
        shown = image.copy()
        if outside.any():  # grey wash: still recognisable, clearly not what the model saw
            lum = shown[outside].mean(-1, keepdims=True)
            shown[outside] = 0.62 + 0.25 * (lum - 0.5)
        ax.imshow(shown, extent=(0, w, h, 0), interpolation="nearest")
    else:
        ax.add_patch(Rectangle((0, 0), w, h, facecolor="0.85", edgecolor="none"))
        ax.text(w / 2, h / 2, "image not found", ha="center", va="center", fontsize=8, color="0.3")
    if (x0, y0, x1, y1) != (0, 0, w, h):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black", linewidth=1.6,
                               linestyle="--", label="model crop"))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=0.8,
                               linestyle="--"))
    ax.set_xlim(min(0.0, x0), max(float(w), x1))
    ax.set_ylim(max(float(h), y1), min(0.0, y0))
    ax.set_facecolor("black")  # where the crop reaches past the image the processor padded (black)
    if boxes is not None and len(boxes):
        rects = [Rectangle((bx0, by0), bx1 - bx0, by1 - by0) for bx0, by0, bx1, by1 in boxes]
        ax.add_collection(PatchCollection(rects, facecolor=KEPT_FILL, edgecolor="black", linewidth=2.2,
                                          label="kept tokens"))
        ax.add_collection(PatchCollection([Rectangle(r.get_xy(), r.get_width(), r.get_height()) for r in rects],
                                          facecolor="none", edgecolor=KEPT_EDGE, linewidth=0.9))
    if base_boxes is not None and len(base_boxes):
        rects = [Rectangle((bx0, by0), bx1 - bx0, by1 - by0) for bx0, by0, bx1, by1 in base_boxes]
        ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="black", linewidth=3.0))
        ax.add_collection(PatchCollection([Rectangle(r.get_xy(), r.get_width(), r.get_height()) for r in rects],
                                          facecolor="none", edgecolor=BASE_EDGE, linewidth=2.0, linestyle="--",
                                          label="kept base-tile tokens"))
    ax.set_xticks([])
    ax.set_yticks([])


def kept_boxes(kept, layout, size: tuple[int, int], geometry, architecture: str = DEFAULT_ARCHITECTURE):
    """Where a sample's kept tokens came from, in original pixels: ``(grid boxes, base-tile
    boxes, off)`` with ``off`` the kept tokens drawn in neither (newlines, unplaced tiles)."""
    kept = np.asarray(kept, dtype=np.int64)
    w, h = size
    cells = layout.cells[kept]
    grid = cell_boxes(cells[cells >= 0], layout.rows, layout.cols, w, h, geometry, grid_extent(architecture)) \
        if layout.rows else np.zeros((0, 4))
    block = base_tile_tokens(layout, architecture)
    side = math.isqrt(len(block))
    in_base = np.flatnonzero(np.isin(block, kept))  # cells of the base tile, raster
    base = cell_boxes(in_base, side, side, w, h, geometry, "image") if side else np.zeros((0, 4))
    return grid, base, int(kept.size - len(grid) - len(base))


def plot_examples(selections: pl.DataFrame, samples: pl.DataFrame, n_examples: int = 3, keep: int | None = None,
                  agg_layer: int | None = None, predictions: pl.DataFrame | None = None,
                  geometry: image_grid.ImageGeometry | None = None, sample_ids: list[int] | None = None,
                  architecture: str = DEFAULT_ARCHITECTURE):
    """A few images (a different image per row), each method's kept tokens drawn on the original
    image where the processor really took them from, on each sample's own token grid
    (:func:`kept_boxes`): kept tokens as cyan boxes with a black outline, kept anyres
    base-tile tokens as orange dashed outlines (the base tile is the whole image at a coarser
    grid), the region the center crop drops greyed out (dashed line: the crop). The first
    column is the ``full`` control (every token kept: no boxes). Each panel title says whether
    that configuration answered right (check) or wrong (x) and what it said."""
    sel, layer, keep, configs = one_config_per_method(selections, keep, agg_layer)
    geometry = geometry or image_grid.DEFAULT_GEOMETRY
    layouts = token_layouts(samples, sel)
    ids = sample_ids if sample_ids is not None else example_sample_ids(samples, n_examples, predictions, configs,
                                                                         keep, layer)
    answers = _correctness(predictions, layer, [keep])
    columns = ["full"] + configs
    sizes, images = {}, {}
    for sid in ids:
        row = samples.filter(pl.col("sample_id") == sid).row(0, named=True)
        images[sid] = _load_image(row["image"])
        sizes[sid] = ((images[sid].shape[1], images[sid].shape[0]) if images[sid] is not None
                      else (geometry.crop_width, geometry.crop_height))
    ratios = [min(1.5, max(0.65, sizes[s][1] / sizes[s][0])) for s in ids] or [1.0]
    fig, axes = new_figure(width=3.0 * len(columns), height=sum(2.9 * r + 0.7 for r in ratios),
                        ncols=len(columns), nrows=max(1, len(ids)), gridspec_kw={"height_ratios": ratios})
    extent = grid_extent(architecture)
    for r, sid in enumerate(ids):
        row = samples.filter(pl.col("sample_id") == sid).row(0, named=True)
        w, h = sizes[sid]
        layout = layouts[int(sid)]
        n_tokens = layout.n_tokens
        for c, config in enumerate(columns):
            ax = axes[r, c]
            boxes = base = None
            off = 0
            if config != "full":
                k = sel.filter(pl.col("sample_id") == sid, pl.col("config") == config)["kept"]
                kept = np.asarray(k[0], dtype=int) if k.len() else np.zeros(0, dtype=int)
                boxes, base, off = kept_boxes(kept, layout, (w, h), geometry, architecture)
            _draw_image_with_tokens(ax, images[sid], (w, h), boxes, geometry, extent, base)
            label = f"full (all {n_tokens})" if config == "full" else method_label(config)
            answer = answers.get((sid, config, n_tokens if config == "full" else keep))
            if answer is None and config == "full":
                answer = next((v for (s, cf, _), v in answers.items() if s == sid and cf == "full"), None)
            note = f"\n+{off} kept off the image (newlines / tiles)" if off else ""
            if answer is None:
                ax.set_title(label + note, fontsize=9)
            else:
                ok, pred = answer
                ax.set_title(f"{label} {MARK[ok]} {str(pred)[:14]!r}{note}", fontsize=9,
                             color="#1a7f37" if ok else "#c62828")
            if c == 0:
                cropped = extent == "crop" and (w, h) != (geometry.crop_width, geometry.crop_height)
                grid = f"{layout.rows} x {layout.cols} grid" if layout.rows else "no grid"
                shape = f"{w}x{h} image, {grid}" + (", grey = cropped" if cropped else "")
                ax.set_ylabel(f"#{sid} {row.get('category') or ''}: {row['question'][:26]}\n"
                              f"answer: {str(row['answer'])[:20]}\n{shape}", fontsize=7.5)
    counts = sorted({layouts[int(s)].n_tokens for s in ids})
    of = f"of {counts[0]}" if len(counts) == 1 else "of each image's N"
    source = "" if not geometry.is_fallback or extent != "crop" else \
        " [processor config not found: LLaVA-1.5 defaults assumed]"
    base_note = "; orange dashed: kept base-tile tokens (the whole image, coarser)" if any(
        base_tile(layouts[int(s)], architecture) for s in ids) else ""
    crop_note = "; grey: cropped away by the processor" if extent == "crop" else ""
    fig.suptitle(f"Kept tokens (cyan boxes) at keep {keep} {of}, K={layer}; first column: full control\n"
                 f"\u2713/\u2717: that configuration's answer right/wrong{crop_note}{base_note}{source}",
                 fontsize=10)
    fig.tight_layout()
    return fig
