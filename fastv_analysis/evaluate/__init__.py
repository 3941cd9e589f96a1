"""The eval stage: re-run the model with each selection pruned, score, relate to statistics.

The kept sets come from ``RUN/select/selections.parquet``, so capture, select and eval
agree token for token. For each sample, layer and keep count, the distinct kept sets
(``selection_id``) share one pass through layers 0..K-1 and go through layers K.. as one
batch (:func:`fastv_analysis.pruning.prefill_shared`); configurations with the same set
are answered once.

The reference is the ``full`` control: every image token kept, answered through exactly
the same hooks, prefill and greedy decode as the pruned sets, so a change against it is
the pruning and nothing else (capture's own answers, from ``generate``, are only compared
with it: ``eval.json``'s ``full_vs_capture``).

The modules follow the data, each reading only those before it:

- :mod:`.plan`       what to evaluate: flags, select's rows, budgets, schedules, the full control
- :mod:`.answer`     each sample's kept sets through one shared prefill; batch-1 timings; the loop
- :mod:`.parts`      resumable, checksummed answer parts under ``RUN/.eval-parts/``
- :mod:`.score`      benchmark scores per configuration; answers files in the official layout
- :mod:`.accuracy`   the accuracy table (intervals, paired tests, FLOPs, timings)
- :mod:`.relations`  selection statistics vs correctness; the adaptive tables
- :mod:`.results`    predictions assembled, tables written, eval.json, published
- :mod:`.run`        :func:`run_eval`, the order of these steps
"""

from __future__ import annotations

from .accuracy import (CONTROL, P_COLUMNS, TIMING_COLUMNS, _config_times, accuracy_table, with_adjusted,  # noqa: F401
                       with_units)
from .answer import Answered, answer_samples, evaluate_sample, pruned_answer_tokens, time_configurations
from .parts import ANSWER_SCHEMA, TIMING_SCHEMA, EvalParts, numerics_key
from .plan import (FULL, REFERENCE, EvalConfig, EvalPlan, by_budget, configurations, plan_eval, reference_label,
                   schedule_text, stage_spec, with_full_control, with_schedule)
from .relations import ADAPTIVE_FEATURES, QUANTILES, STATISTICS, adaptive_tables, relations_table, statistics_frame
from .results import predictions, ratio_rows_keep_null
from .run import run_eval
from .score import CONFIG_KEYS, benchmark_scores, sorted_predictions, write_answer_files

__all__ = [
    "ADAPTIVE_FEATURES", "ANSWER_SCHEMA", "CONFIG_KEYS", "CONTROL", "FULL", "P_COLUMNS", "QUANTILES", "REFERENCE",
    "STATISTICS", "TIMING_COLUMNS", "TIMING_SCHEMA", "Answered", "EvalConfig", "EvalParts", "EvalPlan",
    "accuracy_table", "adaptive_tables", "answer_samples", "benchmark_scores", "by_budget", "configurations",
    "evaluate_sample", "numerics_key", "plan_eval", "predictions", "pruned_answer_tokens", "ratio_rows_keep_null",
    "reference_label", "relations_table", "run_eval", "schedule_text", "sorted_predictions", "stage_spec",
    "statistics_frame", "time_configurations", "with_adjusted", "with_full_control", "with_schedule", "with_units",
    "write_answer_files",
]
