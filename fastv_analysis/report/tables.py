"""A run directory's tables (:class:`RunTables`, read once per report) and how the report displays them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from .. import grid as image_grid
from .grids import DEFAULT_ARCHITECTURE, grid_side


@dataclass
class RunTables:
    """The tables of one run directory that the figures use (None where a stage has not run)."""

    root: Path
    samples: pl.DataFrame
    selections: pl.DataFrame | None
    overlap_summary: pl.DataFrame | None
    heads: pl.DataFrame | None
    accuracy: pl.DataFrame | None
    predictions: pl.DataFrame | None
    relations: pl.DataFrame | None
    num_heads: int | None
    eval_info: dict | None = None
    geometry: image_grid.ImageGeometry = image_grid.DEFAULT_GEOMETRY  # the processor's resize/crop/patch grid
    oracle: pl.DataFrame | None = None     # eval/oracle.parquet: per-sample oracle vs best single strategy
    adaptive: pl.DataFrame | None = None   # eval/adaptive.parquet: the cross-validated choice rule
    store: tuple[str, ...] = ()            # what capture stored beyond the attention (run.json "store")
    architecture: str = DEFAULT_ARCHITECTURE  # run.json's: where its grid sits on the image
    methods: pl.DataFrame | None = None            # eval/methods.parquet: the methods side by side
    method_statistics: pl.DataFrame | None = None  # eval/method_statistics.parquet: per-selection statistics
    method_relations: pl.DataFrame | None = None   # eval/method_relations.parquet: which predicts correctness
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # tensors read from the run, once


def load_tables(run_dir: str | Path) -> RunTables:
    root = Path(run_dir)

    def read(*parts):
        p = root.joinpath(*parts)
        return pl.read_parquet(p) if p.exists() else None

    config = json.loads((root / "run.json").read_text()) if (root / "run.json").exists() else {}
    return RunTables(
        root=root,
        samples=read("samples.parquet"),
        selections=read("select", "selections.parquet"),
        overlap_summary=read("select", "overlap_summary.parquet"),
        heads=read("select", "heads.parquet"),
        accuracy=read("eval", "accuracy.parquet"),
        predictions=read("eval", "predictions.parquet"),
        relations=read("eval", "relations.parquet"),
        num_heads=config.get("num_heads"),
        eval_info=json.loads((root / "eval" / "eval.json").read_text()) if (root / "eval" / "eval.json").exists()
        else None,
        geometry=image_grid.load_geometry(config.get("model")),
        oracle=read("eval", "oracle.parquet"),
        adaptive=read("eval", "adaptive.parquet"),
        store=tuple(config.get("store") or ()),
        architecture=config.get("architecture") or DEFAULT_ARCHITECTURE,
        methods=read("eval", "methods.parquet"),
        method_statistics=read("eval", "method_statistics.parquet"),
        method_relations=read("eval", "method_relations.parquet"),
    )


def resolve_run_dir(run_dir: str | Path, base: str | Path | None = None) -> Path:
    """``run_dir`` as given if it exists, else relative to the parent folder (a notebook opened
    from ``notebooks/`` with the default ``runs/demo``), else relative to ``base``; as given
    (so the error names it) when none exists."""
    given = Path(run_dir)
    candidates = [given]
    if not given.is_absolute():
        candidates += [Path("..") / given] + ([Path(base) / given] if base is not None else [])
    return next((c for c in candidates if (c / "run.json").exists()), given)


def n_image_tokens(tables: "RunTables") -> int | None:
    """N, the number of image tokens per sample (576 for LLaVA-1.5), from the samples table."""
    if tables.samples is not None and "n_image_tokens" in tables.samples.columns and tables.samples.height:
        return int(tables.samples["n_image_tokens"].max())
    if tables.selections is not None:
        return grid_side(tables.selections) ** 2
    return None


def sample_token_counts(tables: "RunTables") -> list[int] | None:
    """Each captured sample's N (anyres and dynamic resolution: N varies by image)."""
    if tables.samples is not None and "n_image_tokens" in tables.samples.columns and tables.samples.height:
        return [int(n) for n in tables.samples["n_image_tokens"].to_list()]
    return n_image_tokens(tables)


def sci_text(col: str) -> pl.Expr:
    """A p-value column as text in scientific notation ("" where there is no test)."""
    return pl.col(col).map_elements(lambda p: f"{p:.2e}", return_dtype=pl.Utf8).fill_null("").alias(col)


def paired_p(accuracy: pl.DataFrame, reference: str) -> str:
    """The p column a table shows against ``reference`` (full / avg / random): the exact
    test over units (copies of one item count once; McNemar's p when every unit is one
    sample), or McNemar's where eval predates it."""
    unit = f"unit_p_vs_{reference}"
    return unit if unit in accuracy.columns else f"mcnemar_p_vs_{reference}"


def configure_tables(max_rows: int = 100) -> None:
    """polars display for the report: whole strings (no truncated config names), no dtype row,
    no shape line, every column."""
    pl.Config.set_fmt_str_lengths(200)
    pl.Config.set_tbl_hide_column_data_types(True)
    pl.Config.set_tbl_hide_dataframe_shape(True)
    pl.Config.set_tbl_rows(max_rows)
    pl.Config.set_tbl_cols(-1)
