"""Why the methods differ: per-selection statistics across every answered configuration, and which
of them predicts being correct within a sample (the relations machinery of :mod:`.relations`).

Per (sample, configuration): the overlap with FastV's set (``jaccard_vs_avg``), where the kept
tokens sit (``mean_row``, ``bottom_share``, ``region_coverage``: the share of the grid's 4 x 4
regions holding a kept token), object coverage (``object_token_share``, ``objects_touched``,
where the questions give boxes), ``diversity`` (mean pairwise cosine distance of the kept
tokens' LLM-input embeddings, ``--store embeddings``), ``relevance`` (the mean over the kept
tokens and the instruction tokens of their cosine, in the LLM's input space: CDPruner's relevance
with its sign, ``--store embeddings,instruction``) and ``compact`` (1 where the
configuration ran with the compact positions policy). A merged slot counts as its anchor token.
Written by eval as ``RUN/eval/method_statistics.parquet`` (rows) and
``RUN/eval/method_relations.parquet`` (:func:`.relations.relations_table` over these statistics).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .plan import FULL
from .relations import statistics_frame

METHOD_STATISTICS = ("jaccard_vs_avg", "mean_row", "bottom_share", "region_coverage", "object_token_share",
                     "objects_touched", "diversity", "relevance", "compact")
REGIONS = 4
"""The grid is cut into REGIONS x REGIONS regions for ``region_coverage``."""


def region_coverage(kept: np.ndarray, layout, regions: int = REGIONS) -> float:
    """Share of the ``regions x regions`` parts of the sample's grid holding a kept token (NaN
    without a grid)."""
    cells = layout.cells[np.asarray(kept, dtype=np.int64)]
    cells = cells[cells >= 0]
    if layout.rows == 0 or layout.cols == 0:
        return float("nan")
    rows, cols = np.divmod(cells, layout.cols)
    parts = (rows * regions // layout.rows) * regions + cols * regions // layout.cols
    return np.unique(parts).size / (min(regions, layout.rows) * min(regions, layout.cols))


def mean_pairwise_cosine_distance(x: np.ndarray) -> float:
    """Mean over pairs i < j of ``1 - cos(x_i, x_j)`` (NaN for fewer than two rows)."""
    k = x.shape[0]
    if k < 2:
        return float("nan")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    total = unit.sum(axis=0)
    return float(1.0 - (total @ total - k) / (k * (k - 1)))


def instruction_relevance(x: np.ndarray, instruction: np.ndarray) -> float:
    """Mean over the rows of ``x`` (kept tokens) and the instruction tokens of their cosine, where
    ``instruction`` is the mean of the instruction tokens' unit vectors (the stored
    ``instruction`` input): ``mean(unit(x) @ instruction)``."""
    if x.shape[0] == 0:
        return float("nan")
    return float((x / np.linalg.norm(x, axis=1, keepdims=True) @ instruction).mean())


def _sample_tensors(run, agg_layer: int, sample_id: int) -> dict:
    """The stored inputs a statistic reads, for one sample (absent: not captured)."""
    stored, layer = set(run.config.get("store") or ()), run.inputs_layer(agg_layer)  # both enter layer 0
    names = [n for n in ("embeddings", "instruction") if n in stored]
    got = run.inputs(layer, [sample_id], names) if names and layer is not None else {}
    return {name: got[name][0].numpy().astype(np.float64) for name in got}


def _kept_statistics(pred: pl.DataFrame, run) -> pl.DataFrame:
    """Per predictions row: region_coverage, diversity, relevance of its kept set (NaN where
    the run lacks the stored input, or for ``full``)."""
    from ..select import sample_layouts

    sel = pl.read_parquet(run.root / "select" / "selections.parquet", columns=["sample_id", "agg_layer",
                                                                               "selection_id", "kept"])
    sel = sel.unique(["sample_id", "agg_layer", "selection_id"])
    rows = pred.select("sample_id", "agg_layer", "selection_id").unique().with_columns(
        pl.col("selection_id").str.split("|").list.first().alias("base_id"))
    rows = rows.join(sel.rename({"selection_id": "base_id"}), on=["sample_id", "agg_layer", "base_id"], how="inner")
    layouts = sample_layouts(run.samples)
    out = []
    for (sid, layer), g in rows.sort("sample_id", "agg_layer").partition_by(["sample_id", "agg_layer"],
                                                                             as_dict=True).items():
        t = _sample_tensors(run, int(layer), int(sid))
        for selection_id, kept in g.select("selection_id", "kept").iter_rows():
            kept = np.asarray(kept, dtype=np.int64)
            out.append({"sample_id": sid, "agg_layer": layer, "selection_id": selection_id,
                        "region_coverage": region_coverage(kept, layouts[int(sid)]),
                        "diversity": mean_pairwise_cosine_distance(t["embeddings"][kept]) if "embeddings" in t
                        else float("nan"),
                        "relevance": instruction_relevance(t["embeddings"][kept], t["instruction"])
                        if "embeddings" in t and "instruction" in t else float("nan")})
    schema = {"sample_id": pred.schema["sample_id"], "agg_layer": pred.schema["agg_layer"], "selection_id": pl.Utf8,
              "region_coverage": pl.Float64, "diversity": pl.Float64, "relevance": pl.Float64}
    return pl.DataFrame(out, schema=schema)


def method_statistics(pred: pl.DataFrame, run) -> pl.DataFrame:
    """Eval's predictions (pruned configurations) with every :data:`METHOD_STATISTICS` column."""
    frame = statistics_frame(pred.filter(pl.col("method") != FULL), run.root)
    frame = frame.join(_kept_statistics(pred, run), on=["sample_id", "agg_layer", "selection_id"], how="left")
    compact = (pl.col("positions") == "compact") if "positions" in frame.columns else pl.lit(False)
    frame = frame.with_columns(compact.cast(pl.Float64).alias("compact"),
                               *[pl.col(c).fill_nan(None) for c in ("region_coverage", "diversity", "relevance")])
    keep = ["sample_id", "agg_layer", "config", "method", "alpha", "keep", "ratio", "positions", "unit", "correct",
            "score", *METHOD_STATISTICS]
    return frame.select([c for c in keep if c in frame.columns])
