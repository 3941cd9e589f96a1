"""The report: figure functions and the notebook executed headless into HTML."""

import itertools
import json
import re
import shutil

import numpy as np
import polars as pl
import pytest
from PIL import Image

from conftest import write_questions
from fastv_analysis import report
from fastv_analysis.cli.main import main


def _with_object_boxes(lines, folder):
    """Ground-truth boxes on every question, so the object-coverage figure has data."""
    import json

    return [json.dumps({**json.loads(x), "objects": [[0, 0, 70, 70], [196, 140, 336, 210]]}) for x in lines]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    from fastv_analysis.toy.checkpoint import save_tiny_random_checkpoint

    root = tmp_path_factory.mktemp("report")
    model = save_tiny_random_checkpoint(root / "m", seed=3, text={"num_hidden_layers": 3, "num_attention_heads": 4,
                                                                   "num_key_value_heads": 2})
    data = write_questions(root / "d", n=6, broken=_with_object_boxes)
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data), "--out", str(run), "--quiet",
                 "--max-new-tokens", "2"]) == 0
    assert main(["select", str(run), "--keep", "64,16", "--alphas", "0:1:0.5", "--quiet"]) == 0
    assert main(["eval", str(run), "--quiet"]) == 0
    return run


FIGURE_NAMES = ["accuracy_vs_keep", "accuracy_vs_alpha", "category_accuracy", "cost", "overlap_heatmap",
                "head_statistics", "keep_frequency", "examples", "sample_attention", "relations", "object_coverage",
                "positional_bias", "attention_sinks", "query_choice", "layer_dynamics", "methods_cost",
                "methods_statistics"]
NEEDS_STORE = {"attention_sinks", "query_choice", "layer_dynamics"}  # need capture --store data (and select --queries)


def test_figure_registry():
    assert list(report.FIGURES) == FIGURE_NAMES and set(report.NEEDS) == set(FIGURE_NAMES)
    assert len(report.FIGURES) == 17


def test_figure_functions_label_everything(evaluated_run):
    import matplotlib.pyplot as plt

    tables = report.load_tables(evaluated_run)
    for name in report.FIGURES:
        fig = report.figure(name, tables, save=False)
        if name in NEEDS_STORE:  # captured without --store: no figure, and a line that says why
            assert fig is None and report.why_missing(name, tables), name
            continue
        assert fig is not None, name
        assert fig.axes, name
        panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert fig._suptitle is not None or all(ax.get_title() for ax in panels), f"{name} has no title"
        if name == "examples":  # image grid: every panel titled with its method and answer, every row with its question
            n_cols = len({ax.get_subplotspec().colspan.start for ax in panels})
            assert all(ax.get_title() for ax in panels)
            assert all(("\u2713" in ax.get_title()) != ("\u2717" in ax.get_title()) for ax in panels)
            assert all(ax.get_ylabel() for ax in panels[::n_cols])
            assert panels[0].get_title().startswith("full")
        elif name in ("overlap_heatmap", "keep_frequency", "category_accuracy"):  # one titled panel per keep / method
            assert all(ax.get_title() for ax in panels)
            assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels), name
        elif name == "sample_attention":  # per row: the image, then titled maps
            assert panels[0].images and panels[0].get_ylabel()
            assert all(ax.get_title() for ax in panels if ax.axison)
        else:
            main_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_xlabel()]
            assert main_axes and all(ax.get_ylabel() for ax in main_axes), f"{name} lacks axis labels"
        plt.close(fig)


def test_sample_explorer_notebook_runs(evaluated_run, tmp_path):
    """Opened from notebooks/, its default-style relative run_dir ("runs/demo") resolves from the folder above."""
    import papermill as pm

    fig = report.plot_sample_attention(evaluated_run, 2)
    assert len(fig.axes) >= 6 and fig._suptitle is not None  # image + mean + 4 heads (+ colorbars)
    assert fig.axes[0].images  # the image as the model saw it comes first
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(evaluated_run, target_is_directory=True)
    (tmp_path / "notebooks").mkdir()
    out = tmp_path / "explorer.ipynb"
    pm.execute_notebook(str(report.NOTEBOOK.parent / "sample_explorer.ipynb"), str(out),
                        parameters={"run_dir": "runs/demo", "sample_id": 1}, kernel_name="python3",
                        progress_bar=False, cwd=str(tmp_path / "notebooks"))
    import nbformat

    nb = nbformat.read(out, as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2


def test_report_notebook_writes_html_and_figures(evaluated_run, capfd):
    assert main(["report", str(evaluated_run)]) == 0
    captured = capfd.readouterr()  # file-descriptor level: what the kernel process prints too
    assert "without encryption" not in captured.err and "Kernel is running over TCP" not in captured.err
    assert captured.out.strip().startswith("report: ") and len(captured.out.strip().splitlines()) == 1
    figures = sorted((evaluated_run / "figures").glob("*.png"))
    assert {p.stem for p in figures} == set(report.FIGURES) - NEEDS_STORE
    for p in figures:
        with Image.open(p) as im:
            assert im.width > 300 and im.height > 200, p.name
            assert len(np.unique(np.asarray(im.convert("L")))) > 10, f"{p.name} is blank"
    html = (evaluated_run / "report.html").read_text()
    assert len(re.findall(r'<img[^>]* src="data:image/png;base64,', html)) >= len(figures)
    assert "Main numbers" in html and "Traceback" not in html
    provenance = json.loads((evaluated_run / "report.json").read_text())
    assert sorted(provenance["figures"]) == sorted(p.name for p in figures) and "versions" in provenance
    assert not list(evaluated_run.glob(".report.tmp-*")) and not list((evaluated_run / "figures").glob(".*"))
    assert not re.search(r'<img[^>]* src="(?!data:)', html)  # opens on its own: no external images
    # the main table: whole config names, no dtype row, p-values in scientific notation
    assert "weighted_combination(alpha=0.5)" in html and "weighted_combination(alpha=0.…" not in html
    assert not re.search(r"<td>(str|i64|f64)</td>", html) and "shape: (" not in html
    assert len(figures) == 14
    # a capture without --store: each section that needs it says so in one line, the rest draw
    for line in ("capture with --store hidden_norm", "capture with --store layers", "select compared no query variant",
                 "Against random at the same keep", "The oracle could add at most"):
        assert line in html, line
    assert "mean_row" in html and "oracle_gain_pts" in html and "rule_cv_%" in html


def test_report_on_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err.strip()
    assert "run.json is missing" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------
# Figures that explain (issue 12.6)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 5, 7])
def test_chance_jaccard_matches_brute_force(n):
    for k in range(1, n + 1):
        subsets = [set(c) for c in itertools.combinations(range(n), k)]
        brute = np.mean([len(a & b) / len(a | b) for a in subsets for b in subsets])
        assert report.chance_jaccard(n, k) == pytest.approx(brute, abs=1e-12), (n, k)
    assert np.isnan(report.chance_jaccard(n, 0)) and report.chance_jaccard(n, n) == 1.0
    # hand-computed: N = 4, k = 2: I = 0 (1/6), 1 (4/6), 2 (1/6) -> J = 0, 1/3, 1 -> 4/18 + 1/6 = 7/18
    assert report.chance_jaccard(4, 2) == pytest.approx(7 / 18)


def test_overlap_heatmap_marks_chance(evaluated_run):
    import matplotlib.pyplot as plt

    tables = report.load_tables(evaluated_run)
    fig = report.figure("overlap_heatmap", tables, save=False)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    for ax, keep in zip(panels, (64, 16)):
        chance = report.chance_jaccard(576, keep)
        assert f"keep {keep}" in ax.get_title() and f"chance Jaccard {chance:.3f}" in ax.get_title()
        norm = ax.collections[0].norm
        assert norm.vcenter == pytest.approx(chance)  # the colour scale is centred (white) on chance
        cbar = ax.collections[0].colorbar
        assert any("chance" in t.get_text() for t in cbar.ax.get_yticklabels())
    plt.close(fig)


def test_keep_frequency_scales(evaluated_run):
    import matplotlib.pyplot as plt

    tables = report.load_tables(evaluated_run)
    fig = report.figure("keep_frequency", tables, save=False)
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_label() != "<colorbar>"}
    assert panels["uniform"].images[0].norm.vmax == pytest.approx(100)  # its own scale
    assert "own scale 0-100%" in panels["uniform"].get_title()
    shared = [ax for name, ax in panels.items() if name != "uniform"]
    tops = {ax.images[0].norm.vmax for ax in shared}
    assert len(tops) == 1 and tops.pop() < 100  # one scale for the rest, not washed out by uniform's 100 %
    assert all("shared scale" in ax.get_title() for ax in shared)
    plt.close(fig)


def _synthetic_examples(tmp_path):
    """Three samples on three differently shaped/coloured images, two methods at keep 4, answers."""
    from PIL import ImageDraw

    images = []
    wide = Image.new("RGB", (672, 336), "white")  # the crop keeps x in [168, 504)
    ImageDraw.Draw(wide).rectangle((0, 0, 100, 100), fill="red")
    tall = Image.new("RGB", (100, 200), "black")  # the crop keeps y in [50, 150)
    square = Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8))
    for name, im in (("wide", wide), ("tall", tall), ("square", square)):
        im.save(tmp_path / f"{name}.png")
        images.append(str(tmp_path / f"{name}.png"))
    samples = pl.DataFrame({"sample_id": [0, 1, 2, 3], "image": images + [images[0]],
                            "question": ["How many?", "What color?", "Is there?", "Same image again?"],
                            "answer": ["two", "red", "yes", "no"], "category": ["count", "color", "exist", "exist"]})
    kept = {"avg_all_heads": [0, 23, 300, 575], "random": [1, 2, 3, 4]}
    sel = pl.DataFrame([{"sample_id": s, "agg_layer": 2, "method": m, "alpha": None, "config": m, "keep": 4,
                         "keep_ratio": 4 / 576, "kept": k} for s in range(4) for m, k in kept.items()],
                       schema_overrides={"alpha": pl.Float64})
    preds = pl.DataFrame([{"sample_id": s, "agg_layer": 2, "config": c, "method": c, "alpha": None, "keep": k,
                           "correct": ok, "prediction": p} for s in range(4)
                          for c, k, ok, p in (("full", 576, True, "two"), ("avg_all_heads", 4, False, "three"),
                                              ("random", 4, True, "two"))], schema_overrides={"alpha": pl.Float64})
    return samples, sel, preds


def _kept_boxes(ax):
    coll = [c for c in ax.collections if c.get_label() == "kept tokens"]
    if not coll:
        return np.zeros((0, 4))
    ext = [p.get_extents() for p in coll[0].get_paths()]
    return np.array([[e.x0, e.y0, e.x1, e.y1] for e in ext])


def test_examples_draw_tokens_where_the_processor_took_them(tmp_path):
    import matplotlib.pyplot as plt

    from fastv_analysis.grid import DEFAULT_GEOMETRY

    samples, sel, preds = _synthetic_examples(tmp_path)
    fig = report.plot_examples(sel, samples, n_examples=4, predictions=preds, geometry=DEFAULT_GEOMETRY)
    axes = np.array([ax for ax in fig.axes]).reshape(-1, 3)  # columns: full, avg_all_heads, random
    assert axes.shape[0] == 3  # sample 3 repeats sample 0's image: left out, one image per row
    titles = [[ax.get_title() for ax in row] for row in axes]
    assert all(t[0].startswith("full") and "\u2713" in t[0] for t in titles)
    assert all("avg_all_heads \u2717 'three'" == t[1] and "random \u2713" in t[2] for t in titles)
    by_image = {}
    for row in axes:
        label = row[0].get_ylabel()
        by_image["wide" if "672x336" in label else "tall" if "100x200" in label else "square"] = row
    assert set(by_image) == {"wide", "tall", "square"}
    assert len(_kept_boxes(by_image["wide"][0])) == 0  # full: every token, no boxes
    wide = _kept_boxes(by_image["wide"][1])  # tokens 0, 23, 300, 575 in original 672 x 336 pixels
    assert wide[:, 0].min() == pytest.approx(168) and wide[:, 2].max() == pytest.approx(504)
    assert sorted(map(tuple, np.round(wide, 3)))[0] == (168.0, 0.0, 182.0, 14.0)
    tall = _kept_boxes(by_image["tall"][1])
    assert tall[:, 1].min() == pytest.approx(50) and tall[:, 3].max() == pytest.approx(150)
    assert by_image["wide"][1].get_xlim() == (0.0, 672.0)  # the whole image is drawn, not squashed
    # the cropped-away part is greyed out (not hidden): the red corner is grey, the kept centre white
    shown = by_image["wide"][1].images[0].get_array()
    corner, centre = np.asarray(shown[50, 50]), np.asarray(shown[168, 336])
    assert np.ptp(corner) < 0.05 and 0.3 < corner.mean() < 0.9
    assert np.allclose(centre, 1.0)
    plt.close(fig)


def test_category_accuracy(tmp_path):
    import matplotlib.pyplot as plt

    _, _, preds = _synthetic_examples(tmp_path)
    preds = preds.with_columns(pl.Series("category", ["count"] * 6 + ["color"] * 3 + ["exist"] * 3))
    table = report.category_accuracy(preds)
    row = table.filter(pl.col("config") == "avg_all_heads", pl.col("category") == "count")
    assert row["n"][0] == 2 and row["accuracy_%"][0] == 0.0
    assert table.filter(pl.col("config") == "random", pl.col("category") == "count")["accuracy_%"][0] == 100.0
    wide = report.category_table(preds)
    assert {"count % (n=2)", "color % (n=1)", "exist % (n=1)", "all %"} <= set(wide.columns)
    fig = report.plot_category_accuracy(preds)
    ax = [a for a in fig.axes if a.get_label() != "<colorbar>"][0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["color\n(n=1)", "count\n(n=2)", "exist\n(n=1)"]
    assert ax.get_yticklabels()[0].get_text().startswith("full")
    plt.close(fig)
    no_categories = preds.with_columns(pl.lit("").alias("category"))
    assert report.category_accuracy(no_categories) is None and report.plot_category_accuracy(no_categories) is None


def test_cost_figure_places_full_at_one(evaluated_run):
    import matplotlib.pyplot as plt

    tables = report.load_tables(evaluated_run)
    fig = report.plot_cost(tables.accuracy)
    left, right = fig.axes[:2]
    assert "FLOPs" in left.get_xlabel() and "speed-up" in right.get_xlabel()
    for ax in (left, right):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(t.startswith("full control") for t in labels) and "avg_all_heads" in labels
        full = [line for line in ax.get_lines() if line.get_marker() == "*"][0]
        assert full.get_xdata()[0] == 1.0
    plt.close(fig)


def test_resolve_run_dir(tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "run.json").write_text("{}")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert report.resolve_run_dir("runs/demo") == report.Path("..") / "runs" / "demo"
    monkeypatch.chdir(tmp_path)
    assert report.resolve_run_dir("runs/demo") == report.Path("runs/demo")
    assert report.resolve_run_dir("runs/nope") == report.Path("runs/nope")  # as given: the error names it


# ----------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, nothing left behind (issue 12.7)
# ----------------------------------------------------------------------------------------


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_report_before_select_is_one_line_and_writes_nothing(evaluated_run, tmp_path, capfd):
    run = tmp_path / "captured-only"
    run.mkdir()
    for name in ("run.json", "samples.parquet"):
        shutil.copy(evaluated_run / name, run / name)
    before = _listing(run)
    assert main(["report", str(run)]) != 0
    out, err = capfd.readouterr()
    assert len(err.strip().splitlines()) == 1 and "select/selections.parquet" in err and "select" in err
    assert "figures" not in out
    assert _listing(run) == before  # no figures/, no report.*, no temporary files


def _bad_notebook(path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell('run_dir = "x"', metadata={"tags": ["parameters"]}),
                             new_code_cell("print('fine')"),
                             new_code_cell("numbers = {'a': 1}\nnumbers['b'] / 0")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def test_failing_report_prints_one_line_and_leaves_no_debris(evaluated_run, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run, ignore=shutil.ignore_patterns("report*", "figures"))
    before = _listing(run)
    bad = _bad_notebook(tmp_path / "bad.ipynb")
    assert main(["report", str(run), "--notebook", str(bad)]) != 0
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "KeyError: 'b'" in lines[0] and "cell 3 of bad.ipynb" in lines[0] and "report-error.log" in lines[0]
    assert "without encryption" not in err and not out.strip()
    assert _listing(run) == sorted(before + ["report-error.log"])  # no .report.tmp-*, no report.*
    log = (run / "report-error.log").read_text()
    assert "KeyError" in log and "numbers['b'] / 0" in log and "\x1b[" not in log
    # --verbose prints the traceback as well; a later good report removes the stale log
    assert main(["report", str(run), "--notebook", str(bad), "--verbose"]) != 0
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) > 3 and "KeyError" in err
    assert not list(run.glob(".report.tmp-*"))


def test_kernel_stderr_keeps_real_messages_drops_the_tcp_notice(evaluated_run, tmp_path, capfd):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run, ignore=shutil.ignore_patterns("report*", "figures"))
    nb = new_notebook(cells=[new_code_cell('run_dir = "x"', metadata={"tags": ["parameters"]}),
                             new_code_cell("import os\nos.write(2, b'a real message from the kernel process\\n')")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, tmp_path / "writes-stderr.ipynb")
    assert main(["report", str(run), "--notebook", str(tmp_path / "writes-stderr.ipynb")]) == 0
    err = capfd.readouterr().err
    assert "a real message from the kernel process" in err
    assert "without encryption" not in err
    assert not list(run.glob(".report*")) and (run / "report.html").exists()


# ----------------------------------------------------------------------------------------
# Analyses as report sections (issue 15.5)
# ----------------------------------------------------------------------------------------


def _two_grids():
    """Sample 0: a 2 x 2 grid, token i on cell i. Sample 1: one off-grid base token, then the
    same 2 x 2 grid with a newline token after each row: cells [-1, 0, 1, -2, 2, 3, -2]."""
    from fastv_analysis.layout import TokenLayout

    rows = [{"sample_id": 0, "n_image_tokens": 4, **TokenLayout.grid(2, 2).to_row()},
            {"sample_id": 1, "n_image_tokens": 7, **TokenLayout.anyres(1, 2, 2).to_row()}]
    assert rows[1]["token_cells"] == [-1, 0, 1, -2, 2, 3, -2]
    return pl.DataFrame(rows)


def _selections(kept: dict, keep: int = 2, layer: int = 2) -> pl.DataFrame:
    """``kept``: {config: {sample_id: kept token indices}}."""
    return pl.DataFrame([{"sample_id": s, "agg_layer": layer, "method": c, "alpha": None, "config": c, "keep": keep,
                          "kept": k} for c, per in kept.items() for s, k in per.items()],
                        schema_overrides={"alpha": pl.Float64, "kept": pl.List(pl.Int32)})


def test_positional_bias_profiles_kept_rows_on_each_samples_own_grid():
    samples = _two_grids()
    sel = _selections({"avg_all_heads": {0: [2, 3], 1: [4, 5]}, "random": {0: [0, 3], 1: [0, 3]}})
    # avg_all_heads keeps the bottom row in both samples: row centres (1 + 0.5) / 2 = 0.75 (x4),
    # columns 0.25 and 0.75 twice. random: sample 0 keeps cells 0 and 3 (rows 0.25, 0.75);
    # in sample 1 tokens 0 and 3 are the base tile and a newline, not on the grid: left out.
    profile = report.position_profile(sel, samples)  # default bins: the 2 x 2 grid's
    share = {(c, a): d.sort("bin")["share"].to_list() for (c, a), d in profile.group_by("config", "axis")}
    assert share[("avg_all_heads", "row")] == [0.0, 1.0] and share[("avg_all_heads", "column")] == [0.5, 0.5]
    assert share[("random", "row")] == [0.5, 0.5] and share[("random", "column")] == [0.5, 0.5]
    summary = {r["config"]: r for r in report.position_summary(sel, samples).iter_rows(named=True)}
    assert summary["avg_all_heads"]["mean_row"] == 0.75 and summary["avg_all_heads"]["bottom_half_%"] == 100.0
    assert summary["avg_all_heads"]["kept_on_grid"] == 4 and summary["random"]["kept_on_grid"] == 2
    assert summary["random"]["mean_row"] == 0.5 and summary["random"]["samples"] == 2
    fig = report.plot_positional_bias(sel, samples)
    ax_rows = fig.axes[0]
    assert "mean row 0.75" in " ".join(t.get_text() for t in ax_rows.get_legend().get_texts())
    assert "no_rope" in fig._suptitle.get_text()  # says which compared configuration the run lacks
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_attention_sinks_kept_share_and_map_from_hand_made_masks():
    from fastv_analysis.layout import TokenLayout

    samples = pl.DataFrame([{"sample_id": s, "n_image_tokens": 4, **lay.to_row()} for s, lay in
                            ((0, TokenLayout.grid(2, 2)), (1, TokenLayout.grid(2, 2)), (2, TokenLayout.grid(1, 4)))])
    masks = {0: np.array([True, False, False, False]), 1: np.array([True, False, False, True]),
             2: np.array([False, True, False, False])}
    sel = _selections({"avg_all_heads": {0: [0, 1], 1: [0, 1]}, "random": {0: [2, 3], 1: [2, 3]}})
    share = {r["config"]: r for r in report.sink_keep_share(sel, masks).iter_rows(named=True)}
    # 3 sinks in samples 0 and 1; avg_all_heads keeps token 0 in both (2 of 3), random token 3 of sample 1 (1 of 3)
    assert (share["avg_all_heads"]["sinks"], share["avg_all_heads"]["kept_sinks"]) == (3, 2)
    assert share["avg_all_heads"]["share_kept"] == pytest.approx(2 / 3)
    assert share["random"]["share_kept"] == pytest.approx(1 / 3) and share["random"]["flat"] == 0.5  # keep 2 of 4
    freq, n, off = report.sink_map(samples, masks)
    # the 2 x 2 grid is the most common (samples 0 and 1; the 1 x 4 sample 2 is left out):
    # cell 0 holds a sink in both, cell 3 in one of two
    assert n == 2 and off == 0 and freq.tolist() == [[1.0, 0.0], [0.0, 0.5]]
    heads = pl.DataFrame({"sample_id": [0, 1, 2], "agg_layer": [2] * 3, "sink_count": [1, 2, 1],
                          "sink_mass": [0.5, 0.25, 0.0]})
    note = report.sink_note(masks, heads)
    assert note.startswith("Attention sinks") and "in 3 of 3 samples" in note
    assert "25.0%" in note  # the mean sink_mass of 0.5, 0.25 and 0
    fig = report.plot_attention_sinks(heads, masks, samples, sel)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 and all(ax.get_title() and ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_attention_sinks_say_so_in_one_line_when_there_are_none():
    none = {0: np.zeros(4, dtype=bool), 1: np.zeros(4, dtype=bool)}
    note = report.sink_note(none)
    assert "No attention sinks" in note and f"{report.sink_ratio():g}x" in note and "SINK_RATIO" in note
    assert len(note.splitlines()) == 1
    assert report.plot_attention_sinks(None, none, _two_grids(), _selections({"random": {0: [0, 1]}})) is None
    assert "--store hidden_norm" in report.sink_note(None)  # not captured at all


def test_layer_dynamics_jaccard_and_entropy_by_hand():
    att = np.zeros((3, 2, 4))  # [L, H, N]
    att[0] = [4, 3, 2, 1]  # both heads: mean [4, 3, 2, 1], top-2 {0, 1}
    att[1] = [1, 2, 3, 4]  # the reference layer K-1 = 1: top-2 {2, 3}
    att[2, 0] = [0, 2, 0, 0]
    att[2, 1] = [0, 0, 0, 2]  # head mean [0, 1, 0, 1]: top-2 {1, 3} (a single head would give another set)
    frame = report.layer_dynamics([att, att.copy()], k=2, ref_layer=1)
    # Jaccard with {2, 3}: {0, 1} -> 0; itself -> 1; {1, 3} -> |{3}| / |{1, 2, 3}| = 1/3
    assert frame["jaccard"].to_list() == pytest.approx([0.0, 1.0, 1 / 3])
    # entropy of p = [.4, .3, .2, .1] (either order) over ln 4:
    # -(.4 ln .4 + .3 ln .3 + .2 ln .2 + .1 ln .1) = 1.279854, / 1.386294 = 0.923220;
    # p = [0, .5, 0, .5]: ln 2 / ln 4 = 0.5
    assert frame["entropy"].to_list() == pytest.approx([0.923220, 0.923220, 0.5], abs=1e-6)
    assert frame["n"].to_list() == [2, 2, 2] and frame["jaccard_lo"].to_list() == pytest.approx([0.0, 1.0, 1 / 3])
    fig = report.plot_layer_dynamics(frame, n_tokens=4)
    assert all(ax.get_title() and ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_query_agreement_pairs_the_last_token_with_its_query_variants():
    def pair(a, b, j):
        return {"agg_layer": 2, "keep": 16, "config_a": a, "config_b": b, "n": 10, "jaccard_mean": j,
                "jaccard_lo": j - 0.1, "jaccard_hi": j + 0.1, "spearman_mean": 0.5}

    overlap = pl.DataFrame([pair("avg_all_heads", "avg_all_heads@text_mean", 0.3),
                            pair("avg_all_heads@all_mean", "avg_all_heads", 0.1),  # either order
                            pair("avg_all_heads", "random", 0.02)])
    accuracy = pl.DataFrame({"agg_layer": [2, 2], "keep": [16, 16],
                             "config": ["avg_all_heads", "avg_all_heads@text_mean"], "accuracy": [0.6, 0.7]})
    agreement = report.query_agreement(overlap, accuracy, n_tokens=576)
    rows = {r["query"]: r for r in agreement.iter_rows(named=True)}
    assert set(rows) == {"text_mean", "all_mean"}  # the random pair is no query variant
    assert rows["text_mean"]["jaccard"] == 0.3 and rows["all_mean"]["jaccard"] == 0.1
    assert rows["text_mean"]["chance"] == pytest.approx(report.chance_jaccard(576, 16))
    assert rows["text_mean"]["accuracy_%"] == pytest.approx(70) and rows["all_mean"]["accuracy_%"] is None
    assert rows["all_mean"]["last_accuracy_%"] == pytest.approx(60)  # the last token's, for comparison
    table = report.query_table(agreement)
    assert table.filter(pl.col("query") == "text_mean vs last")["change_pts"][0] == pytest.approx(10.0)
    assert report.query_agreement(overlap.filter(pl.col("config_b") == "random")) is None


def test_beats_random_marks_holm_significant_rows_both_ways():
    def row(config, keep, acc, delta, p, holm):
        return {"agg_layer": 2, "config": config, "method": config, "keep": keep, "n": 40, "accuracy": acc,
                "delta_vs_random": delta, "mcnemar_p_vs_random": p, "mcnemar_p_vs_random_holm": holm}

    accuracy = pl.DataFrame([row("random", 16, 0.5, 0.0, None, None), row("better", 16, 0.9, 0.4, 0.001, 0.004),
                             row("worse", 16, 0.1, -0.4, 0.002, 0.006), row("same", 16, 0.6, 0.1, 0.5, 1.0),
                             row("full", 576, 1.0, None, None, None)])
    table = report.beats_random(accuracy)
    assert table["config"].to_list() == ["better", "same", "worse"]  # by change, best first; random and full out
    assert table["holm_0.05"].to_list() == ["better", "", "worse"]
    assert table["random_%"].to_list() == [50.0] * 3 and table["delta_vs_random_pts"].to_list() == [40.0, 10.0, -40.0]
    line = report.beats_random_summary(table)
    assert "over 3 tests" in line and "1 better (better at keep 16 (+40.0 pts))" in line and "1 worse" in line
    assert report.beats_random(accuracy.drop("mcnemar_p_vs_random_holm")) is None  # an older eval
    assert "re-run eval" in report.beats_random_summary(None)


def test_adaptive_tables_read_as_bound_and_held_out_rule():
    oracle = pl.DataFrame({"agg_layer": [2], "keep": [16], "n": [40], "n_candidates": [4], "best_single": ["uniform"],
                           "best_single_accuracy": [0.825], "oracle_accuracy": [0.975], "oracle_ci_lo": [0.87118],
                           "oracle_ci_hi": [0.99557], "oracle_gain": [0.15]})
    adaptive = pl.DataFrame({"agg_layer": [2], "keep": [16], "n": [40], "n_folds": [5], "cv_accuracy": [0.7],
                             "cv_ci_lo": [0.5457], "cv_ci_hi": [0.819252], "best_single_cv_accuracy": [0.775],
                             "best_single": ["uniform"], "n_rule_only": [0], "n_best_single_only": [3],
                             "p_mcnemar": [0.25], "p_holm": [0.75], "rule": ["head_entropy <= 0.9997 ? a : b"],
                             "rule_train_accuracy": [0.85]})
    view = report.oracle_view(oracle).row(0, named=True)
    assert (view["best_single_%"], view["oracle_%"], view["oracle_95%"], view["oracle_gain_pts"]) == \
        (82.5, 97.5, "[87.1, 99.6]", 15.0)
    rule = report.adaptive_view(adaptive).row(0, named=True)
    assert (rule["rule_cv_%"], rule["best_single_cv_%"], rule["rule_gain_pts"], rule["rule_cv_95%"]) == \
        (70.0, 77.5, -7.5, "[54.6, 81.9]")
    assert rule["p_holm"] == "7.50e-01" and rule["rule"].startswith("head_entropy")
    note = report.adaptive_note(oracle, adaptive)
    assert "+15.0 pts" in note and "-7.5 to -7.5" in note and "better at Holm p < 0.05 in 0" in note
    assert "fewer than two" in report.adaptive_note(pl.DataFrame(), pl.DataFrame())
    assert "re-run eval" in report.adaptive_note(None, None)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A run captured with every --store option, its strategies and query variants selected
    and the ones the sections compare evaluated."""
    from fastv_analysis.probes import STORE_OPTIONS
    from fastv_analysis.toy.checkpoint import save_tiny_random_checkpoint

    root = tmp_path_factory.mktemp("stored")
    model = save_tiny_random_checkpoint(root / "m", seed=3, text={"num_hidden_layers": 3, "num_attention_heads": 4,
                                                                   "num_key_value_heads": 2})
    data = write_questions(root / "d", n=6)
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data), "--out", str(run), "--quiet",
                 "--max-new-tokens", "2", "--store", ",".join(STORE_OPTIONS)]) == 0
    methods = "avg_all_heads,no_rope,sink_excluded,random,uniform"
    assert main(["select", str(run), "--keep", "64,16", "--methods", methods, "--queries", "last,text_mean,all_mean",
                 "--quiet"]) == 0
    configs = f"{methods},avg_all_heads@text_mean,avg_all_heads@all_mean"
    assert main(["eval", str(run), "--quiet", "--timing-samples", "0", "--configs", configs]) == 0
    return run


def test_report_renders_every_section_on_a_run_captured_with_store(stored_run):
    assert main(["report", str(stored_run)]) == 0
    tables = report.load_tables(stored_run)
    figures = {p.stem for p in (stored_run / "figures").glob("*.png")}
    assert {"positional_bias", "query_choice", "layer_dynamics"} <= figures
    has_sinks = any(m.any() for m in report.run_sink_masks(tables).values())
    assert ("attention_sinks" in figures) == has_sinks
    html = (stored_run / "report.html").read_text()
    assert "Traceback" not in html  # (a raising cell fails the render itself)
    assert ("Attention sinks (a token whose" in html) if has_sinks else ("No attention sinks in this run" in html)
    assert "no_rope" in html and "text_mean vs last" in html and "holm_0.05" in html and "rule_cv_%" in html
    for name in ("positional_bias", "query_choice", "layer_dynamics"):
        assert report.why_missing(name, tables) is None
        with Image.open(stored_run / "figures" / f"{name}.png") as im:
            assert im.width > 300 and len(np.unique(np.asarray(im.convert("L")))) > 10, name


def test_older_figures_show_plain_configurations_not_query_variants_or_schedules():
    """avg_all_heads@text_mean and 'avg_all_heads then max_head ...' share the method name
    avg_all_heads; the per-method figures must draw FastV's own configuration only."""
    import polars as pl

    from fastv_analysis.report import _primary_only

    frame = pl.DataFrame({
        "config": ["avg_all_heads", "avg_all_heads@text_mean", "avg_all_heads then max_head K=4 keep 8",
                   "weighted_combination(alpha=0.5)", "weighted_combination(alpha=0.5)@all_mean"],
        "method": ["avg_all_heads"] * 3 + ["weighted_combination"] * 2,
        "alpha": [None, None, None, 0.5, 0.5],
    }, schema_overrides={"alpha": pl.Float64})
    kept = frame.filter(_primary_only(0.5))["config"].to_list()
    assert kept == ["avg_all_heads", "weighted_combination(alpha=0.5)"]


def test_beats_random_judges_by_the_test_over_units_when_items_repeat():
    # Two questions per image: McNemar counting both as independent says "better" (Holm 0.004),
    # the test over images does not (0.2): the verdict and the summary follow the units.
    row = {"agg_layer": 2, "config": "x", "method": "x", "keep": 16, "n": 40, "n_units": 20, "accuracy": 0.9,
           "delta_vs_random": 0.4, "mcnemar_p_vs_random": 0.001, "mcnemar_p_vs_random_holm": 0.004,
           "unit_p_vs_random": 0.1, "unit_p_vs_random_holm": 0.2}
    rnd = {**row, "config": "random", "method": "random", "accuracy": 0.5, "delta_vs_random": None,
           "mcnemar_p_vs_random": None, "mcnemar_p_vs_random_holm": None, "unit_p_vs_random": None,
           "unit_p_vs_random_holm": None}
    table = report.beats_random(pl.DataFrame([row, rnd]))
    assert table["holm_0.05"].to_list() == [""] and table["p_vs_random_holm"].to_list() == [0.2]
    assert table["n_units"].to_list() == [20]
    assert "copies of one item count once" in report.beats_random_summary(table)


SIXTEEN = ["avg_all_heads", "max_head", "random", "uniform", "dynamic_alpha", "no_rope", "sink_excluded", "diverse",
           "hybrid_uniform", "avg_all_heads@text_mean", "avg_all_heads@all_mean"] + [
    f"weighted_combination(alpha={a:g})" for a in (0, 0.25, 0.5, 0.75, 1)]


def _sixteen_predictions():
    rng = np.random.default_rng(0)
    rows = [{"sample_id": s, "agg_layer": 2, "keep": k, "config": c, "method": report._base_method(c),
             "correct": bool(rng.random() < 0.7), "objects_touched": float(rng.random()),
             "object_token_share": float(rng.random())} for s in range(8) for k in (16, 64) for c in SIXTEEN]
    return pl.DataFrame(rows)


def test_object_coverage_explains_every_colour_with_16_configurations():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    fig = report.plot_object_coverage(_sixteen_predictions())
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == 16 + 2 and labels[-2:] == ["keep 64", "keep 16"]
    legend_colors = {to_hex(h.get_color()) for h in legend.legend_handles[:16]}
    assert len(legend_colors) == 16  # one colour per configuration, none recycled
    for ax in fig.axes:
        drawn = {to_hex(c) for coll in ax.collections for c in coll.get_facecolors()}
        assert drawn <= legend_colors  # every plotted colour is in the legend
    plt.close(fig)


def test_config_colors_one_hue_family_per_method():
    from matplotlib.colors import rgb_to_hsv, to_rgb

    colors = report.config_colors(SIXTEEN)
    assert colors["avg_all_heads"] == to_rgb(report.PALETTE["avg_all_heads"])  # the method itself: its own colour
    wc = [colors[f"weighted_combination(alpha={a:g})"] for a in (0, 0.25, 0.5, 0.75, 1)]
    hue = rgb_to_hsv(to_rgb(report.PALETTE["weighted_combination"]))[0]
    assert all(abs(rgb_to_hsv(c)[0] - hue) < 0.02 for c in wc)  # one hue ...
    assert [sum(c) for c in wc] == sorted((sum(c) for c in wc), reverse=True)  # ... light (alpha 0) to dark
    assert len(set(colors.values())) == len(SIXTEEN)


def test_relations_and_overlap_stay_readable_with_16_configurations(tmp_path):
    import matplotlib.pyplot as plt

    configs = [c for c in SIXTEEN if c != "avg_all_heads"]
    rel = pl.DataFrame([{"scope": "configuration", "statistic": "jaccard_vs_avg", "keep": 16, "agg_layer": 2,
                         "config": c, "accuracy_q1": 0.5, "accuracy_q2": 0.6, "accuracy_q3": 0.7, "accuracy_q4": 0.8,
                         "spearman_rho": 0.1, "p_holm": 0.5, "r_within": None, "n": 8, "n_strata": 1,
                         "p_value": None} for c in configs])
    fig = report.plot_relations(rel)
    right = fig.axes[1]
    lines = right.get_lines()
    assert len(lines) == 15 and len({tuple(line.get_color()) for line in lines}) == 15
    legend = right.get_legend()
    fig.canvas.draw()
    box, panel = legend.get_window_extent(), right.get_window_extent()
    assert box.x0 >= panel.x1  # beside the lines, not over them
    plt.close(fig)
    pairs = [{"agg_layer": 2, "keep": 16, "config_a": a, "config_b": b, "jaccard_mean": 0.3}
             for i, a in enumerate(SIXTEEN) for b in SIXTEEN[i + 1:] if "@" not in a + b]
    fig = report.plot_overlap_heatmap(pl.DataFrame(pairs), max_configs=20, n_tokens=576)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = ax.get_xticklabels()
    x = sorted(t.get_window_extent().x1 for t in labels)  # rotated labels end at their ticks
    font = labels[0].get_fontsize() * fig.dpi / 72
    gap = min(np.diff(x)) * np.sin(np.radians(labels[0].get_rotation()))  # between parallel rotated lines
    assert len(labels) == 14 and gap >= 1.4 * font  # a line of text and some air between neighbours
    plt.close(fig)


def test_config_colors_never_share_the_fallback_between_methods():
    # dart and divprune (and any method the palette does not name yet) drew in the same grey
    from matplotlib.colors import to_rgb

    colors = report.config_colors(["random", "dart", "divprune", "new_method_a", "new_method_b"])
    assert len(set(colors.values())) == 5
    assert all(colors[m] != to_rgb("0.4") for m in ("new_method_a", "new_method_b"))
