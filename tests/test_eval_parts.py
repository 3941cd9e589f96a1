"""eval's resumable parts (issue 20, sections 1 and 2): each carries its files' sha256; a
damaged part is answered again (said in one line), and leftover duplicate parts (two evals
at once, before the run lock) no longer poison every later eval."""

import os
import shutil

import polars as pl
import pytest

from conftest import write_questions
from fastv_analysis.cli.main import main


@pytest.fixture
def evaluated(checkpoints, tmp_path):
    data = write_questions(tmp_path / "d", n=3)
    run = tmp_path / "run"
    assert main(["capture", "--model", str(checkpoints["mha"]), "--data", str(data), "--out", str(run),
                 "--max-new-tokens", "2", "--quiet"]) == 0
    assert main(["select", str(run), "--keep", "8", "--methods", "avg_all_heads,random", "--quiet"]) == 0
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0
    (key,) = list((run / ".eval-parts").iterdir())
    return run, key, pl.read_parquet(run / "eval" / "predictions.parquet")


def _count_evaluations(monkeypatch):
    from fastv_analysis.evaluate import answer  # the module whose loop calls it

    calls, real = [], answer.evaluate_sample
    monkeypatch.setattr(answer, "evaluate_sample", lambda loaded, prepared, *a, **k:
                        calls.append(prepared.sample_id) or real(loaded, prepared, *a, **k))
    return calls


@pytest.mark.parametrize("with_manifest", [True, False])
def test_duplicated_parts_count_once(evaluated, monkeypatch, capsys, with_manifest):
    run, key, before = evaluated
    names = ["answers", "timing"] + (["part"] if with_manifest else [])
    for name in names:  # what a second eval writing the same samples left behind
        ext = "json" if name == "part" else "parquet"
        shutil.copy(key / f"{name}-000-00000.{ext}", key / f"{name}-000-00007.{ext}")
    shutil.rmtree(run / "eval")
    calls = _count_evaluations(monkeypatch)
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0, capsys.readouterr().err
    assert calls == []  # every answer came from the parts
    assert pl.read_parquet(run / "eval" / "predictions.parquet").equals(before)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_part_is_answered_again(evaluated, monkeypatch, capsys, damage):
    run, key, before = evaluated
    part = key / "answers-000-00000.parquet"
    if damage == "truncate":
        os.truncate(part, 40)
    elif damage == "flip":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    else:
        part.unlink()
    calls = _count_evaluations(monkeypatch)
    capsys.readouterr()
    assert main(["eval", str(run), "--timing-samples", "0", "--quiet"]) == 0, capsys.readouterr().err
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval:")]
    assert len(err) == 1 and str(part) in err[0] and "answered again" in err[0]
    assert sorted(calls) == [0, 1, 2]  # the part held every sample of this small run
    assert pl.read_parquet(run / "eval" / "predictions.parquet").equals(before)
