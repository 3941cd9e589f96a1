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


def spatial_stats(kept: np.ndarray, layout) -> dict[str, np.ndarray]:
    """Where the kept tokens ``[S, K]`` sit on the samples' spatial grid.

    ``layout``: the :class:`~fastv_analysis.layout.TokenLayout` the S samples share (or N,
    for :meth:`TokenLayout.for_tokens`). mean_row / mean_col are cell centres as a fraction
    of the grid's height / width (0 = top / left, 1 = bottom / right), so grids of different
    sizes compare; bottom_share is the fraction in the bottom half, the region FastV's
    ranking is known to favour; on_grid_share the fraction of kept tokens on the grid at all
    (anyres base tiles and newline tokens are not). NaN where no kept token is on a grid.
    """
    from .layout import TokenLayout

    if not isinstance(layout, TokenLayout):
        layout = TokenLayout.for_tokens(int(layout))
    kept = np.asarray(kept, dtype=np.int64)
    s = kept.shape[0]
    if kept.shape[1] == 0 or layout.rows == 0:
        nan = np.full(s, np.nan)
        share = np.full(s, np.nan) if kept.shape[1] == 0 else np.zeros(s)
        return {"mean_row": nan, "mean_col": nan.copy(), "bottom_share": nan.copy(), "on_grid_share": share}
    cells = layout.cells[kept]
    on = cells >= 0
    rows, cols = np.divmod(np.where(on, cells, 0), layout.cols)
    count = on.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "mean_row": np.where(count > 0, (((rows + 0.5) / layout.rows) * on).sum(axis=1) / count, np.nan),
            "mean_col": np.where(count > 0, (((cols + 0.5) / layout.cols) * on).sum(axis=1) / count, np.nan),
            "bottom_share": np.where(count > 0, ((rows + 0.5 >= layout.rows / 2) & on).sum(axis=1) / count, np.nan),
            "on_grid_share": count / kept.shape[1],
        }


def object_membership(token_boxes: np.ndarray, objects: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """``[N, M]`` bool: whether at least ``min_fraction`` of token i's box lies in object j.

    Boxes are ``(x0, y0, x1, y1)`` in the same pixel coordinates (x1, y1 exclusive); the
    token boxes come from :func:`fastv_analysis.grid.token_boxes`, so a token counts as on
    an object by the pixels the model really saw in that patch.
    """
    t = np.asarray(token_boxes, dtype=np.float64)[:, None, :]
    o = np.asarray(objects, dtype=np.float64).reshape(-1, 4)[None, :, :]
    w = np.clip(np.minimum(t[..., 2], o[..., 2]) - np.maximum(t[..., 0], o[..., 0]), 0, None)
    h = np.clip(np.minimum(t[..., 3], o[..., 3]) - np.maximum(t[..., 1], o[..., 1]), 0, None)
    area = (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1])
    return (w * h) >= min_fraction * area


def object_coverage(kept: np.ndarray, membership: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """How a kept set covers the ground-truth objects, per sample.

    kept:       ``[S, k]`` kept image-token indices.
    membership: ``[S, N, M]`` bool, token on object (objects padded to M with False).
    valid:      ``[S, M]`` bool, which of the M object slots are real objects (objects
                that no token lies on, e.g. outside the processor's crop, are left out).
    object_token_share: share of the kept tokens that lie on any object (NaN at keep 0);
    objects_touched:    share of the objects with at least one kept token on them.
    NaN for samples without objects. Why: a count or a colour needs every object, so a
    ranking that keeps many tokens but misses objects explains lost accuracy.
    """
    s, k = kept.shape
    valid = valid & membership.any(axis=1)  # an object no token can be on (cropped away, tiny) cannot be touched
    has = valid.any(axis=1)
    nan = np.full(s, np.nan)
    if membership.shape[2] == 0 or not has.any():
        return {"object_token_share": nan, "objects_touched": nan.copy()}
    on_kept = np.take_along_axis(membership, kept.astype(np.int64)[:, :, None], axis=1)  # [S, k, M]
    share = on_kept.any(axis=2).mean(axis=1) if k else nan.copy()
    touched = (on_kept.any(axis=1) & valid).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return {"object_token_share": np.where(has, share, np.nan), "objects_touched": np.where(has, touched, np.nan)}


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


# ----------------------------------------------------------------------------------------
# Tests and corrections for the result tables (accuracy per configuration, relations)
# ----------------------------------------------------------------------------------------


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p of two paired correctness vectors.

    Only discordant pairs carry information about a difference between the paired
    methods: with n01 = #(a & ~b) and n10 = #(~a & b), under H0 each discordant pair is
    a fair coin, so p is the two-sided binomial test of n01 in n01 + n10 at 0.5 (exact,
    valid for the small discordant counts a few hundred samples give). 1.0 when no pair
    is discordant.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def unit_codes(units) -> np.ndarray:
    """Dense integer code (0..U-1, in order of first appearance, so the labels' spelling,
    e.g. an image's absolute path, never changes a result) of each row's unit."""
    _, first, inverse = np.unique(np.asarray(units, dtype=object).astype(str), return_index=True,
                                  return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.ravel()]


def cluster_residual_sum(scores: np.ndarray, code: np.ndarray) -> float:
    """``sum_u (sum_{i in u} (y_i - mean))^2``: the units' squared summed residuals, the core
    of the cluster-robust variance of a mean (``/ n^2``; CR1 multiplies by U / (U - 1))."""
    y = np.asarray(scores, dtype=np.float64)
    resid = np.bincount(code, weights=y - y.mean(), minlength=int(code.max()) + 1)
    return float(np.sum(resid ** 2))


def cluster_wilson_interval(scores: np.ndarray, units=None, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of a mean of 0/1 scores whose rows come in units (copies of one item).

    Copies of one item are not independent samples, so the interval uses Kish's effective
    sample size ``n_eff = p (1 - p) / v``, where ``v = sum_u (y_u - p m_u)^2 / n^2`` is the
    cluster-robust (linearisation) variance of the mean (``y_u`` the unit's correct count,
    ``m_u`` its rows, ``n`` all rows), capped at n: copies never count as more evidence
    than independent samples. With every unit a single row ``v = p (1 - p) / n``, so
    ``n_eff = n`` and this is the plain Wilson interval. When p is 0 or 1 (``v = 0``) the
    number of units is used. Returns (lo, hi) as fractions.
    """
    y = np.asarray(scores, dtype=np.float64)
    n = y.size
    if n == 0:
        return (math.nan, math.nan)
    if units is None:
        return wilson_interval(int(round(y.sum())), n, confidence)
    code = unit_codes(units)
    n_units = int(code.max()) + 1
    p = float(y.mean())
    v = cluster_residual_sum(y, code) / n ** 2
    n_eff = min(float(n), p * (1 - p) / v) if v > 0 else float(n_units)
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    centre = (p + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z / (1 + z * z / n_eff) * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff ** 2))
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_unit_test(a: np.ndarray, b: np.ndarray, units=None) -> float:
    """Exact two-sided paired test of two 0/1 vectors (one pair per row) whose rows come
    in units: the sign-flip (randomisation) test on the units' summed differences.

    Per unit ``d_u = sum(a - b)`` over its rows; under H0 (within a unit the two methods
    are exchangeable) every ``d_u`` is as likely as ``-d_u``, independently across units,
    so ``T = sum_u d_u`` has the exact distribution of ``sum_u +-|d_u|``: a convolution of
    binomials, one per distinct ``|d_u|`` (computed exactly, no sampling).
    p = P(|T| >= |T_obs|). With every unit a single row, ``d_u`` is +-1 on the discordant
    pairs and this IS the exact McNemar test (:func:`mcnemar_exact`); with copies of one
    item it does not count them as independent evidence.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if units is None:
        return mcnemar_exact(a.astype(bool), b.astype(bool))
    signed = np.bincount(unit_codes(units), weights=a - b).round().astype(np.int64)
    d = np.abs(signed[signed != 0])
    if d.size == 0:
        return 1.0
    values, counts = np.unique(d, return_counts=True)
    if values.size == 1 and values[0] == 1:  # McNemar's binomial on the discordant units
        return float(sps.binomtest(int(np.sum(signed > 0)), int(d.size), 0.5).pvalue)
    total = int(d.sum())
    t_obs = abs(int(signed.sum()))
    dist = np.zeros(2 * total + 1)  # index t + total
    order = np.argsort(-counts * values)  # the widest factor first, placed directly
    v, k = int(values[order[0]]), int(counts[order[0]])
    x = np.arange(k + 1)
    dist[total + v * (2 * x - k)] = sps.binom.pmf(x, k, 0.5)
    for j in order[1:]:
        v, k = int(values[j]), int(counts[j])
        new = np.zeros_like(dist)
        for xi, w in enumerate(sps.binom.pmf(np.arange(k + 1), k, 0.5)):
            shift = v * (2 * xi - k)
            if shift >= 0:
                new[shift:] += w * dist[:dist.size - shift]
            else:
                new[:shift] += w * dist[-shift:]
        dist = new
    t = np.abs(np.arange(-total, total + 1))
    return float(min(1.0, dist[t >= t_obs].sum()))


def _finite_family(p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all p as float array, positions of the non-NaN family, their p-values)."""
    p = np.asarray(p, dtype=np.float64)
    idx = np.flatnonzero(~np.isnan(p))
    return p, idx, p[idx]


def holm(p) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control, any dependence).

    Step-down: sort the m p-values, multiply the i-th smallest (0-based) by m - i, take
    the running maximum so adjusted values keep the order of the raw ones, cap at 1.
    Reject at level alpha where adjusted <= alpha. NaN entries (no test possible, e.g.
    the reference row itself) are not part of the family and stay NaN.
    """
    p, idx, fam = _finite_family(p)
    out = np.full(p.shape, np.nan)
    m = fam.size
    if m == 0:
        return out
    order = np.argsort(fam, kind="stable")
    adj = np.maximum.accumulate(fam[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(adj, 1.0)
    out[idx] = adjusted
    return out


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values; false discovery rate control).

    Step-up: the i-th smallest of m p-values (1-based rank i) becomes p * m / i, then the
    running minimum from the largest down keeps the order, capped at 1. Valid under
    independence or positive dependence (the usual case for configurations scored on the
    same samples). NaN entries are not part of the family and stay NaN.
    """
    p, idx, fam = _finite_family(p)
    out = np.full(p.shape, np.nan)
    m = fam.size
    if m == 0:
        return out
    order = np.argsort(fam, kind="stable")
    scaled = fam[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(q, 1.0)
    out[idx] = adjusted
    return out


def quantile_accuracy(x: np.ndarray, correct: np.ndarray, bins: int = 4) -> list[float | None]:
    """Mean of ``correct`` (0/1 or soft scores) within each quantile bin of the statistic x.

    Edges are the sample quantiles of x; a value goes to the bin of the last inner edge it
    reaches (``searchsorted(..., side="right")``), so equal x values always share one bin
    (a tie is never split by position). With heavy ties some bins can be empty: None.
    Shows whether accuracy moves with x, not only whether a rank correlation exists.
    """
    x = np.asarray(x, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return [None] * bins
    edges = np.quantile(x, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges[1:-1], x, side="right"), 0, bins - 1)
    out: list[float | None] = []
    for i in range(bins):
        sel = which == i
        out.append(float(correct[sel].mean()) if sel.any() else None)
    return out


PERMUTATION_BLOCK = 128  # permutations per vectorised block (bounds memory: block x rows floats)


def _varies(values: np.ndarray, code: np.ndarray, n_codes: int) -> np.ndarray:
    """``[n_codes]`` whether ``values`` take more than one value within each stratum code."""
    high = np.full(n_codes, -np.inf)
    low = np.full(n_codes, np.inf)
    np.maximum.at(high, code, values)
    np.minimum.at(low, code, values)
    return high > low


def _permutation_hits(xs: np.ndarray, ys: np.ndarray, cs: np.ndarray, shared, n_permutations: int, seed: int,
                      threshold: float) -> int:
    """How many of ``n_permutations`` within-stratum shuffles of ``xs`` (strata ``cs``; with
    ``shared`` = (block codes, slot codes, n_blocks, n_slots), every stratum of a block
    shuffled alike) reach
    ``|T| >= threshold``, T = sum(x_perm * ys)."""
    base = np.argsort(cs, kind="stable")  # rows grouped by stratum
    xs_base, ys_base = xs[base], ys[base]
    offset = cs[base].astype(np.float64)  # stratum code per grouped position (ascending)
    if shared is not None:  # (block codes, slot codes, number of blocks, number of slots)
        block, slot, n_blocks, n_slots = shared[0][base], shared[1][base], shared[2], shared[3]
    rng = np.random.default_rng(seed)
    hits = done = 0
    while done < n_permutations:
        b = min(PERMUTATION_BLOCK, n_permutations - done)
        # Sorting code + key (key in [0, 0.5), so no rounding reaches the next code) keeps
        # strata in their blocks and orders rows randomly inside each: position i of the
        # shuffled order holds a random row of the same stratum as position i of ``base``.
        # Same result as lexsort((keys, code)), several times faster.
        if shared is None:
            keys = rng.random((b, xs.size))
        else:  # one key per (block, slot): every stratum of a block is shuffled alike
            keys = rng.random((b, n_blocks, n_slots))[:, block, slot]
        order = np.argsort(offset + 0.5 * keys, axis=-1)
        hits += int(np.sum(np.abs(xs_base[order] @ ys_base) >= threshold))
        done += b
    return hits


def within_sample_permutation_test(x: np.ndarray, y: np.ndarray, strata: np.ndarray,
                                   n_permutations: int = 2000, seed: int = 0, *,
                                   blocks: np.ndarray | None = None, slots: np.ndarray | None = None) -> dict:
    """Within-stratum association of x and y with a stratified permutation p-value.

    Why: in the pooled table every sample appears in many configurations (pseudo-
    replication), and sample difficulty and keep move both the selection statistic x and
    correctness y, so a pooled correlation and its naive p mostly measure those
    confounds. Here x and y are centred within each stratum (e.g. one (sample, layer,
    keep) cell), so only differences between configurations of the same cell count:

        r = sum(xc * yc) / sqrt(sum(xc^2) * sum(yc^2))      (NaN if either sum is 0)

    The null (x exchangeable within each stratum) is sampled by permuting x within every
    stratum independently; the statistic T = sum(x_perm * yc) orders permutations exactly
    as r does, since a within-stratum permutation keeps each stratum's mean and sum of
    squares. Two-sided p = (1 + #{|T_perm| >= |T_obs|}) / (1 + n_permutations), with a
    1e-12 relative tolerance so permutations tying the observed value count.

    Rows with NaN in x or y are dropped first. Strata where x or y is constant (including
    one-row strata) leave T unchanged under every permutation; the random draws cover only
    strata where both vary, so adding such rows changes neither r nor p for a given seed.

    ``blocks`` / ``slots`` (optional, per row): strata whose rows are not independent of
    each other (copies of one item: the same block) get the same permutation — the row in
    slot s (e.g. a configuration) of every stratum of a block goes where slot s of the
    others goes — so copies are shuffled as one unit and do not count as independent
    evidence. Without them every stratum is permuted independently.

    Returns r, p_value, n (rows after dropping NaN) and n_strata (strata with >= 2 rows
    and any variation in x or y, i.e. those entering r's denominators).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    strata = np.asarray(strata).ravel()
    if not (x.size == y.size == strata.size):
        raise ValueError("x, y and strata must have the same length")
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y, strata = x[ok], y[ok], strata[ok]
    shared = None
    if blocks is not None:
        shared = (unit_codes(np.asarray(blocks)[ok]), unit_codes(np.asarray(slots)[ok]))
    n = int(x.size)
    result = {"r": math.nan, "p_value": math.nan, "n": n, "n_strata": 0}
    if n == 0:
        return result
    _, code = np.unique(strata, return_inverse=True)
    code = code.ravel()
    n_codes = int(code.max()) + 1
    counts = np.bincount(code, minlength=n_codes)
    xc = x - (np.bincount(code, weights=x, minlength=n_codes) / counts)[code]
    yc = y - (np.bincount(code, weights=y, minlength=n_codes) / counts)[code]
    # A stratum varies if its max and min differ; constant strata are centred to exact zeros
    # (their float mean need not equal the value: three 0.1s average to 0.10000000000000002).
    x_var, y_var = _varies(x, code, n_codes), _varies(y, code, n_codes)
    xc[~x_var[code]] = 0.0
    yc[~y_var[code]] = 0.0
    result["n_strata"] = int(np.sum((counts >= 2) & (x_var | y_var)))
    sxx = float(np.sum(xc * xc))
    syy = float(np.sum(yc * yc))
    if sxx == 0 or syy == 0:
        return result
    scale = math.sqrt(sxx * syy)
    t_obs = float(np.sum(xc * yc))
    result["r"] = t_obs / scale
    if n_permutations <= 0:
        return result

    # Only strata where both x and y vary can change T; permute those rows only.
    both = (x_var & y_var)[code]
    if shared is not None:  # key tables sized by every block and slot of the data
        shared = (shared[0][both], shared[1][both], int(shared[0].max()) + 1, int(shared[1].max()) + 1)
    hits = _permutation_hits(xc[both], yc[both], code[both], shared, n_permutations, seed,
                             abs(t_obs) - 1e-12 * scale)
    result["p_value"] = (1 + hits) / (1 + n_permutations)
    return result
