"""What an eval writes to ``RUN/eval/``: the predictions frame assembled from the parts and the
capture's samples, scored, tabulated (accuracy, relations, adaptive), the answers files, the
timing tables and ``eval.json``; published by one rename so a reader never sees half of it.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import polars as pl
import torch

from ..store import atomic_write_json, atomic_write_parquet
from .accuracy import accuracy_table
from .methods import ModelDims, benchmark_name, benchmark_rows, methods_table
from .plan import FULL
from .relations import adaptive_tables, relations_table, statistics_frame
from .selection_stats import METHOD_STATISTICS, method_statistics
from .score import benchmark_scores, sorted_predictions, write_answer_files


def ratio_rows_keep_null(pred: pl.DataFrame) -> pl.DataFrame:
    """A ``--keep-ratio`` configuration is one configuration whatever each sample kept (its count
    stays in ``n_kept``): ``keep`` null in the tables, the ratio in its label and ``ratio``."""
    if "ratio" not in pred.columns:
        return pred
    return pred.with_columns(pl.when(pl.col("ratio").is_null()).then(pl.col("keep")).alias("keep"))


def predictions(plan, answers: pl.DataFrame) -> pl.DataFrame:
    """One row per (sample, configuration): its selection row (``n_kept`` for the kept list),
    its answer, the capture's answer and sample columns, and the sample's unit, in the one row
    order of predictions.parquet."""
    from ..benchmark import sample_unit

    samples = plan.run.samples
    pred = (
        plan.selections.with_columns(pl.col("kept").list.len().alias("n_kept"))
        .drop("kept", "merge_assign", "merge_weight", strict=False)
        .join(answers, on=["sample_id", "agg_layer", "selection_id"], how="inner")
        .join(samples.select("sample_id", pl.col("prediction").alias("capture_prediction")), on="sample_id",
              how="left")
        .join(samples.select("sample_id", "question_id", "category", "answer", "prompt_tokens", "n_image_tokens"),
              on="sample_id", how="left")
    )
    ids = plan.sample_ids
    units = pl.DataFrame({"sample_id": ids, "unit": [sample_unit(plan.questions[i]) for i in ids]},
                         schema={"sample_id": pred.schema["sample_id"], "unit": pl.Utf8})
    pred = ratio_rows_keep_null(sorted_predictions(pred.join(units, on="sample_id", how="left")))
    if pred.filter(pl.col("method") == FULL)["keep"].n_unique() > 1:  # anyres: one full control, keep = max N
        pred = pred.with_columns(pl.when(pl.col("method") == FULL).then(pl.col("keep").max().over("agg_layer"))
                                 .otherwise(pl.col("keep")).alias("keep"))
    return pred


def write_tables(plan, pred: pl.DataFrame, timing: pl.DataFrame, config_timing: pl.DataFrame | None, adapter,
                 model_name: str, folder: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Score ``pred`` and write every table and answers file of ``RUN/eval/`` into ``folder``;
    returns (scored predictions, accuracy table)."""
    pred, metrics = benchmark_scores(pred, plan.benchmark, plan.questions)
    dims = {"num_layers": adapter.num_layers, "hidden": adapter.hidden_size, "intermediate": adapter.intermediate_size}
    accuracy = accuracy_table(pred, timing, dims, config_timing)
    if metrics is not None:
        accuracy = accuracy.join(metrics["headline"], on=["agg_layer", "config", "keep"], how="left")
        atomic_write_parquet(metrics["long"], folder / "metrics.parquet")
    write_answer_files(pred, plan.questions, folder / "answers", model_name)
    relations = relations_table(statistics_frame(pred, plan.run.root))
    oracle, choice = adaptive_tables(pred, plan.run.root)
    methods = methods_table({benchmark_name(plan.run): benchmark_rows(pred, accuracy, plan.run.samples,
                                                                      ModelDims.of(adapter))})
    per_selection = method_statistics(pred, plan.run)
    tables = {"oracle": oracle, "adaptive": choice, "predictions": pred, "accuracy": accuracy,
              "relations": relations, "timing": timing, "config_timing": config_timing, "methods": methods,
              "method_statistics": per_selection,
              "method_relations": relations_table(per_selection, statistics=METHOD_STATISTICS)}
    for name, table in tables.items():
        if table is not None:
            atomic_write_parquet(table, folder / f"{name}.parquet")
    return pred, accuracy


def eval_info(plan, model, answered, answers: pl.DataFrame, timing: pl.DataFrame, pred: pl.DataFrame,
              world: int, t_start: float, command: list[str] | None) -> dict:
    """eval.json: settings, model, how much was answered and how, the mask check, the full
    control against capture's answers, the timing protocol, versions and command."""
    from ..provenance import versions

    cfg, loaded = plan.cfg, model.loaded
    full = pred.filter(pl.col("method") == FULL)
    differ = full.filter(pl.col("prediction") != pl.col("capture_prediction"))
    return {
        "stage": "eval",
        "select_fingerprint": plan.select_id,
        "settings": asdict(cfg),
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "n_samples": len(plan.sample_ids),
        "processes": world,
        "configurations_asked": plan.selections.height,
        "distinct_kept_sets": answers.height,
        "shared_prefills": timing.height,
        "max_new_tokens": plan.max_new_tokens,
        "mask_check": answered.mask_checks,
        "full_vs_capture": {"compared": full.height, "differ": differ.height,
                            "examples": differ.select("sample_id", "agg_layer", "prediction", "capture_prediction")
                            .head(10).to_dicts()},
        "timing": {"samples": len(answered.timed), "repeats": cfg.timing_repeats, "warmup_passes": 1,
                   "order": "every configuration once per repeat, a fresh seeded order each repeat",
                   "threads": torch.get_num_threads(), "device": str(loaded.device),
                   "dtype": str(loaded.dtype).removeprefix("torch.")},
        "seconds": round(time.perf_counter() - t_start, 3),
        "versions": versions(),
        "command": command or sys.argv,
    }


def publish(folder: Path, out_dir: Path, info: dict) -> None:
    """Write ``eval.json`` into ``folder`` and put it in place of ``out_dir`` by one rename."""
    atomic_write_json(folder / "eval.json", info)
    shutil.rmtree(out_dir, ignore_errors=True)
    folder.rename(out_dir)
