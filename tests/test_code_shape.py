"""The shape of the code (issue 21): rooms a newcomer can read in one sitting, and transformers'
calling conventions kept behind the adapters.

Checked on the syntax tree, so docstrings that name a convention do not count. ``ROOMS`` are
the modules held to the limits so far; the other slices of issue 21 add theirs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastv_analysis"
ROOMS = tuple(sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()))
"""Every module and package of fastv_analysis: all held to the size limits."""
BEHIND_THE_SEAM = ("adapters", "toy")
"""Where transformers' conventions may be named: the adapters, and the toy/tiny checkpoint
builders, which write configs rather than call models."""
LOADS_TRANSFORMERS = ("loading.py", "provenance.py", "testing.py")
"""Modules that import transformers to load a checkpoint or report its version (no calling
convention is read there)."""
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 200

CONVENTIONS = frozenset({
    "DynamicCache", "use_cache", "logits_to_keep", "_attn_implementation", "get_seq_length",
    "batch_repeat_interleave", "get_text_config", "cache_kwarg", "output_attentions",
    "max_position_embeddings", "text_config",
})
"""Names of transformers' calling conventions and private config attributes: only
``fastv_analysis/adapters/`` may read them."""


def _modules(room: str) -> list[Path]:
    path = PACKAGE / room
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    return [path if path.exists() else path.with_suffix(".py")]  # a room not yet a package


def _sources(rooms=ROOMS) -> list[Path]:
    return [p for room in rooms for p in _modules(room)]


def test_pruning_is_a_package_with_a_docstring_per_module():
    modules = _modules("pruning")
    assert len(modules) > 1, "fastv_analysis/pruning should be a package split by what each part does"
    for path in modules:
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"


def _conventions_read(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
            if node.attr == "layers" and "cache" in ast.unparse(node.value).lower():
                names.append("cache.layers")
        elif isinstance(node, ast.keyword):
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.name]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            names = ["transformers"] if (module or "").split(".")[0] == "transformers" else []
        else:
            continue
        found += [(node.lineno, n) for n in names if n in CONVENTIONS or n in ("cache.layers", "transformers")]
    return found


@pytest.mark.parametrize("path", _sources([r for r in ROOMS if r not in BEHIND_THE_SEAM]),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_transformers_conventions_outside_the_adapters(path):
    found = _conventions_read(ast.parse(path.read_text()))
    if path.name in LOADS_TRANSFORMERS:
        found = [f for f in found if f[1] != "transformers"]
    assert not found, f"{path.relative_to(PACKAGE)} reads {found}: move it behind fastv_analysis/adapters"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_and_classes_fit_in_one_sitting(path):
    too_long = []
    for node in ast.walk(ast.parse(path.read_text())):
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                too_long.append(f"{node.name} ({lines} lines > {limit})")
    assert not too_long, f"{path.relative_to(PACKAGE)}: {', '.join(too_long)}"
