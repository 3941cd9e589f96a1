"""Whether two runs' tables say the same thing: every parquet table of each stage, the
answers files, nothing but measured times and storage bookkeeping left out.

Used by the tests (two evals, one and two processes) and by ``benchmarks/compare_runs.py``
(a demo before and after a refactor must give identical tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from .evaluate.accuracy import TIMING_COLUMNS

TIMING_FILES = ("timing.parquet", "config_timing.parquet")
"""Tables of measured seconds: never equal across runs."""
TIMED_COLUMNS = frozenset({*TIMING_COLUMNS, "timing_n", "batched_prefill_ms_per_set",
                           "batched_decode_ms_per_token", "capture_seconds"})
"""Columns of measured time: the accuracy table's, and samples.parquet's ``capture_seconds``."""
STAGES = ("", "select", "eval")
"""Where a run keeps its tables: the capture's samples at the top, then each stage's folder."""


def table_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.parquet") if p.name not in TIMING_FILES} if folder.is_dir() else set()


LOCATION_COLUMNS = frozenset({"image", "model_id"})
"""Columns / answers-file fields that hold absolute paths: they name where the data and the
model lie, so two checkouts of the same run differ there and nowhere else."""


def _answers(path: Path, skip: frozenset) -> list[dict] | None:
    if not path.exists():
        return None
    return [{k: v for k, v in json.loads(line).items() if k not in skip} for line in path.read_text().splitlines()]


def table_differences(a: str | Path, b: str | Path, stages=STAGES, ignore_columns=(),
                      ignore_locations: bool = False) -> list[str]:
    """One line per difference between the tables of folders (or runs) ``a`` and ``b``: a
    table only one side has, a table whose rows or columns differ (exactly, in order), an
    answers file that differs. Empty when they say the same thing. ``ignore_locations``
    leaves out the columns that hold absolute paths (:data:`LOCATION_COLUMNS`), to compare
    runs made from two checkouts."""
    a, b = Path(a), Path(b)
    skip = TIMED_COLUMNS | set(ignore_columns) | (LOCATION_COLUMNS if ignore_locations else frozenset())
    out = []
    for stage in stages:
        fa, fb = a / stage, b / stage
        names_a, names_b = table_names(fa), table_names(fb)
        out += [f"{stage or '.'}/{n}: only in {a if n in names_a else b}" for n in sorted(names_a ^ names_b)]
        for name in sorted(names_a & names_b):
            ta, tb = pl.read_parquet(fa / name), pl.read_parquet(fb / name)
            ta, tb = ta.drop(*(skip & set(ta.columns))), tb.drop(*(skip & set(tb.columns)))
            if ta.columns != tb.columns:
                out.append(f"{stage or '.'}/{name}: columns differ ({sorted(set(ta.columns) ^ set(tb.columns))})")
            elif not ta.equals(tb):
                out.append(f"{stage or '.'}/{name}: {ta.height} vs {tb.height} rows, values differ")
        answers_a, answers_b = fa / "answers", fb / "answers"
        for name in sorted({p.name for p in answers_a.glob("*.jsonl")} | {p.name for p in answers_b.glob("*.jsonl")}):
            ja, jb = _answers(answers_a / name, skip), _answers(answers_b / name, skip)
            if ja is None or ja != jb:
                out.append(f"{stage or '.'}/answers/{name}: differs")
    return out
