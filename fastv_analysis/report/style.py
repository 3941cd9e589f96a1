"""Palette, figure and label helpers every section shares (one hue family per method).
"""

from __future__ import annotations

import numpy as np

from ..strategies import METHODS as METHOD_ORDER


PALETTE = {"avg_all_heads": "#1f77b4", "max_head": "#d62728", "weighted_combination": "#2ca02c",
           "random": "#7f7f7f", "uniform": "#9467bd", "full": "black",
           "dynamic_alpha": "#ff7f0e", "no_rope": "#8c564b", "sink_excluded": "#e377c2", "diverse": "#17becf",
           "hybrid_uniform": "#bcbd22", "divprune": "#ffbf00", "dart": "#393b79", "pooling": "#ff1493",
           "cdpruner": "#800000", "sparsevlm": "#469990", "visionzip": "#f032e6", "vispruner": "#808000"}
EXTRA_HUES = ("#637939", "#ad494a", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363")
"""Hues for methods PALETTE does not name (a newly registered strategy), in the order the
figure first meets them, so no two share the fallback grey."""


def set_style():
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")


def new_figure(width=7.0, height=4.5, ncols=1, nrows=1, **kw):
    import matplotlib.pyplot as plt

    set_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)
    return fig, axes


def method_label(config: str) -> str:
    return config.replace("weighted_combination", "weighted")


def tick_step(n: int) -> int:
    return max(1, round(n / 4))


def grid_map(ax, values: np.ndarray, cmap: str, label: str, vmin: float | None = None, vmax: float | None = None):
    """A token-grid map (rows x cols) with its own colour bar; ticks every quarter (imshow:
    seaborn's heatmap redraws the whole figure per call, slow on a many-panel figure)."""
    rows, cols = values.shape
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, extent=(0, cols, rows, 0), interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, shrink=0.7, label=label)
    ax.set_xticks(np.arange(0, cols, tick_step(cols)) + 0.5, [str(t) for t in range(0, cols, tick_step(cols))])
    ax.set_yticks(np.arange(0, rows, tick_step(rows)) + 0.5, [str(t) for t in range(0, rows, tick_step(rows))])
    ax.grid(False)


def base_method(config: str) -> str:
    """The registered method a configuration label names (``dart``, ``pooling positions=compact``
    and ``avg_all_heads@text_mean then ...`` -> ``dart``, ``pooling``, ``avg_all_heads``)."""
    return config.split(" then ")[0].split("@")[0].split("(")[0].split(" ")[0]


MARKERS = {"llm": "o", "input": "s", "vision": "^"}
"""Marker of a method by where it reads (:data:`fastv_analysis.strategies.WHERE`): so the
field's pre-LLM and vision-side methods stand out beside the attention rankings."""


def where_marker(config: str) -> str:
    from ..strategies import STRATEGIES

    spec = STRATEGIES.get(base_method(config))
    return MARKERS.get(spec.where if spec is not None else "llm", "o")


def config_colors(configs) -> dict[str, tuple]:
    """One hue family per method (:data:`PALETTE`), one shade per configuration within it:
    weighted_combination's alphas from light (alpha 0) to dark (alpha 1), query variants and
    schedules lighter than their method's own configuration; methods in METHOD_ORDER first."""
    from matplotlib.colors import to_rgb

    groups: dict[str, list[str]] = {}
    for config in configs:
        groups.setdefault(base_method(config), []).append(config)
    def shade(base, t):  # mix with white (t < 0) or black (t > 0)
        return tuple(np.clip(base + (1 - base) * -t if t < 0 else base * (1 - t), 0, 1))

    out = {}
    extra = iter(EXTRA_HUES * (1 + len(groups) // len(EXTRA_HUES)))
    for method, members in groups.items():
        base = np.array(to_rgb(PALETTE[method] if method in PALETTE else next(extra)))
        plain = sorted(c for c in members if "@" not in c and " then " not in c)
        variants = sorted(c for c in members if c not in plain)
        steps = np.linspace(-0.5, 0.4, len(plain)) if len(plain) > 1 else [0.0]
        out.update({c: shade(base, t) for c, t in zip(plain, steps)})
        out.update({c: shade(base, -0.3 - 0.3 * i / max(len(variants) - 1, 1)) for i, c in enumerate(variants)})
    return out


def ordered_configs(configs) -> list[str]:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(configs, key=lambda c: (rank.get(base_method(c), len(rank)), base_method(c), c))


def method_color(config: str) -> str:
    return PALETTE.get(config.split("(")[0].split("@")[0], "0.4")
