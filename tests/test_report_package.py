"""The report package: its figure registry, the notebook cell that iterates it, and module sizes."""

import ast
import json
from pathlib import Path

import matplotlib
import polars as pl
import pytest

from fastv_analysis import report
from fastv_analysis.report import figures

matplotlib.use("Agg")

PACKAGE = Path(report.__file__).parent


def _notebook_cells():
    return [("".join(c["source"]), c["cell_type"]) for c in json.loads(report.NOTEBOOK.read_text())["cells"]]


def _tables(root):
    samples = pl.DataFrame({"sample_id": [0, 1], "n_image_tokens": [4, 4]})
    return report.RunTables(root, samples, None, None, None, None, None, None, num_heads=2)


def test_registry_names_sections_and_views():
    names = [f.name for f in report.REGISTRY]
    assert len(set(names)) == len(names) == 17
    assert list(report.FIGURES) == names and list(report.NEEDS) == names
    assert all(report.NEEDS[f.name] == f.needs and f.needs in report.RunTables.__dataclass_fields__
               for f in report.REGISTRY)
    headings = [line.lstrip("#").strip() for src, kind in _notebook_cells() if kind == "markdown"
                for line in src.splitlines() if line.startswith("##")]
    for entry in report.REGISTRY:  # each figure's section is a heading of the notebook
        assert any(h.startswith(entry.section) for h in headings), (entry.name, entry.section)


def test_a_new_figure_is_one_registry_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    extra = report.Figure("extra", "17. Extra", lambda t: plt.figure(), "samples")
    empty = report.Figure("empty", "18. Empty", lambda t: plt.figure(), "samples", missing=lambda t: "no empty here")
    monkeypatch.setattr(figures, "REGISTRY", figures.REGISTRY + (extra, empty))
    tables = _tables(tmp_path)
    assert report.figure("extra", tables) is not None and (tmp_path / "figures" / "extra.png").exists()
    (tmp_path / "figures" / "empty.png").write_bytes(b"stale")
    assert report.figure("empty", tables) is None and not (tmp_path / "figures" / "empty.png").exists()
    assert report.why_missing("empty", tables) == "no empty here"
    with pytest.raises(ValueError, match="unknown section 'extra'"):
        report.why_missing("extra", tables)
    assert [f.name for f in report.not_shown(tables)] == list(report.FIGURES)  # the built-in ones, not yet drawn
    plt.close("all")


def test_notebook_draws_registered_figures_no_section_shows(tmp_path, monkeypatch):
    """The notebook's last cell draws every registered figure the sections above did not."""
    import matplotlib.pyplot as plt

    drawn = []
    extra = report.Figure("extra", "17. Extra", lambda t: drawn.append("extra") or plt.figure(), "samples")
    gone = report.Figure("gone", "18. Gone", lambda t: None, "samples", missing=lambda t: "no gone figure: why")
    said = report.Figure("said", "19. Said", lambda t: None, "samples", missing=lambda t: "said above")
    monkeypatch.setattr(figures, "REGISTRY", (extra, gone, said))
    cell = next(src for src, kind in _notebook_cells() if kind == "code" and "report.not_shown(" in src)
    shown = []
    tables = _tables(tmp_path)
    assert report.why_missing("said", tables) == "said above"  # a section above explained it: not again
    exec(cell, {"report": report, "tables": tables, "plt": plt, "display": shown.append, "Markdown": str,
                "no_figure": lambda why: shown.append(f"_{why}_")})
    assert drawn == ["extra"] and (tmp_path / "figures" / "extra.png").exists()
    assert shown == ["## 17. Extra", "## 18. Gone", "_no gone figure: why_"]
    assert report.not_shown(tables) == []
    plt.close("all")


def test_report_modules_are_small_and_documented():
    assert report.NOTEBOOK.exists() and report.NOTEBOOK.parent.name == "notebooks"
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name}: no module docstring"
        for node in ast.walk(tree):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert size <= 80, f"{path.name}: {node.name} has {size} lines"
            elif isinstance(node, ast.ClassDef):
                assert size <= 200, f"{path.name}: class {node.name} has {size} lines"


def test_old_names_still_importable():
    """Every name tests, cli/ and the notebooks used from the one-module report."""
    for name in ("render", "ReportError", "NOTEBOOK", "load_tables", "resolve_run_dir", "why_missing", "figure",
                 "save_all", "chance_jaccard", "kept_boxes", "config_colors", "_base_method", "_primary_only",
                 "PALETTE", "Path", "RunTables", "sink_ratio", "layer_dynamics", "position_profile"):
        assert hasattr(report, name), name
