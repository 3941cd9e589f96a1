"""Section 14: how the last token's image ranking moves through the layers (stored per-layer
attention).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from .configs import smallest_keep
from .overlap import chance_jaccard
from .style import new_figure
from .tables import RunTables


def _mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and its 95% t interval (NaN bounds for fewer than two values)."""
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if values.size else float("nan")
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = float(student_t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return mean, mean - half, mean + half


def layer_dynamics(layer_attention, k: int, ref_layer: int) -> pl.DataFrame:
    """How the ranking moves through the layers. ``layer_attention``: per sample the last
    prompt token's image attention at every layer ``[L, H, N]`` (``Run.layer_attention``).
    Per layer l: ``jaccard``, the mean over samples of the Jaccard index between the top-``k``
    image tokens of the head-mean attention at l and at ``ref_layer`` (K-1, what FastV ranks
    by; 1 there by construction), and ``entropy``, the mean normalised entropy of the
    head-mean image attention renormalised over the image (0 = one token, 1 = flat), each
    with a 95% t interval over samples. Ties in the top-k go to the earlier token."""
    jaccards, entropies = [], []
    for att in layer_attention:
        a = np.asarray(att, dtype=np.float64).mean(axis=1)  # [L, N] head mean
        n = a.shape[1]
        top = np.argsort(-a, axis=1, kind="stable")[:, : min(k, n)]
        member = np.zeros(a.shape, dtype=bool)
        np.put_along_axis(member, top, True, axis=1)
        ref = member[ref_layer]
        jaccards.append((member & ref).sum(1) / (member | ref).sum(1))
        p = a / np.clip(a.sum(1, keepdims=True), 1e-30, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
        entropies.append(h / math.log(n) if n > 1 else np.zeros(a.shape[0]))
    jac, ent = np.array(jaccards), np.array(entropies)  # [S, L]
    rows = []
    for layer in range(jac.shape[1]):
        j, jl, jh = _mean_interval(jac[:, layer])
        e, el, eh = _mean_interval(ent[:, layer])
        rows.append({"layer": layer, "n": jac.shape[0], "jaccard": j, "jaccard_lo": jl, "jaccard_hi": jh,
                     "entropy": e, "entropy_lo": el, "entropy_hi": eh})
    return pl.DataFrame(rows).with_columns(pl.lit(k, dtype=pl.Int64).alias("k"),
                                           pl.lit(ref_layer, dtype=pl.Int64).alias("ref_layer"))


def run_layer_dynamics(t: RunTables, agg_layer: int | None = None, max_samples: int = 2000) -> pl.DataFrame | None:
    """:func:`layer_dynamics` of the run's stored per-layer attention (``--store layers``) with
    k = the run's smallest keep > 0 and the reference layer K-1 (K: the first agg layer > 0),
    over its first ``max_samples`` samples. None without per-layer attention."""
    if "layers" not in t.store or t.selections is None:
        return None
    layers = [k for k in t.selections["agg_layer"].unique().sort().to_list() if k > 0]
    keep = smallest_keep(t.selections)
    if (agg_layer is None and not layers) or keep is None:
        return None
    key = ("layer_dynamics", agg_layer, max_samples)
    if key not in t.cache:
        from ..store import open_run

        run = open_run(t.root)
        layer = agg_layer if agg_layer is not None else layers[0]
        ids = run.sample_ids[:max_samples]
        frame = layer_dynamics((run.layer_attention(s).numpy() for s in ids), keep, layer - 1)
        t.cache[key] = frame.with_columns(pl.lit(layer).alias("agg_layer"),
                                          pl.lit(len(run.sample_ids)).alias("samples_in_run"))
    return t.cache[key]


def plot_layer_dynamics(dynamics: pl.DataFrame | None, n_tokens: int | None = None):
    """Left: per layer, the mean Jaccard between its top-k image tokens (head mean) and layer
    K-1's, chance dotted (needs ``n_tokens``). Right: the mean normalised entropy of the
    head-mean image attention per layer. Bands: 95% intervals over samples."""
    if dynamics is None or dynamics.height == 0:
        return None
    d = dynamics.sort("layer")
    k, ref = int(d["k"][0]), int(d["ref_layer"][0])
    layer = int(d["agg_layer"][0]) if "agg_layer" in d.columns else ref + 1
    x = d["layer"].to_numpy()
    fig, axes = new_figure(width=13, height=4.6, ncols=2)
    for ax, col, color, ylabel, title in (
            (axes[0, 0], "jaccard", "#1f77b4", "mean Jaccard with layer K-1's set",
             f"Top-{k} image tokens (head mean) at each layer vs at layer K-1={ref}"),
            (axes[0, 1], "entropy", "#d62728", "mean normalised entropy",
             "Spread of the head-mean image attention (0 = one token, 1 = flat)")):
        ax.plot(x, d[col], marker="o", color=color, label=f"mean over {int(d['n'][0])} samples")
        lo, hi = d[f"{col}_lo"].to_numpy(), d[f"{col}_hi"].to_numpy()
        if np.isfinite(lo).all():
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, label="95% interval")
        ax.axvline(ref, color="black", linestyle="--", linewidth=1, label=f"layer K-1={ref} (FastV ranks here)")
        ax.set_xticks(x)
        ax.set_xlabel("decoder layer (its last-token attention)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    if n_tokens:
        chance = chance_jaccard(n_tokens, k)
        axes[0, 0].axhline(chance, color="black", linestyle=":", linewidth=1,
                           label=f"chance ({chance:.3f}: two random {k}-subsets of {n_tokens})")
    axes[0, 0].set_ylim(0, 1.05)
    low = np.fmin(d["entropy_lo"].to_numpy(), d["entropy"].to_numpy())  # fmin: a NaN bound gives the mean
    axes[0, 1].set_ylim(max(0.0, float(np.nanmin(low)) - 0.05), 1.02)
    for ax in axes[0]:
        ax.legend(fontsize=8, loc="best")
    shown = int(d["n"][0])
    total = int(d["samples_in_run"][0]) if "samples_in_run" in d.columns else shown
    of = f" (first {shown} of {total} samples)" if shown < total else ""
    fig.suptitle(f"Layer dynamics of the last token's image attention (k = {k}, the run's smallest keep; "
                 f"K={layer}){of}")
    fig.tight_layout()
    return fig


def layer_dynamics_missing(t: RunTables) -> str | None:
    """Why the layer-dynamics section has no figure (None when it has one)."""
    if "layers" not in t.store:
        return "No layer-dynamics section: capture did not store per-layer attention (capture with --store layers)."
    if run_layer_dynamics(t) is None:
        return "No layer-dynamics section: the run has no agg layer K > 0 or no pruned keep."
    return None
