"""The figure registry the notebook iterates: each figure's name, section, drawing, the table it
needs and the one line its section shows when the run lacks its inputs; saving PNGs under
RUN/figures/.

A new figure: a ``plot_*`` function in its section's module (data in, Figure or None out) and
one :data:`REGISTRY` line; ``notebooks/report.ipynb`` draws every registered figure (at its end,
under its section's name, where the notebook has no text of its own for it yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .accuracy import plot_accuracy_vs_alpha, plot_accuracy_vs_keep, plot_cost
from .adaptive_choice import adaptive_missing
from .attention_maps import attention_examples
from .beats_random import beats_random_missing
from .categories import plot_category_accuracy
from .examples import plot_examples
from .grids import spatial_missing
from .heads import plot_head_statistics
from .keep_frequency import plot_keep_frequency
from .methods import methods_missing, plot_method_statistics, plot_methods_cost
from .layers import layer_dynamics_missing, plot_layer_dynamics, run_layer_dynamics
from .overlap import plot_overlap_heatmap
from .position_bias import plot_positional_bias, positional_bias_missing
from .queries import plot_query_choice, query_agreement, query_choice_missing
from .relations import plot_object_coverage, plot_relations
from .sinks import sinks_figure, sinks_missing
from .tables import RunTables, load_tables, n_image_tokens, sample_token_counts


@dataclass(frozen=True)
class Figure:
    """One registered figure: saved as RUN/figures/<name>.png, shown in ``section``."""

    name: str
    section: str                                     # the report section (notebook heading) that shows it
    draw: Callable[[RunTables], object]              # a matplotlib Figure, or None: nothing to draw
    needs: str                                       # the RunTables field without which there is no figure
    missing: Callable[[RunTables], str | None] | None = None  # the line shown instead (None: can draw)


def _spatial(name: str) -> Callable[[RunTables], str | None]:
    return lambda t: spatial_missing(name, t)


REGISTRY: tuple[Figure, ...] = (
    Figure("accuracy_vs_keep", "1. Accuracy vs keep", lambda t: plot_accuracy_vs_keep(t.accuracy), "accuracy"),
    Figure("accuracy_vs_alpha", "4. Accuracy vs alpha",
           lambda t: plot_accuracy_vs_alpha(t.accuracy, t.num_heads), "accuracy"),
    Figure("category_accuracy", "2. Accuracy per question category",
           lambda t: plot_category_accuracy(t.predictions), "predictions"),
    Figure("cost", "3. Cost: FLOPs and measured speed-up", lambda t: plot_cost(t.accuracy), "accuracy"),
    Figure("overlap_heatmap", "5. Overlap between strategies",
           lambda t: plot_overlap_heatmap(t.overlap_summary, n_tokens=sample_token_counts(t)), "overlap_summary"),
    Figure("head_statistics", "6. Heads", lambda t: plot_head_statistics(t.heads, t.num_heads), "heads"),
    Figure("keep_frequency", "8. Where kept tokens sit", lambda t: plot_keep_frequency(
        t.selections, samples=t.samples, architecture=t.architecture), "selections", _spatial("keep_frequency")),
    Figure("examples", "9. Examples", lambda t: plot_examples(
        t.selections, t.samples, predictions=t.predictions, geometry=t.geometry, architecture=t.architecture),
        "selections", _spatial("examples")),
    Figure("sample_attention", "7. Attention per head, next to the image", attention_examples, "selections",
           _spatial("sample_attention")),
    Figure("relations", "10. Statistics vs correctness", lambda t: plot_relations(t.relations), "relations"),
    Figure("object_coverage", "2b. Object coverage", lambda t: plot_object_coverage(t.predictions), "predictions"),
    Figure("positional_bias", "11. Positional bias", lambda t: plot_positional_bias(t.selections, t.samples),
           "selections", positional_bias_missing),
    Figure("attention_sinks", "12. Attention sinks", sinks_figure, "heads", sinks_missing),
    Figure("query_choice", "13. Query choice", lambda t: plot_query_choice(
        query_agreement(t.overlap_summary, t.accuracy, n_tokens=n_image_tokens(t))), "overlap_summary",
        query_choice_missing),
    Figure("layer_dynamics", "14. Layer dynamics",
           lambda t: plot_layer_dynamics(run_layer_dynamics(t), n_tokens=n_image_tokens(t)), "selections",
           layer_dynamics_missing),
    Figure("methods_cost", "17. The field's methods side by side", lambda t: plot_methods_cost(t.methods), "methods",
           methods_missing),
    Figure("methods_statistics", "17. The field's methods side by side",
           lambda t: plot_method_statistics(t.method_statistics), "method_statistics", methods_missing),
)
FIGURES = {f.name: f.draw for f in REGISTRY}
NEEDS = {f.name: f.needs for f in REGISTRY}
SECTIONS_WITHOUT_FIGURE = {"beats_random": beats_random_missing, "adaptive": adaptive_missing}
"""Sections that show tables only, with the line each shows when the run lacks them."""


def why_missing(name: str, t: RunTables) -> str | None:
    """The one line a section shows instead of its figure or table when the run lacks its
    inputs (None when it has them)."""
    entry = next((f for f in REGISTRY if f.name == name and f.missing is not None), None)
    check = entry.missing if entry is not None else SECTIONS_WITHOUT_FIGURE.get(name)
    if check is None:
        raise ValueError(f"unknown section {name!r}")
    t.cache.setdefault("figures_shown", set()).add(name)  # its section has said why (or will draw it)
    return check(t)


def figure(name: str, tables: RunTables, save: bool = True):
    """Draw figure ``name`` from ``tables`` and save it as RUN/figures/<name>.png (None, and no
    PNG, where the run lacks its stage or has nothing to draw, e.g. no question categories)."""
    entry = next(f for f in REGISTRY if f.name == name)
    tables.cache.setdefault("figures_shown", set()).add(name)
    if getattr(tables, entry.needs) is None:
        return None
    fig = None if entry.missing is not None and entry.missing(tables) else entry.draw(tables)
    if save:
        _save(fig, tables.root / "figures", name)
    return fig


def _save(fig, out: Path, name: str) -> None:
    """``out/<name>.png`` via a temporary name; a figure that is None removes a stale PNG."""
    import os

    if fig is None:
        (out / f"{name}.png").unlink(missing_ok=True)  # a stale PNG would claim what this run lacks
        return
    out.mkdir(exist_ok=True)
    tmp = out / f".{name}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, out / f"{name}.png")
    finally:
        tmp.unlink(missing_ok=True)


def not_shown(tables: RunTables) -> list[Figure]:
    """The registered figures no section has drawn (:func:`figure`) or explained
    (:func:`why_missing`) from ``tables`` yet: the notebook shows these at its end, so a new
    figure appears, under its section's name, before its section text is written."""
    shown = tables.cache.get("figures_shown", set())
    return [f for f in REGISTRY if f.name not in shown]


def save_all(run_dir: str | Path) -> list[Path]:
    """Every figure the run's tables allow, as PNGs under RUN/figures/."""
    import matplotlib.pyplot as plt

    tables = load_tables(run_dir)
    written = []
    for entry in REGISTRY:
        fig = figure(entry.name, tables)
        if fig is not None:
            written.append(tables.root / "figures" / f"{entry.name}.png")
            plt.close(fig)
    return written
