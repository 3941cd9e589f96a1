"""capture --store's help lists every store option from probes (one definition), with its bytes."""

import re

import pytest
from click.testing import CliRunner

from fastv_analysis.cli.main import main as _main  # noqa: F401  (the worktree's CLI: see conftest / README)
from fastv_analysis import probes


def _help() -> str:
    from fastv_analysis.cli.capture_cmd import capture_cmd

    out = CliRunner().invoke(capture_cmd, ["--help"], terminal_width=10_000)
    assert out.exit_code == 0, out.output
    return " ".join(out.output.split())


def test_store_help_names_every_store_option_with_its_bytes_formula():
    text = _help()
    for name in probes.STORE_OPTIONS:
        assert re.search(rf"\b{name}: [^;]*\*", text), name  # "name: what, formula with *"


def test_a_store_option_without_a_hint_is_refused(monkeypatch):
    monkeypatch.setattr(probes, "STORE_OPTIONS", probes.STORE_OPTIONS + ("novel",))
    with pytest.raises(ValueError, match="STORE_HINTS lacks novel"):
        probes.store_help()
