"""Section 7: per-sample last-token attention per head on the sample's own grid, beside the
image as the model saw it, and which samples to show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .. import grid as image_grid
from .examples import example_sample_ids
from .grids import DEFAULT_ARCHITECTURE, base_tile, base_tile_tokens, grid_extent, spatial_missing, token_layouts
from .style import grid_map, new_figure, tick_step
from .tables import RunTables


def attention_sample_ids(predictions: pl.DataFrame | None, samples: pl.DataFrame, n: int = 3,
                         agg_layer: int | None = None) -> list[tuple[int, str]]:
    """Samples worth a look at their attention, with why: first one the pruned ``avg_all_heads``
    at the smallest keep > 0 answers wrong and the ``full`` control right, then one both answer
    right, then another pruned-wrong one (of another category where there is one); different
    images. Without eval: the first samples with different images."""
    if predictions is None or predictions.filter(pl.col("method") == "avg_all_heads").height == 0:
        return [(s, "") for s in example_sample_ids(samples, n)]
    avg = predictions.filter(pl.col("method") == "avg_all_heads")
    layer = agg_layer if agg_layer is not None else avg["agg_layer"].min()
    p = predictions.filter(pl.col("agg_layer") == layer)
    keep = p.filter(pl.col("method") == "avg_all_heads", pl.col("keep") > 0)["keep"].min()
    pruned = dict(p.filter(pl.col("config") == "avg_all_heads", pl.col("keep") == keep)
                  .select("sample_id", "correct").iter_rows())
    full = dict(p.filter(pl.col("config") == "full").select("sample_id", "correct").iter_rows())
    ids = samples["sample_id"].to_list()
    image = dict(zip(ids, samples["image"].to_list()))
    category = dict(zip(ids, samples["category"].to_list())) if "category" in samples.columns else {}
    lost = [s for s in ids if pruned.get(s) is False and full.get(s) is True]
    kept_right = [s for s in ids if pruned.get(s) is True and full.get(s) is True]
    why_lost = f"avg_all_heads keep {keep} \u2717, full \u2713"
    why_right = f"avg_all_heads keep {keep} \u2713, full \u2713"
    chosen: list[tuple[int, str]] = []

    def take(pool, why, new_category=False):
        for s in pool:
            if any(image[s] == image[c] for c, _ in chosen):
                continue
            if new_category and any(category.get(s) == category.get(c) for c, _ in chosen):
                continue
            chosen.append((s, why))
            return True
        return False

    take(lost, why_lost)
    take(kept_right, why_right)
    take(lost, why_lost, new_category=True) or take(lost, why_lost)
    for s in ids:  # too few of either kind: fill with the first other images
        if len(chosen) >= n:
            break
        take([s], "")
    return chosen[:n]


def _attention_panels(att, layout, architecture: str, max_heads: int):
    """The maps of one sample's ``[H, N]`` attention: ``[(title, [rows, cols] map or None), ...]``
    — the head mean on the grid, on the anyres base tile where there is one, then each head
    on the grid (the max head marked); cells no token covers are NaN (drawn blank)."""
    from ..strategies import head_importance, max_head_index

    top = int(max_head_index(head_importance(att)))
    heads = list(range(min(att.shape[0], max_heads)))
    if top not in heads:
        heads[-1] = top
    att = att.numpy() if hasattr(att, "numpy") else np.asarray(att)
    on = np.flatnonzero(layout.cells >= 0)
    side = base_tile(layout, architecture)

    def on_grid(a):
        m = np.full(layout.rows * layout.cols, np.nan)
        m[layout.cells[on]] = a[on]
        return m.reshape(layout.rows, layout.cols)

    mean = att.mean(0)
    off = float(mean[layout.cells < 0].sum() / max(mean.sum(), 1e-30))
    note = f"\n({100 * off:.0f}% of it off the grid)" if (layout.cells < 0).any() else ""
    panels = [(f"mean over heads{note}", on_grid(mean))]
    if side:
        panels.append(("mean over heads: base tile", mean[base_tile_tokens(layout, architecture)].reshape(side, side)))
    panels += [(f"head {h}{' (max head)' if h == top else ''}", on_grid(att[h])) for h in heads]
    return panels


def _model_view_panel(ax, path, layout, geometry, extent: str):
    """The image as the model saw it, on the grid's coordinates: the processor's crop
    (``extent="crop"``) or the whole image resized to the grid."""
    rows, cols = layout.rows, layout.cols
    try:
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
            view = np.asarray(image_grid.model_view(im, geometry) if extent == "crop" else im.convert("RGB"))
        ax.imshow(view, extent=(0, cols, rows, 0), interpolation="bilinear", aspect="equal")
        what = f"{view.shape[1]}x{view.shape[0]} crop" if extent == "crop" else f"{rows} x {cols} grid"
        ax.set_title(f"image as the model saw it\n({size[0]}x{size[1]} -> {what})", fontsize=9)
    except (OSError, ValueError, TypeError):
        ax.text(0.5, 0.5, "image not found", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("image (not found)", fontsize=9)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks(np.arange(0, cols, tick_step(cols)) + 0.5, [str(t) for t in range(0, cols, tick_step(cols))])
    ax.set_yticks(np.arange(0, rows, tick_step(rows)) + 0.5, [str(t) for t in range(0, rows, tick_step(rows))])
    ax.grid(False)
    ax.set_xlabel("image column (patch)")


def plot_sample_attention(run_dir: str | Path, sample_id: int | list, agg_layer: int | None = None,
                          max_heads: int = 8, geometry: image_grid.ImageGeometry | None = None,
                          reasons: list[str] | None = None):
    """Samples' last-token attention at layer K-1 on each sample's own image-token grid, one
    row per sample: the image as the model saw it (the processor's center crop for LLaVA-1.5,
    the whole image for the families whose grid spans it, so its grid lines up with the maps),
    the head mean (what avg_all_heads ranks; anyres runs add it on the base tile) and each head
    (the max head marked), from the cached run. ``sample_id`` is one id or a list; each map
    has its own colour scale (attention in % of the last token's row). None when capture
    recorded no layer K > 0 or no chosen sample lies on a grid."""
    from ..store import open_run

    run = open_run(run_dir)
    layers = [k for k in run.agg_layers if k > 0]
    if agg_layer is None and not layers:
        return None  # K = 0 only: capture records no attention
    layer = agg_layer if agg_layer is not None else layers[0]
    geometry = geometry or image_grid.load_geometry(run.config.get("model"))
    architecture = run.config.get("architecture") or DEFAULT_ARCHITECTURE
    extent = grid_extent(architecture)
    ids = [int(sample_id)] if isinstance(sample_id, (int, np.integer)) else [int(s) for s in sample_id]
    reasons = dict(zip(ids, list(reasons or [""] * len(ids))))
    layouts = token_layouts(run.samples)
    ids = [s for s in ids if layouts[s].rows > 0]
    if not ids:
        return None
    rows = [(sid, _attention_panels(run.last_token_attention(sid, layer), layouts[sid], architecture, max_heads))
            for sid in ids]
    ncols = 1 + max(len(p) for _, p in rows)
    fig, axes = new_figure(width=3.3 * ncols, height=3.7 * len(rows), ncols=ncols, nrows=len(rows))
    for r, (sid, panels) in enumerate(rows):
        row = run.samples.filter(pl.col("sample_id") == sid).row(0, named=True)
        _model_view_panel(axes[r, 0], row["image"], layouts[sid], geometry, extent)
        why = f"\n[{reasons[sid]}]" if reasons.get(sid) else ""
        axes[r, 0].set_ylabel(f"#{sid}: {row['question'][:32]}\nfull model {row['prediction']!r}, reference "
                              f"{row['answer']!r}{why}", fontsize=8)
        for c, (title, a) in enumerate(panels, start=1):
            ax = axes[r, c]
            grid_map(ax, 100 * a, "viridis", "attention (% of the row)")
            ax.set_title(title, fontsize=9)
            base = title.endswith("base tile")
            ax.set_xlabel("base-tile column" if base else "image column (patch)")
            ax.set_ylabel("base-tile row" if base else "image row (patch)")
        for c in range(1 + len(panels), ncols):
            axes[r, c].axis("off")
    if len(rows) == 1:
        row = run.samples.filter(pl.col("sample_id") == ids[0]).row(0, named=True)
        fig.suptitle(f"Sample {ids[0]}: last-token attention to the image at layer {layer - 1} "
                     f"(\"{row['question'][:40]}\" -> {row['prediction']!r}, reference {row['answer']!r})")
    else:
        fig.suptitle(f"Last-token attention to the image at layer K-1={layer - 1}, per head, next to the image "
                     f"(each map its own colour scale)")
    fig.tight_layout()
    return fig


def attention_examples(t: RunTables):
    """:func:`plot_sample_attention` of up to three samples on a grid (:func:`attention_sample_ids`)."""
    if spatial_missing("sample_attention", t):
        return None
    ids = [s for s, lay in token_layouts(t.samples).items() if lay.rows > 0]
    on_grid = t.samples.filter(pl.col("sample_id").is_in(ids))
    preds = None if t.predictions is None else t.predictions.filter(pl.col("sample_id").is_in(ids))
    picks = attention_sample_ids(preds, on_grid, n=3)
    return plot_sample_attention(t.root, [s for s, _ in picks], geometry=t.geometry, reasons=[w for _, w in picks])
