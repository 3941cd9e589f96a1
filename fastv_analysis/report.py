"""Figures of a run directory, as functions a researcher can call from any notebook.

Each ``plot_*`` function takes the tables it needs (or a :class:`RunTables`) and returns a
matplotlib Figure with a title, labelled axes and a legend. :func:`save_all` writes them
to ``RUN/figures/``; ``notebooks/report.ipynb`` shows them with a text cell each, and
``fastv-analyze report`` executes that notebook headless into ``RUN/report.html``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .strategies import METHODS as METHOD_ORDER

PALETTE = {"avg_all_heads": "#1f77b4", "max_head": "#d62728", "weighted_combination": "#2ca02c",
           "random": "#7f7f7f", "uniform": "#9467bd", "full": "black"}


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


def load_tables(run_dir: str | Path) -> RunTables:
    root = Path(run_dir)

    def read(*parts):
        p = root.joinpath(*parts)
        return pl.read_parquet(p) if p.exists() else None

    import json

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
    )


def _style():
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")


def _figure(width=7.0, height=4.5, ncols=1, nrows=1, **kw):
    import matplotlib.pyplot as plt

    _style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)
    return fig, axes


def _primary_alpha(accuracy: pl.DataFrame) -> float | None:
    alphas = accuracy.filter(pl.col("method") == "weighted_combination")["alpha"].unique().drop_nulls().to_list()
    if not alphas:
        return None
    return min(alphas, key=lambda a: abs(a - 0.5))


def plot_accuracy_vs_keep(accuracy: pl.DataFrame, agg_layer: int | None = None):
    """Accuracy vs kept image tokens, one line per method, 95% intervals, full model as reference."""
    layer = agg_layer if agg_layer is not None else accuracy["agg_layer"].min()
    acc = accuracy.filter(pl.col("agg_layer") == layer)
    alpha = _primary_alpha(acc)
    acc = acc.filter((pl.col("method") != "weighted_combination") | (pl.col("alpha") == alpha))
    fig, axes = _figure()
    ax = axes[0, 0]
    for method in [m for m in METHOD_ORDER if m in acc["method"].unique().to_list()]:
        d = acc.filter(pl.col("method") == method).sort("keep")
        label = method if method != "weighted_combination" else f"weighted_combination (alpha={alpha:g})"
        x, y = d["keep"].to_numpy(), 100 * d["accuracy"].to_numpy()
        err = np.vstack([y - 100 * d["ci_lo"].to_numpy(), 100 * d["ci_hi"].to_numpy() - y])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, color=PALETTE[method])
    full = 100 * float(acc.filter(pl.col("method") == "full")["accuracy"][0])
    ax.axhline(full, color="black", linestyle="--", label=f"full control, nothing pruned ({full:.1f}%)")
    ax.set_xscale("log", base=2)
    keeps = sorted(k for k in acc.filter(pl.col("method") != "full")["keep"].unique().to_list() if k > 0)
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.minorticks_off()
    ax.set_xlabel("image tokens kept after layer K (count, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Accuracy vs keep at agg layer K={layer} (n={int(acc['n'][0])}, 95% Wilson intervals)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_accuracy_vs_alpha(accuracy: pl.DataFrame, num_heads: int | None = None, agg_layer: int | None = None):
    """weighted_combination accuracy vs alpha, one line per keep; avg_all_heads at 1/H and max_head at 1 marked."""
    layer = agg_layer if agg_layer is not None else accuracy["agg_layer"].min()
    acc = accuracy.filter(pl.col("agg_layer") == layer)
    wc = acc.filter(pl.col("method") == "weighted_combination")
    fig, axes = _figure()
    ax = axes[0, 0]
    import seaborn as sns

    keeps = sorted(wc["keep"].unique().to_list(), reverse=True)
    colors = dict(zip(keeps, sns.color_palette("viridis", len(keeps))))
    for keep in keeps:
        d = wc.filter(pl.col("keep") == keep).sort("alpha")
        ax.plot(d["alpha"], 100 * d["accuracy"], marker="o", color=colors[keep], label=f"keep {keep}")
        for method, x, marker in (("avg_all_heads", 1 / num_heads if num_heads else None, "s"),
                                  ("max_head", 1.0, "^")):
            ref = acc.filter(pl.col("method") == method, pl.col("keep") == keep)
            if ref.height and x is not None:
                ax.scatter([x], [100 * ref["accuracy"][0]], marker=marker, s=90, facecolors="none",
                           edgecolors=colors[keep], linewidths=2)
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="s", linestyle="", markerfacecolor="none", markeredgecolor="black",
                       label=f"avg_all_heads (alpha = 1/H{'' if not num_heads else f' = {1 / num_heads:.2f}'})"),
                Line2D([], [], marker="^", linestyle="", markerfacecolor="none", markeredgecolor="black",
                       label="max_head (alpha = 1)")]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("alpha (weight of the max head)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"weighted_combination: accuracy vs alpha at K={layer}")
    fig.tight_layout()
    return fig


def _method_label(config: str) -> str:
    return config.replace("weighted_combination", "weighted")


def plot_overlap_heatmap(overlap_summary: pl.DataFrame, agg_layer: int | None = None, max_configs: int = 8):
    """Mean Jaccard overlap between configurations' kept sets, one panel per keep."""
    import seaborn as sns

    layer = agg_layer if agg_layer is not None else overlap_summary["agg_layer"].min()
    ov = overlap_summary.filter(pl.col("agg_layer") == layer)
    configs = list(dict.fromkeys(ov["config_a"].to_list() + ov["config_b"].to_list()))
    if len(configs) > max_configs:  # keep the single methods and a few alphas readable
        wc = [c for c in configs if c.startswith("weighted")]
        keep_wc = wc[:: max(1, math.ceil(len(wc) / (max_configs - (len(configs) - len(wc)))))]
        configs = [c for c in configs if not c.startswith("weighted") or c in keep_wc]
    keeps = sorted(ov["keep"].unique().to_list(), reverse=True)
    fig, axes = _figure(width=4.6 * len(keeps), height=4.6, ncols=len(keeps))
    for ax, keep in zip(axes[0], keeps):
        m = np.eye(len(configs))
        d = ov.filter(pl.col("keep") == keep)
        idx = {c: i for i, c in enumerate(configs)}
        for a, b, j in d.select("config_a", "config_b", "jaccard_mean").iter_rows():
            if a in idx and b in idx:
                m[idx[a], idx[b]] = m[idx[b], idx[a]] = j
        labels = [_method_label(c) for c in configs]
        sns.heatmap(m, ax=ax, vmin=0, vmax=1, cmap="mako", annot=len(configs) <= 8, fmt=".2f",
                    xticklabels=labels, yticklabels=labels, cbar_kws={"label": "mean Jaccard"},
                    annot_kws={"size": 7})
        ax.set_title(f"keep {keep}")
        ax.set_xlabel("configuration")
        ax.set_ylabel("configuration")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"Overlap of kept sets between strategies (agg layer K={layer})")
    fig.tight_layout()
    return fig


def plot_head_statistics(heads: pl.DataFrame, num_heads: int | None = None):
    """How often each head is the max head, and the spread of head-importance entropy, per layer."""
    import seaborn as sns

    fig, axes = _figure(width=11, height=4.2, ncols=2)
    h = num_heads or int(heads["max_head"].max()) + 1
    layers = sorted(heads["agg_layer"].unique().to_list())
    counts = (heads.group_by(["agg_layer", "max_head"]).len().with_columns(
        (pl.col("len") / pl.col("len").sum().over("agg_layer") * 100).alias("share")))
    ax = axes[0, 0]
    width = 0.8 / len(layers)
    for i, layer in enumerate(layers):
        d = counts.filter(pl.col("agg_layer") == layer)
        share = np.zeros(h)
        share[d["max_head"].to_numpy()] = d["share"].to_numpy()
        ax.bar(np.arange(h) + i * width - 0.4 + width / 2, share, width=width, label=f"layer K-1={layer - 1}")
    ax.set_xlabel("head index")
    ax.set_ylabel("samples where it is the max head (%)")
    ax.set_title("Max-head frequency")
    ax.set_xticks(np.arange(h) if h <= 40 else np.arange(0, h, max(1, h // 16)))
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for layer in layers:
        d = heads.filter(pl.col("agg_layer") == layer)["head_entropy"].to_numpy()
        sns.histplot(d, ax=ax, bins=20, binrange=(0, 1), stat="percent", element="step",
                     label=f"layer K-1={layer - 1}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("normalised head-importance entropy (0 = one head, 1 = all equal)")
    ax.set_ylabel("samples (%)")
    ax.set_title("Head-importance entropy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def keep_frequency(selections: pl.DataFrame, n_tokens: int) -> dict[str, np.ndarray]:
    """Per configuration: fraction of samples in which each image token was kept ``[N]``."""
    out = {}
    for (config,), d in selections.group_by(["config"], maintain_order=True):
        kept = d["kept"].explode().drop_nulls().to_numpy()
        out[config] = np.bincount(kept, minlength=n_tokens) / max(d.height, 1)
    return out


def one_config_per_method(selections: pl.DataFrame, keep: int | None = None, agg_layer: int | None = None):
    """The selections of one layer and keep (default: the smallest keep > 0), one configuration
    per method (weighted_combination at its alpha nearest 0.5); returns (rows, layer, keep, configs)."""
    layer = agg_layer if agg_layer is not None else selections["agg_layer"].min()
    sel = selections.filter(pl.col("agg_layer") == layer)
    keeps = sorted(sel["keep"].unique().to_list())
    keep = keep if keep is not None else next((k for k in keeps if k > 0), keeps[0])
    sel = sel.filter(pl.col("keep") == keep)
    alpha = _primary_alpha(sel)
    sel = sel.filter((pl.col("method") != "weighted_combination") | (pl.col("alpha") == alpha))
    configs = [c for m in METHOD_ORDER for c in sel["config"].unique().sort().to_list() if c.split("(")[0] == m]
    return sel, layer, keep, configs


def grid_side(selections: pl.DataFrame) -> int:
    """Side of the square image-token grid (24 for LLaVA-1.5's 576), from keep / keep_ratio."""
    row = selections.filter(pl.col("keep") > 0).head(1)
    return math.isqrt(round(row["keep"][0] / row["keep_ratio"][0])) if row.height else 24


def plot_keep_frequency(selections: pl.DataFrame, keep: int | None = None, agg_layer: int | None = None):
    """Where kept tokens sit: keep frequency of every grid cell (e.g. 24 x 24), one panel per method."""
    import seaborn as sns

    sel, layer, keep, configs = one_config_per_method(selections, keep, agg_layer)
    side = grid_side(sel)
    freq = keep_frequency(sel, side * side)
    fig, axes = _figure(width=3.9 * len(configs), height=3.8, ncols=len(configs))
    for ax, config in zip(axes[0], configs):
        sns.heatmap((100 * freq[config]).reshape(side, side), ax=ax, vmin=0, vmax=100, cmap="rocket_r", square=True,
                    cbar_kws={"label": "kept in % of samples", "shrink": 0.7}, xticklabels=6, yticklabels=6)
        ax.set_title(_method_label(config), fontsize=9)
        ax.set_xlabel("image column (patch)")
        ax.set_ylabel("image row (patch)")
    fig.suptitle(f"Keep frequency per image patch (keep {keep}, K={layer})")
    fig.tight_layout()
    return fig


def plot_examples(selections: pl.DataFrame, samples: pl.DataFrame, n_examples: int = 3, keep: int | None = None,
                  agg_layer: int | None = None):
    """A few images with each method's kept tokens drawn over them (kept patches bright)."""
    from PIL import Image

    sel, layer, keep, configs = one_config_per_method(selections, keep, agg_layer)
    ids = samples["sample_id"].head(n_examples).to_list()
    fig, axes = _figure(width=2.6 * len(configs), height=2.9 * len(ids), ncols=len(configs), nrows=len(ids))
    for r, sid in enumerate(ids):
        row = samples.filter(pl.col("sample_id") == sid).row(0, named=True)
        side = grid_side(sel)
        cell = max(1, 336 // side)
        img = np.asarray(Image.open(row["image"]).convert("RGB").resize((side * cell, side * cell)))
        img = img.astype(float) / 255
        for c, config in enumerate(configs):
            ax = axes[r, c]
            kept = sel.filter(pl.col("sample_id") == sid, pl.col("config") == config)["kept"]
            mask = np.zeros(side * side)
            if kept.len():
                mask[np.asarray(kept[0], dtype=int)] = 1
            overlay = np.kron(mask.reshape(side, side), np.ones((cell, cell)))[..., None]
            ax.imshow(img * (0.25 + 0.75 * overlay))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_method_label(config), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{row['question'][:28]}\nanswer: {row['answer']}", fontsize=8)
    fig.suptitle(f"Kept tokens (bright) at keep {keep}, K={layer}")
    fig.tight_layout()
    return fig


def plot_relations(relations: pl.DataFrame):
    """Left: within-sample correlation of each statistic with correctness, pooled over pruned
    configurations (permutation p, Holm-adjusted). Right: accuracy by quartile of the
    overlap with avg_all_heads, one line per configuration at the smallest keep."""
    fig, axes = _figure(width=13, height=4.8, ncols=2)
    ax = axes[0, 0]
    pooled = relations.filter(pl.col("scope") == "within_sample", pl.col("r_within").is_not_null())
    if pooled.height:
        names = pooled["statistic"].to_list()
        r = pooled["r_within"].to_numpy()
        ax.barh(range(len(names)), r, color=["#1f77b4" if v >= 0 else "#d62728" for v in r])
        for i, row in enumerate(pooled.iter_rows(named=True)):
            ax.annotate(f"p_holm={row['p_holm']:.1e} (n={row['n']}, {row['n_strata']} strata)", (0, i),
                        xytext=(4 if row["r_within"] < 0 else -4, 0), textcoords="offset points", va="center",
                        ha="left" if row["r_within"] < 0 else "right", fontsize=8)
        ax.set_yticks(range(len(names)), names)
        ax.axvline(0, color="black", linewidth=0.8)
        lim = max(0.05, float(np.abs(r).max()) * 1.1)
        ax.set_xlim(-lim, lim)
    ax.set_xlabel("within-sample correlation with correctness (r)")
    ax.set_ylabel("selection statistic")
    ax.set_title("Pooled, compared within (sample, layer, keep)")
    ax = axes[0, 1]
    per = relations.filter(pl.col("scope") == "configuration", pl.col("statistic") == "jaccard_vs_avg",
                           pl.col("keep") > 0)
    q_cols = [c for c in relations.columns if c.startswith("accuracy_q")]
    if per.height:
        keep = per["keep"].min()
        layer = per["agg_layer"].min()
        for row in per.filter(pl.col("keep") == keep, pl.col("agg_layer") == layer,
                              pl.col("config") != "avg_all_heads").iter_rows(named=True):
            y = [np.nan if row[c] is None else 100 * row[c] for c in q_cols]
            rho = "" if row["spearman_rho"] is None else f" rho {row['spearman_rho']:+.2f}, p_holm {row['p_holm']:.1e}"
            ax.plot(range(1, len(q_cols) + 1), y, marker="o", label=f"{row['config']}{rho}")
        ax.set_title(f"Accuracy by quartile of Jaccard with avg_all_heads (keep {keep}, K={layer})")
        ax.legend(fontsize=7, loc="best")
    ax.set_xticks(range(1, len(q_cols) + 1))
    ax.set_xlabel("quartile of the statistic over samples (1 = lowest)")
    ax.set_ylabel("accuracy of the pruned model (%)")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    return fig


def plot_sample_attention(run_dir: str | Path, sample_id: int, agg_layer: int | None = None, max_heads: int = 8):
    """One sample's last-token attention at layer K-1 on the image grid: the head mean
    (what avg_all_heads ranks) and each head (the max head marked), from the cached run."""
    import seaborn as sns

    from .store import open_run
    from .strategies import head_importance, max_head_index

    run = open_run(run_dir)
    layer = agg_layer if agg_layer is not None else run.agg_layers[0]
    att = run.last_token_attention(sample_id, layer)  # [H, N]
    side = math.isqrt(att.shape[-1])
    top = int(max_head_index(head_importance(att)))
    heads = list(range(min(att.shape[0], max_heads)))
    if top not in heads:
        heads[-1] = top
    panels = [("mean over heads", att.mean(0))] + [
        (f"head {h}{' (max head)' if h == top else ''}", att[h]) for h in heads]
    fig, axes = _figure(width=3.4 * len(panels), height=3.6, ncols=len(panels))
    for ax, (title, a) in zip(axes[0], panels):
        sns.heatmap((100 * a).reshape(side, side).numpy(), ax=ax, cmap="viridis", square=True, xticklabels=6,
                    yticklabels=6, cbar_kws={"label": "attention (% of the row)", "shrink": 0.7})
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("image column (patch)")
        ax.set_ylabel("image row (patch)")
    row = run.samples.filter(pl.col("sample_id") == sample_id).row(0, named=True)
    fig.suptitle(f"Sample {sample_id}: last-token attention to the image at layer {layer - 1} "
                 f"(\"{row['question'][:40]}\" -> {row['prediction']!r}, reference {row['answer']!r})")
    fig.tight_layout()
    return fig


def _sci(col: str) -> pl.Expr:
    """A p-value column as text in scientific notation ("" where there is no test)."""
    return pl.col(col).map_elements(lambda p: f"{p:.2e}", return_dtype=pl.Utf8).fill_null("").alias(col)


def main_numbers(accuracy: pl.DataFrame) -> pl.DataFrame:
    """The headline table: accuracy per method and keep (weighted at its alpha nearest 0.5),
    its interval, the change vs the full control, exact McNemar p-values vs full and vs
    avg_all_heads with their Holm adjustment over the whole table, and FLOPs."""
    alpha = _primary_alpha(accuracy)
    acc = accuracy.filter((pl.col("method") != "weighted_combination") | (pl.col("alpha") == alpha))
    return acc.select("agg_layer", "keep", "config", "n", (pl.col("accuracy") * 100).round(1).alias("accuracy_%"),
                      (pl.col("ci_lo") * 100).round(1).alias("ci_lo_%"), (pl.col("ci_hi") * 100).round(1).alias("ci_hi_%"),
                      (pl.col("delta_vs_full") * 100).round(1).alias("delta_vs_full_pts"),
                      _sci("mcnemar_p_vs_full"), _sci("mcnemar_p_vs_full_holm"), _sci("mcnemar_p_vs_avg"),
                      _sci("mcnemar_p_vs_avg_holm"), pl.col("flops_ratio").round(3),
                      pl.col("prefill_speedup_vs_full").round(2)).sort(
        ["agg_layer", "keep", "config"], descending=[False, True, False])


def full_control_note(info: dict | None) -> str:
    """One line on how the full control compares with capture's own answers."""
    if not info or "full_vs_capture" not in info:
        return "eval has not run (or predates the full control)"
    f = info["full_vs_capture"]
    timing = info.get("timing", {})
    return (f"Full control vs capture's `generate` answers: {f['differ']} of {f['compared']} differ "
            f"(0 expected on CPU float32). Timings: {timing.get('samples')} samples x {timing.get('repeats')} "
            f"repeats after a warm-up pass, {timing.get('threads')} threads on {timing.get('device')}.")


FIGURES = {
    "accuracy_vs_keep": lambda t: plot_accuracy_vs_keep(t.accuracy),
    "accuracy_vs_alpha": lambda t: plot_accuracy_vs_alpha(t.accuracy, t.num_heads),
    "overlap_heatmap": lambda t: plot_overlap_heatmap(t.overlap_summary),
    "head_statistics": lambda t: plot_head_statistics(t.heads, t.num_heads),
    "keep_frequency": lambda t: plot_keep_frequency(t.selections),
    "examples": lambda t: plot_examples(t.selections, t.samples),
    "relations": lambda t: plot_relations(t.relations),
}
NEEDS = {"accuracy_vs_keep": "accuracy", "accuracy_vs_alpha": "accuracy", "overlap_heatmap": "overlap_summary",
         "head_statistics": "heads", "keep_frequency": "selections", "examples": "selections",
         "relations": "relations"}


def figure(name: str, tables: RunTables, save: bool = True):
    """Draw figure ``name`` from ``tables`` and save it as RUN/figures/<name>.png."""
    if getattr(tables, NEEDS[name]) is None:
        return None
    fig = FIGURES[name](tables)
    if save:
        import os

        out = tables.root / "figures"
        out.mkdir(exist_ok=True)
        tmp = out / f".{name}.tmp-{os.getpid()}.png"
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, out / f"{name}.png")
    return fig


def save_all(run_dir: str | Path) -> list[Path]:
    """Every figure the run's tables allow, as PNGs under RUN/figures/."""
    import matplotlib.pyplot as plt

    tables = load_tables(run_dir)
    written = []
    for name in FIGURES:
        fig = figure(name, tables)
        if fig is not None:
            written.append(tables.root / "figures" / f"{name}.png")
            plt.close(fig)
    return written


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "report.ipynb"


def render(run_dir: str | Path, out: str | Path | None = None, notebook: str | Path = NOTEBOOK,
           progress: bool = False) -> Path:
    """Execute the report notebook headless on ``run_dir`` (papermill) and export HTML.

    Writes RUN/report.ipynb (executed), RUN/figures/*.png and the HTML report (images
    embedded, code hidden) to ``out`` (default RUN/report.html), via a temporary name.
    """
    import os

    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    root = Path(run_dir)
    if not (root / "run.json").exists():
        raise FileNotFoundError(f"{root} is not a run directory: {root / 'run.json'} is missing")
    if not Path(notebook).exists():
        raise FileNotFoundError(f"report notebook {notebook} is missing (install fastv-analysis with `pip install -e .`)")
    out = Path(out) if out else root / "report.html"
    executed = root / f".report.tmp-{os.getpid()}.ipynb"
    pm.execute_notebook(str(notebook), str(executed), parameters={"run_dir": str(root.resolve())},
                        kernel_name="python3", progress_bar=progress, cwd=str(root))
    os.replace(executed, root / "report.ipynb")
    executed = root / "report.ipynb"
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, out)
    _write_provenance(root, out, Path(notebook))
    return out


def _write_provenance(root: Path, html: Path, notebook: Path) -> None:
    """RUN/report.json: what the report was made from (stage files, fingerprints, versions)."""
    import json

    from .provenance import file_sha256, versions
    from .store import atomic_write_json

    config = json.loads((root / "run.json").read_text())
    inputs = [p for p in ("samples.parquet", "select/select.json", "eval/eval.json") if (root / p).exists()]
    atomic_write_json(root / "report.json", {
        "stage": "report",
        "notebook": str(notebook),
        "notebook_sha256": file_sha256(notebook),
        "html": str(html),
        "figures": sorted(p.name for p in (root / "figures").glob("*.png")),
        "inputs_sha256": {p: file_sha256(root / p) for p in inputs},
        "model_fingerprint": config.get("model_fingerprint"),
        "data_sha256": config.get("data_sha256"),
        "versions": versions(),
    })
