"""Statistics of selections and heads: pure functions on numpy arrays.

Shapes: ``S`` samples, ``H`` heads, ``N`` image tokens, ``k`` kept tokens. Every function
is vectorised over samples; the few scipy calls that are not (Kendall's tau) are the
library's own implementation, called once per pair of score vectors.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def kept_mask(kept: np.ndarray, n_tokens: int) -> np.ndarray:
    """``[S, N]`` bool membership of the kept indices ``[S, k]``."""
    mask = np.zeros((kept.shape[0], n_tokens), dtype=bool)
    np.put_along_axis(mask, kept.astype(np.int64), True, axis=1)
    return mask


def set_overlap(mask_a: np.ndarray, mask_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection size and Jaccard index of two kept sets per sample (``[S]`` each).

    Two empty sets (keep = 0) have Jaccard 1: they agree completely.
    """
    inter = (mask_a & mask_b).sum(axis=1)
    union = (mask_a | mask_b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return inter, jaccard


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of matching rows of ``a`` and ``b`` (``[S, N]`` -> ``[S]``)."""
    ra = sps.rankdata(a, axis=1)
    rb = sps.rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


def kendall_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of matching rows (scipy), NaN where a row is constant."""
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        if np.ptp(a[i]) == 0 or np.ptp(b[i]) == 0:
            out[i] = np.nan
        else:
            out[i] = sps.kendalltau(a[i], b[i]).statistic
    return out


def spatial_stats(kept: np.ndarray, n_tokens: int) -> dict[str, np.ndarray]:
    """Where the kept tokens sit on the square image grid (e.g. 24 x 24 for 576 tokens).

    mean_row / mean_col are in grid cells (0 = top / left); bottom_share is the fraction
    of kept tokens in the bottom half, the region FastV's ranking is known to favour.
    NaN when nothing is kept or the tokens do not form a square grid.
    """
    side = math.isqrt(n_tokens)
    s = kept.shape[0]
    if side * side != n_tokens or kept.shape[1] == 0:
        nan = np.full(s, np.nan)
        return {"mean_row": nan, "mean_col": nan.copy(), "bottom_share": nan.copy()}
    rows, cols = np.divmod(kept, side)
    return {
        "mean_row": rows.mean(axis=1),
        "mean_col": cols.mean(axis=1),
        "bottom_share": (rows >= side / 2).mean(axis=1),
    }


def head_stats(importance: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample statistics of head importance ``[S, H]`` (summed image attention per head).

    max_head:       the head with the most image attention (lowest index on ties).
    max_head_share: its share of the total image attention.
    head_entropy:   entropy of the importance distribution over heads / log(H), in [0, 1]
                    (1 = all heads equal, 0 = one head holds everything).
    head_gini:      Gini coefficient of the importance (0 = equal, -> 1 = concentrated).
    """
    importance = np.asarray(importance, dtype=np.float64)
    n_heads = importance.shape[1]
    total = importance.sum(axis=1, keepdims=True)
    p = np.divide(importance, total, out=np.full_like(importance, 1.0 / n_heads), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    entropy = ent / math.log(n_heads) if n_heads > 1 else np.zeros(importance.shape[0])
    sorted_imp = np.sort(importance, axis=1)
    ranks = np.arange(1, n_heads + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gini = np.where(
            total[:, 0] > 0,
            (2 * (ranks * sorted_imp).sum(axis=1)) / (n_heads * total[:, 0]) - (n_heads + 1) / n_heads,
            0.0,
        )
    top = importance.argmax(axis=1)
    return {
        "max_head": top,
        "max_head_share": np.take_along_axis(p, top[:, None], axis=1)[:, 0],
        "head_entropy": entropy,
        "head_gini": gini,
    }


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (accuracy), well behaved near 0 and 1."""
    if n == 0:
        return (math.nan, math.nan)
    result = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(result.low), float(result.high))
