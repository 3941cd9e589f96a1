"""The eval stage as a package that follows its data (issue 21): small documented modules,
sample preparation shared with capture in its own module, the model's context and attention
kernel read through the adapter (the numerics key unchanged, so saved parts still match),
and the resumable parts written every PART_SAMPLES samples."""

from __future__ import annotations

import ast
import pkgutil
import re
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from conftest import make_tiny_llava

PACKAGE = Path(__file__).resolve().parents[1] / "fastv_analysis"


def _python_files(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_evaluate_is_a_package_of_small_documented_modules():
    import fastv_analysis.evaluate as evaluate

    assert hasattr(evaluate, "__path__"), "fastv_analysis.evaluate should be a package"
    names = {m.name for m in pkgutil.iter_modules(evaluate.__path__)}
    assert {"plan", "answer", "parts", "score", "accuracy", "relations", "results", "run"} <= names
    too_long = []
    for path in _python_files(PACKAGE / "evaluate"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no module docstring"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                limit = 200 if isinstance(node, ast.ClassDef) else 80
                if node.end_lineno - node.lineno + 1 > limit:
                    too_long.append(f"{path.name}:{node.name}")
    assert too_long == []


def test_eval_does_not_import_the_capture_stage():
    """Sample preparation lives in fastv_analysis.samples; capture keeps its old names."""
    from fastv_analysis import capture, distributed, samples

    for path in _python_files(PACKAGE / "evaluate"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("capture", "..capture") and not (node.module or "").endswith("capture"), \
                    f"{path.name} imports the capture stage"
    assert capture.prepare is samples.prepare and capture.model_inputs is samples.model_inputs
    assert capture.BadSample is samples.BadSample and capture._distributed is distributed.process_group


@pytest.mark.parametrize("pattern", [r"[.'\"]_attn_implementation\b", r"\bmax_position_embeddings\b"])
def test_config_internals_are_read_only_by_the_adapters(pattern):
    """Outside adapters/ (and the toy builders, which write configs), no module reads them
    (``set_attn_implementation``, transformers' public method, is not one of them)."""
    readers = [str(p.relative_to(PACKAGE)) for p in _python_files(PACKAGE)
               if p.parent.name not in ("adapters", "toy") and re.search(pattern, p.read_text())]
    assert readers == []


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_adapter_names_the_context_and_kernel(implementation):
    from fastv_analysis.adapters import get_adapter
    from fastv_analysis.evaluate.parts import numerics_key

    model = make_tiny_llava(attn_implementation=implementation)
    adapter = get_adapter(model)
    assert adapter.max_positions == 256 == model.config.text_config.max_position_embeddings
    assert adapter.attention_kernel == implementation
    loaded = SimpleNamespace(dtype=torch.float32, device=torch.device("cpu"))
    # the key's string as eval built it before the adapter read it: saved parts still match
    before = f"{loaded.dtype}|{loaded.device.type}|{getattr(model.config, '_attn_implementation', None)}"
    assert numerics_key(loaded, adapter) == before == f"torch.float32|cpu|{implementation}"


def test_parts_are_written_every_part_samples(tmp_path, monkeypatch):
    from fastv_analysis.evaluate import parts as parts_mod

    monkeypatch.setattr(parts_mod, "PART_SAMPLES", 2)
    parts = parts_mod.EvalParts(tmp_path, "key")

    def add(sid):
        parts.add([{"sample_id": sid, "agg_layer": 2, "selection_id": "s", "prediction": "yes", "correct": True}],
                  [{"sample_id": sid, "agg_layer": 2, "keep": 8, "n_sets": 1, "prefill_seconds": 0.1,
                    "decode_seconds": 0.1, "decode_tokens": 1}])

    add(0)
    assert list(parts.dir.glob("part-*.json")) == []
    add(1)
    assert len(list(parts.dir.glob("part-*.json"))) == 1
    add(2)
    parts.flush()
    parts.flush()  # nothing kept: no empty part
    answers, timing = parts.load()
    assert len(list(parts.dir.glob("part-*.json"))) == 2
    assert sorted(answers["sample_id"].to_list()) == [0, 1, 2] and timing.height == 3


def test_compare_leaves_out_capture_seconds(tmp_path):
    from fastv_analysis.compare import table_differences

    for name, seconds in (("a", 0.1), ("b", 0.2)):
        (tmp_path / name).mkdir()
        pl.DataFrame({"sample_id": [0], "prediction": ["yes"], "capture_seconds": [seconds]}).write_parquet(
            tmp_path / name / "samples.parquet")
    assert table_differences(tmp_path / "a", tmp_path / "b", stages=("",)) == []
