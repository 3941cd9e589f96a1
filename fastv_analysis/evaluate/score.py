"""Benchmark scores per configuration (``correct``, ``score``, the headline metric with its
interval, ``metrics.parquet``) and one answers file per configuration in LLaVA's layout, which
the benchmarks' official scripts read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import polars as pl

from ..store import atomic_write_bytes

CONFIG_KEYS = ["agg_layer", "config", "keep"]


def sorted_predictions(pred: pl.DataFrame) -> pl.DataFrame:
    """The one row order of predictions.parquet (whatever the process or part order was)."""
    return pred.sort(["sample_id", "agg_layer", "keep", "method", "alpha"], descending=[False, False, True, False, False],
                     nulls_last=True)


def benchmark_scores(pred: pl.DataFrame, benchmark: str | None, questions) -> tuple[pl.DataFrame, dict | None]:
    """Score every configuration's answers by the run's rule: ``correct`` (0/1, what McNemar
    compares) and ``score`` (soft where the benchmark's metric is soft, what the relations
    use). For a benchmark also its headline per configuration, with its 95% interval, and
    the long table of every metric (``metrics.parquet``)."""
    from ..benchmark import headline_interval, score_answers

    if benchmark is None:  # a plain question file: exact match / option / yes-no, per sample
        return pred.with_columns(pl.col("correct").cast(pl.Float64).alias("score")), None
    scored, headlines, long = [], [], []
    units = dict(zip(pred["question_id"].to_list(), pred["unit"].to_list())) if "unit" in pred.columns else None
    for key, g in pred.group_by(CONFIG_KEYS, maintain_order=True):
        answers = dict(zip(g["question_id"].to_list(), g["prediction"].to_list()))
        per_question, result = score_answers(benchmark, questions, answers)
        scored.append(g.drop("correct", "score", strict=False).join(
            per_question.select("question_id", "score", "correct"), on="question_id", how="left"))
        if result is not None:
            lo, hi = headline_interval(result, per_question, units=units)
            headlines.append({**dict(zip(CONFIG_KEYS, key)), "benchmark": benchmark, "metric": result.headline[0],
                              "metric_value": result.headline[1], "metric_ci_lo": lo, "metric_ci_hi": hi})
            long.append(result.long.with_columns(*(pl.lit(v).alias(k) for k, v in zip(CONFIG_KEYS, key))))
    out = sorted_predictions(pl.concat(scored).with_columns(pl.col("correct").fill_null(False),
                                                            pl.col("score").fill_null(0.0)))
    headline = pl.DataFrame(headlines, schema_overrides={"metric_ci_lo": pl.Float64, "metric_ci_hi": pl.Float64})
    return out, {"headline": headline, "long": pl.concat(long).select(*CONFIG_KEYS, "metric", "category", "value")}


def write_answer_files(pred: pl.DataFrame, questions, folder: Path, model_id: str) -> None:
    """One answers file per configuration, each line as LLaVA's ``llava/eval/model_vqa*.py``
    write it (question_id with the question file's own type, prompt where the official
    script looks for it, text, answer_id, model_id, metadata, and a benchmark's extra fields:
    :func:`fastv_analysis.tasks.answer_record`), in question-file order, so the benchmark's
    official scripts score it too."""
    from ..tasks import answer_record

    folder.mkdir(parents=True, exist_ok=True)
    by_id = {q.question_id: q for q in questions}
    for (layer, config, keep), g in pred.group_by(CONFIG_KEYS, maintain_order=True):
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"K{layer}_keep{keep}_{config}").strip("_")
        lines = []
        for qid, text in g.sort("sample_id").select("question_id", "prediction").iter_rows():
            q = by_id.get(qid)
            record = answer_record(q) if q is not None else {"question_id": qid, "prompt": ""}
            lines.append(json.dumps({"question_id": record.pop("question_id"), "prompt": record.pop("prompt"),
                                     "text": text,
                                     "answer_id": hashlib.blake2b(f"{name}/{qid}".encode(), digest_size=8).hexdigest(),
                                     "model_id": model_id, "metadata": {"agg_layer": layer, "config": config,
                                                                        "keep": keep}, **record}))
        atomic_write_bytes(folder / f"{name}.jsonl", ("\n".join(lines) + "\n").encode())
