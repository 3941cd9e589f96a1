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
                "head_statistics", "keep_frequency", "examples", "sample_attention", "relations", "object_coverage"]


def test_figure_registry():
    assert list(report.FIGURES) == FIGURE_NAMES and set(report.NEEDS) == set(FIGURE_NAMES)
    assert len(report.FIGURES) == 11


def test_figure_functions_label_everything(evaluated_run):
    import matplotlib.pyplot as plt

    tables = report.load_tables(evaluated_run)
    for name in report.FIGURES:
        fig = report.figure(name, tables, save=False)
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
    assert {p.stem for p in figures} == set(report.FIGURES)
    for p in figures:
        with Image.open(p) as im:
            assert im.width > 300 and im.height > 200, p.name
            assert len(np.unique(np.asarray(im.convert("L")))) > 10, f"{p.name} is blank"
    html = (evaluated_run / "report.html").read_text()
    assert len(re.findall(r'<img[^>]* src="data:image/png;base64,', html)) >= len(report.FIGURES)
    assert "Main numbers" in html and "Traceback" not in html
    provenance = json.loads((evaluated_run / "report.json").read_text())
    assert sorted(provenance["figures"]) == sorted(p.name for p in figures) and "versions" in provenance
    assert not list(evaluated_run.glob(".report.tmp-*")) and not list((evaluated_run / "figures").glob(".*"))
    assert not re.search(r'<img[^>]* src="(?!data:)', html)  # opens on its own: no external images
    # the main table: whole config names, no dtype row, p-values in scientific notation
    assert "weighted_combination(alpha=0.5)" in html and "weighted_combination(alpha=0.…" not in html
    assert not re.search(r"<td>(str|i64|f64)</td>", html) and "shape: (" not in html
    assert len(figures) == 11


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
    assert panels["uniform"].collections[0].norm.vmax == pytest.approx(100)  # its own scale
    assert "own scale 0-100%" in panels["uniform"].get_title()
    shared = [ax for name, ax in panels.items() if name != "uniform"]
    tops = {ax.collections[0].norm.vmax for ax in shared}
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
