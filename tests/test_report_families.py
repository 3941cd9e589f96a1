"""The report for every supported family: each section draws on the sample's own grid (an
anyres base tile beside the high-resolution grid, Qwen's per-image grid) or says in one line
why it cannot. One tiny checkpoint per family (its adapter module's ``Family.tiny``), three images
of different sizes, one keep, K = 2 captured."""

import re

import nbformat
import numpy as np
import pytest

from fastv_analysis import report
from fastv_analysis.adapters import registry
from fastv_analysis.layout import TokenLayout
from conftest import write_sized_questions
from test_adapters import SUPPORTED, sizes

SPATIAL = ("sample_attention", "keep_frequency", "examples")


def _family_run(arch, root):
    from fastv_analysis.cli.main import main

    model = registry()[arch].tiny(root / "m", seed=1)
    data = root / "d"
    write_sized_questions(data, sizes(arch) + [(120, 80)], "q.jsonl")
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data / "q.jsonl"), "--out", str(run),
                 "--agg-layers", "0,2", "--max-new-tokens", "2", "--quiet"]) == 0
    assert main(["select", str(run), "--keep", "3", "--alphas", "0.5", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    return run


def _sections(executed):
    """{heading: outputs of the code cells under it} of the executed report notebook."""
    out, heading = {}, None
    for cell in nbformat.read(executed, as_version=4).cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("#"):
            heading = cell.source.splitlines()[0].lstrip("# ").strip()
            out[heading] = []
        elif cell.cell_type == "code" and heading:
            out[heading] += cell.get("outputs", [])
    return out


def _has_figure(outputs):
    return any("image/png" in o.get("data", {}) for o in outputs)


def _reasons(outputs):
    """The one-line reasons (a markdown line: `no_figure`'s italic one, or the section's note) among the outputs."""
    texts = ["".join(o.get("data", {}).get("text/markdown", "")).strip() for o in outputs]
    return [t for t in texts if t.startswith(("_No ", "No ", "_no ")) and "\n" not in t]


@pytest.mark.parametrize("arch", SUPPORTED)
def test_report_has_every_section_for_every_family(arch, tmp_path):
    run = _family_run(arch, tmp_path)
    sections = _sections(run / "report.ipynb")
    figure_sections = [h for h in sections if re.match(r"(\d+|2b)\. ", h)]
    assert len(figure_sections) >= 14
    for heading in figure_sections:
        outputs = sections[heading]
        if heading.startswith(("15.", "16.")):  # tables under a one-line summary
            continue
        assert _has_figure(outputs) or len(_reasons(outputs)) == 1, f"{arch}: section {heading!r} is silent"
    by_number = {h.split(".")[0]: sections[h] for h in figure_sections}
    for number in ("7", "8", "9"):  # attention maps, keep frequency, examples: drawn on every family's grid
        assert _has_figure(by_number[number]), f"{arch}: section {number} has no figure"
    html = (run / "report.html").read_text()
    assert "no attention was captured" not in html
    tables = report.load_tables(run)
    assert tables.architecture == arch
    for name in SPATIAL:
        assert report.why_missing(name, tables) is None, (arch, name)
        assert (run / "figures" / f"{name}.png").exists(), (arch, name)
    note = report.grid_note(tables.samples, tables.architecture)
    grids = {(r, c) for r, c in tables.samples.select("grid_rows", "grid_cols").rows()}
    assert all(f"{r} x {c}" in note for r, c in grids)
    if arch == "LlavaForConditionalGeneration":
        assert grids == {(24, 24)} and "center crop" in note
    else:
        assert "24 x 24" not in note and "whole image" in note
    if arch.startswith("LlavaNext") or arch.startswith("LlavaOnevision"):  # base tile beside the grid
        assert "base tile" in note
        fig = report.figure("keep_frequency", tables, save=False)
        titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert any(": base tile" in t for t in titles) and any(t.startswith("avg_all_heads\n") for t in titles)


def test_spatial_sections_say_why_in_one_line_without_attention_or_grid(tmp_path):
    """K = 0 only: no attention maps (named as such), keep frequency and examples still drawn;
    samples without a layout on a grid: one line naming it."""
    import polars as pl

    samples = pl.DataFrame({"sample_id": [0, 1], "image": ["a.png", "b.png"], "question": ["q", "q"],
                            "answer": ["a", "a"], "n_image_tokens": [6, 6], "grid_rows": [0, 0], "grid_cols": [0, 0],
                            "token_cells": [[-1] * 6, [-1] * 6]})
    sel = pl.DataFrame([{"sample_id": s, "agg_layer": 0, "method": m, "alpha": None, "config": m, "keep": 2,
                         "keep_ratio": 2 / 6, "kept": [0, 3]} for s in (0, 1) for m in ("random", "uniform")],
                       schema_overrides={"alpha": pl.Float64})
    tables = report.RunTables(root=tmp_path, samples=samples, selections=sel, overlap_summary=None, heads=None,
                              accuracy=None, predictions=None, relations=None, num_heads=None)
    why = report.why_missing("sample_attention", tables)
    assert why.startswith("No attention-map figure: capture recorded the attention of no layer K > 0")
    assert "--agg-layers" in why and "\n" not in why
    assert report.why_missing("keep_frequency", tables) == (
        "No keep-frequency figure: no sample's image tokens lie on a grid (their layout is unknown: capture "
        "predates layouts).")
    assert report.why_missing("examples", tables) is None


def test_kept_boxes_on_an_anyres_layout_and_a_whole_image_grid():
    """LLaVA-NeXT: 4 base-tile tokens (2 x 2) then a 2 x 3 grid with newlines; the grid and the
    base tile each span the whole 300 x 200 image (hand-computed boxes)."""
    layout = TokenLayout.anyres(4, 2, 3)  # tokens 0-3 base, 4-6 row 0, 7 newline, 8-10 row 1, 11 newline
    grid, base, off = report.kept_boxes([1, 5, 10, 11], layout, (300, 200), None, "LlavaNextForConditionalGeneration")
    assert grid.tolist() == [[100, 0, 200, 100], [200, 100, 300, 200]]  # cells 1 and 5 of the 2 x 3 grid
    assert base.tolist() == [[150, 0, 300, 100]]  # base cell 1: top right of a 2 x 2 tile over the image
    assert off == 1  # the newline
    qwen = TokenLayout.grid(2, 3)
    grid, base, off = report.kept_boxes([0, 5], qwen, (300, 200), None, "Qwen2VLForConditionalGeneration")
    assert grid.tolist() == [[0, 0, 100, 100], [200, 100, 300, 200]] and len(base) == 0 and off == 0
    # an InternVL run captured before tiles were placed (tiles off the grid, the thumbnail on it): the tiles
    # are counted, not drawn, and no base tile is read into them
    intern = TokenLayout(2, 2, np.array([-1] * 8 + [0, 1, 2, 3]))
    grid, base, off = report.kept_boxes([0, 9], intern, (300, 200), None, "InternVLForConditionalGeneration")
    assert grid.tolist() == [[150, 0, 300, 100]] and len(base) == 0 and off == 1
    # InternVL's tiles on the grid and the thumbnail after it, drawn as a base tile over the whole image
    from fastv_analysis.adapters.internvl import tiles_layout

    tiled = tiles_layout(2, 1, 2)  # 2 tiles of 2 x 2 on a 2 x 4 grid, then the thumbnail: tokens 8-11
    assert report.base_tile(tiled, "InternVLForConditionalGeneration") == 2
    grid, base, off = report.kept_boxes([4, 11], tiled, (300, 200), None, "InternVLForConditionalGeneration")
    assert grid.tolist() == [[150, 0, 225, 100]] and base.tolist() == [[150, 100, 300, 200]] and off == 0
