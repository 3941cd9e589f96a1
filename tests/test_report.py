"""The report: figure functions and the notebook executed headless into HTML."""

import json
import re

import numpy as np

import pytest
from PIL import Image

from conftest import write_questions
from fastv_analysis import report
from fastv_analysis.cli.main import main


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    from fastv_analysis.toy.checkpoint import save_tiny_random_checkpoint

    root = tmp_path_factory.mktemp("report")
    model = save_tiny_random_checkpoint(root / "m", seed=3, text={"num_hidden_layers": 3, "num_attention_heads": 4,
                                                                   "num_key_value_heads": 2})
    data = write_questions(root / "d", n=6)
    run = root / "run"
    assert main(["capture", "--model", str(model), "--data", str(data), "--out", str(run), "--quiet",
                 "--max-new-tokens", "2"]) == 0
    assert main(["select", str(run), "--keep", "64,16", "--alphas", "0:1:0.5", "--quiet"]) == 0
    assert main(["eval", str(run), "--quiet"]) == 0
    return run


def test_figure_functions_label_everything(evaluated_run):
    import matplotlib.pyplot as plt

    tables = report.load_tables(evaluated_run)
    for name in report.FIGURES:
        fig = report.figure(name, tables, save=False)
        assert fig is not None, name
        assert fig.axes, name
        panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert fig._suptitle is not None or all(ax.get_title() for ax in panels), f"{name} has no title"
        if name == "examples":  # image grid: every column titled with its method, every row with its question
            n_cols = len({ax.get_subplotspec().colspan.start for ax in panels})
            assert all(ax.get_title() for ax in panels[:n_cols])
            assert all(ax.get_ylabel() for ax in panels[::n_cols])
        elif name in ("overlap_heatmap", "keep_frequency"):  # one titled panel per keep / method
            assert all(ax.get_title() for ax in panels)
        else:
            main_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_xlabel()]
            assert main_axes and all(ax.get_ylabel() for ax in main_axes), f"{name} lacks axis labels"
        plt.close(fig)


def test_sample_explorer_notebook_runs(evaluated_run, tmp_path):
    import papermill as pm

    fig = report.plot_sample_attention(evaluated_run, 2)
    assert len(fig.axes) >= 5 and fig._suptitle is not None  # mean + 4 heads (+ colorbars)
    out = tmp_path / "explorer.ipynb"
    pm.execute_notebook(str(report.NOTEBOOK.parent / "sample_explorer.ipynb"), str(out),
                        parameters={"run_dir": str(evaluated_run), "sample_id": 1}, kernel_name="python3",
                        progress_bar=False)
    import nbformat

    nb = nbformat.read(out, as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2


def test_report_notebook_writes_html_and_figures(evaluated_run, capsys):
    assert main(["report", str(evaluated_run)]) == 0
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


def test_report_on_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err.strip()
    assert "run.json is missing" in err and len(err.splitlines()) == 1
