"""Figures and tables of a run directory, as functions a researcher can call from any notebook.

Each ``plot_*`` function takes the tables it needs (or a :class:`RunTables`) and returns a
matplotlib Figure with a title, labelled axes and a legend (or None where the run has
nothing to draw, e.g. no question categories). :data:`REGISTRY` lists every figure with its
section; :func:`figure` draws one and :func:`save_all` writes them all to ``RUN/figures/``;
``notebooks/report.ipynb`` shows them with a text cell each, and ``fastv-analyze report``
executes that notebook headless into ``RUN/report.html`` (:func:`render`: one-line
:class:`ReportError` on failure, full traceback in ``RUN/report-error.log``, no temporary
files left behind).

Modules: ``tables`` (a run's tables), ``style`` (palette, figures, labels), ``configs`` (which
configurations a section shows), ``grids`` (each sample's token grid, from the adapters), one
module per section (``accuracy``, ``categories``, ``overlap``, ``heads``, ``attention_maps``,
``keep_frequency``, ``examples``, ``relations``, ``position_bias``, ``sinks``, ``queries``,
``layers``, ``beats_random``, ``adaptive_choice``, ``methods``), ``figures`` (the registry) and ``render``
(papermill, kernel, HTML).
"""

from __future__ import annotations

from pathlib import Path  # noqa: F401  (report.Path: the notebook's and tests' paths)

from .accuracy import full_control_note, main_numbers, plot_accuracy_vs_alpha, plot_accuracy_vs_keep, plot_cost
from .adaptive_choice import adaptive_note, adaptive_view, oracle_view
from .attention_maps import attention_sample_ids, plot_sample_attention
from .beats_random import SIGNIFICANCE, beats_random, beats_random_summary, beats_random_view
from .categories import category_accuracy, category_table, plot_category_accuracy
from .configs import PLAIN, one_config_per_method, primary_only, strategy_configs
from .examples import BASE_EDGE, KEPT_EDGE, KEPT_FILL, MARK, example_sample_ids, kept_boxes, plot_examples
from .figures import FIGURES, NEEDS, REGISTRY, Figure, figure, not_shown, save_all, why_missing
from .grids import SPATIAL_TITLES, base_tile, cell_boxes, grid_extent, grid_note, grid_side
from .heads import plot_head_statistics
from .keep_frequency import grid_keep_frequency, keep_frequency, plot_keep_frequency
from .layers import layer_dynamics, plot_layer_dynamics, run_layer_dynamics
from .methods import (method_relations_view, methods_missing, methods_note, methods_view, plot_method_statistics,
                      plot_methods_cost, statistics_summary)
from .overlap import chance_jaccard, mean_chance_jaccard, plot_overlap_heatmap
from .position_bias import POSITION_CONFIGS, kept_positions, plot_positional_bias, position_profile, position_summary
from .queries import QUERY_COLORS, QUERY_VARIANTS, plot_query_choice, query_agreement, query_table
from .relations import plot_object_coverage, plot_relations
from .render import ERROR_LOG, KERNEL_NOISE, NOTEBOOK, REQUIRED, ReportError, check_ready, render
from .sinks import (plot_attention_sinks, run_sink_masks, sink_keep_share, sink_map, sink_masks, sink_note,
                    sink_ratio)
from .style import PALETTE, base_method, config_colors
from .tables import RunTables, configure_tables, load_tables, n_image_tokens, paired_p, resolve_run_dir, \
    sample_token_counts

_primary_only = primary_only  # the names these had when report was one module
_base_method = base_method

__all__ = [
    "BASE_EDGE", "ERROR_LOG", "FIGURES", "Figure", "KEPT_EDGE", "KEPT_FILL", "KERNEL_NOISE", "MARK", "NEEDS",
    "NOTEBOOK", "PALETTE", "PLAIN", "POSITION_CONFIGS", "QUERY_COLORS", "QUERY_VARIANTS", "REGISTRY", "REQUIRED",
    "ReportError", "RunTables", "SIGNIFICANCE", "SPATIAL_TITLES", "adaptive_note", "adaptive_view",
    "attention_sample_ids", "base_method", "base_tile", "beats_random", "beats_random_summary",
    "beats_random_view", "category_accuracy", "category_table", "cell_boxes", "chance_jaccard", "check_ready",
    "config_colors", "configure_tables", "example_sample_ids", "figure", "full_control_note", "grid_extent",
    "grid_keep_frequency", "grid_note", "grid_side", "keep_frequency", "kept_boxes", "kept_positions",
    "layer_dynamics", "load_tables", "main_numbers", "mean_chance_jaccard", "method_relations_view",
    "methods_missing", "methods_note", "methods_view", "plot_method_statistics", "plot_methods_cost",
    "statistics_summary", "n_image_tokens", "not_shown",
    "one_config_per_method", "oracle_view", "paired_p", "plot_accuracy_vs_alpha", "plot_accuracy_vs_keep",
    "plot_attention_sinks", "plot_category_accuracy", "plot_cost", "plot_examples", "plot_head_statistics",
    "plot_keep_frequency", "plot_layer_dynamics", "plot_object_coverage", "plot_overlap_heatmap",
    "plot_positional_bias", "plot_query_choice", "plot_relations", "plot_sample_attention", "position_profile",
    "position_summary", "primary_only", "query_agreement", "query_table", "render", "resolve_run_dir",
    "run_layer_dynamics", "run_sink_masks", "sample_token_counts", "save_all", "sink_keep_share",
    "sink_map", "sink_masks", "sink_note", "sink_ratio", "strategy_configs", "why_missing",
]
