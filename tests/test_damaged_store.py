"""A damaged store is named and repaired (issue 20, section 2): every part carries its sha256
and size in its index; readers stop in one line naming the part and the command that repairs
it; re-running capture re-captures exactly the damaged or missing parts."""

import os
import shlex

import polars as pl
import pytest

from conftest import write_questions
from fastv_analysis.cli.main import main
from fastv_analysis.store import DamagedPartError, open_run, write_synthetic_run

import torch


def _capture(model, data, out):
    return main(["capture", "--model", str(model), "--data", str(data), "--out", str(out), "--part-size", "2",
                 "--max-new-tokens", "1", "--agg-layers", "1,2", "--quiet"])


def _select(run):
    return main(["select", str(run), "--keep", "64,8", "--methods", "avg_all_heads,max_head,random", "--quiet"])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor: same size, other bytes
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_part_is_named_and_repaired_by_capture(checkpoints, tmp_path, capsys, damage):
    data = write_questions(tmp_path / "d", n=5)
    run = tmp_path / "run"
    assert _capture(checkpoints["mha"], data, run) == 0
    assert _select(run) == 0
    before = pl.read_parquet(run / "select" / "selections.parquet")
    part = run / "attention" / "part-000-00001.safetensors"
    if damage == "truncate":
        os.truncate(part, 1000)
    elif damage == "flip":
        _flip_a_byte(part)
    else:
        part.unlink()
    capsys.readouterr()

    assert _select(run) != 0
    err = _one_line(capsys)
    assert str(part) in err and "fastv-analyze capture" in err and not (run / ".select.tmp").exists()
    if damage != "flip":  # a stat tells eval and report (which read no attention rows) about it
        for args in (["eval", str(run), "--quiet"], ["report", str(run)]):
            assert main(args) != 0
            assert str(part) in _one_line(capsys)

    # the repair is the command the message names, as printed
    repair = shlex.split(err.split("run `", 1)[1].split("`", 1)[0])
    assert repair[:2] == ["fastv-analyze", "capture"]
    assert main(repair[1:] + ["--quiet"]) == 0
    captured = capsys.readouterr()
    assert "2 new samples (3 already done" in captured.out  # the part held samples 2 and 3
    assert "part-000-00001.safetensors" in captured.err and "captured again" in captured.err
    assert _select(run) == 0
    after = pl.read_parquet(run / "select" / "selections.parquet")
    assert after.equals(before)


def test_damaged_samples_index_names_the_repair(checkpoints, tmp_path, capsys):
    data = write_questions(tmp_path / "d", n=2)
    run = tmp_path / "run"
    assert _capture(checkpoints["mha"], data, run) == 0
    os.truncate(run / "samples.parquet", 100)
    capsys.readouterr()
    assert _select(run) != 0
    assert "samples.parquet is damaged" in _one_line(capsys)
    assert _capture(checkpoints["mha"], data, run) == 0
    assert open_run(run).samples["sample_id"].to_list() == [0, 1]


def test_a_part_is_hashed_once_per_run_object(tmp_path, monkeypatch):
    from fastv_analysis import provenance

    run = write_synthetic_run(tmp_path / "r", {2: torch.rand(6, 2, 8)}, part_size=2)
    calls = []
    real = provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda p, *a: calls.append(p) or real(p, *a))
    for _ in range(3):
        run.stack(2, [0, 1, 2, 3, 4, 5])
    assert len(calls) == 3  # three parts, each hashed once
    _flip_a_byte(tmp_path / "r" / "attention" / "part-000-00002.safetensors")
    with pytest.raises(DamagedPartError, match="part-000-00002.safetensors is damaged .*sha256"):
        open_run(tmp_path / "r").stack(2, [4])
