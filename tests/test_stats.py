"""Statistics for the result tables: Wilson, exact McNemar, multiple-comparison corrections,
quantile accuracy and the within-sample permutation test.

Every golden value is computed by hand (arithmetic in the comments), by a closed-form
formula written out here, or by exhaustive enumeration; never by the code under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fastv_analysis import stats

Z95 = 1.959963984540054  # standard normal 0.975 quantile
Z90 = 1.6448536269514722  # standard normal 0.95 quantile


# ----------------------------------------------------------------------------------------
# Wilson interval
# ----------------------------------------------------------------------------------------


def _wilson_closed_form(k: int, n: int, z: float) -> tuple[float, float]:
    """(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(8, 10), (3, 17), (0, 5), (5, 5)])
def test_wilson_interval_matches_closed_form_at_95(k, n):
    lo, hi = stats.wilson_interval(k, n)
    exp_lo, exp_hi = _wilson_closed_form(k, n, Z95)
    assert lo == pytest.approx(exp_lo, abs=1e-9)
    assert hi == pytest.approx(exp_hi, abs=1e-9)


def test_wilson_interval_8_of_10_hand_values():
    # z^2 = 3.841459; centre = (0.8 + 0.1920729) / 1.3841459 = 0.7167383;
    # half = 1.959964 * sqrt(0.016 + 0.0096036) / 1.3841459 = 0.2266265
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6)
    assert hi == pytest.approx(0.9433178, abs=1e-6)


def test_wilson_interval_at_boundaries_touches_0_and_1():
    # 0 of 5: p = 0, so centre = half and the lower bound is exactly 0; upper = z^2/(n + z^2).
    lo, hi = stats.wilson_interval(0, 5)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(Z95**2 / (5 + Z95**2), abs=1e-9)
    # 5 of 5 is the mirror image.
    lo, hi = stats.wilson_interval(5, 5)
    assert hi == pytest.approx(1.0, abs=1e-12)
    assert lo == pytest.approx(5 / (5 + Z95**2), abs=1e-9)


def test_wilson_interval_confidence_level_is_used():
    lo, hi = stats.wilson_interval(8, 10, confidence=0.90)
    exp_lo, exp_hi = _wilson_closed_form(8, 10, Z90)
    assert (lo, hi) == pytest.approx((exp_lo, exp_hi), abs=1e-9)


def test_wilson_interval_empty_is_nan():
    lo, hi = stats.wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


# ----------------------------------------------------------------------------------------
# Exact McNemar
# ----------------------------------------------------------------------------------------


def _paired(n11: int, n01: int, n10: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired vectors with the given cell counts (n01 = a right only, n10 = b right only)."""
    a = np.array([True] * n11 + [True] * n01 + [False] * n10 + [False] * n00)
    b = np.array([True] * n11 + [False] * n01 + [True] * n10 + [False] * n00)
    return a, b


def _two_sided_half_binomial(n01: int, n10: int) -> float:
    """Two-sided binomial p at 0.5 by the symmetric closed form 2 * P(X <= min)."""
    m = n01 + n10
    tail = sum(math.comb(m, k) for k in range(min(n01, n10) + 1)) / 2**m
    return min(1.0, 2 * tail)


def test_mcnemar_exact_one_vs_six_discordant():
    a, b = _paired(n11=5, n01=1, n10=6, n00=3)
    # 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128 = 0.125
    expected = 2 * (math.comb(7, 0) + math.comb(7, 1)) / 2**7
    assert expected == 0.125
    assert stats.mcnemar_exact(a, b) == pytest.approx(expected, abs=1e-12)


def test_mcnemar_exact_is_symmetric_in_the_two_methods():
    a, b = _paired(n11=5, n01=1, n10=6, n00=3)
    assert stats.mcnemar_exact(b, a) == pytest.approx(0.125, abs=1e-12)


@pytest.mark.parametrize("n01,n10", [(2, 5), (0, 4), (3, 3), (1, 9), (12, 4)])
def test_mcnemar_exact_matches_binomial_enumeration(n01, n10):
    # e.g. (2, 5): 2 * (1 + 7 + 21) / 128 = 0.453125; (3, 3): capped at 1.
    a, b = _paired(n11=4, n01=n01, n10=n10, n00=2)
    assert stats.mcnemar_exact(a, b) == pytest.approx(_two_sided_half_binomial(n01, n10), abs=1e-12)


def test_mcnemar_exact_ignores_concordant_pairs():
    few = stats.mcnemar_exact(*_paired(n11=0, n01=2, n10=5, n00=0))
    many = stats.mcnemar_exact(*_paired(n11=50, n01=2, n10=5, n00=40))
    assert few == pytest.approx(0.453125, abs=1e-12)
    assert many == pytest.approx(0.453125, abs=1e-12)


def test_mcnemar_exact_no_discordant_pairs_is_one():
    a, b = _paired(n11=6, n01=0, n10=0, n00=4)
    assert stats.mcnemar_exact(a, b) == 1.0


# ----------------------------------------------------------------------------------------
# Holm and Benjamini-Hochberg
# ----------------------------------------------------------------------------------------


def test_holm_step_down_with_running_max():
    # sorted [0.005, 0.01, 0.03, 0.04] * [4, 3, 2, 1] = [0.02, 0.03, 0.06, 0.04]
    # running max -> [0.02, 0.03, 0.06, 0.06]; back in input order:
    out = stats.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(out, [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-12)


def test_holm_nan_kept_and_not_counted_in_family():
    # Family = 3 non-NaN values: sorted [0.01, 0.02, 0.04] * [3, 2, 1] = [0.03, 0.04, 0.04].
    # (With a family of 5 the smallest would have been 0.05.)
    out = stats.holm([0.04, np.nan, 0.01, np.nan, 0.02])
    assert np.isnan(out[1]) and np.isnan(out[3])
    np.testing.assert_allclose(out[[0, 2, 4]], [0.04, 0.03, 0.04], rtol=0, atol=1e-12)


def test_holm_capped_at_one():
    # sorted [0.3, 0.5, 0.6] * [3, 2, 1] = [0.9, 1.0, 0.6] -> max [0.9, 1.0, 1.0]
    # [0.5, 0.7] * [2, 1] = [1.0, 0.7] -> [1.0, 1.0]; [0.8, 0.9] -> [1.6, 0.9] -> capped 1, 1
    np.testing.assert_allclose(stats.holm([0.6, 0.3, 0.5]), [1.0, 0.9, 1.0], atol=1e-12)
    np.testing.assert_allclose(stats.holm([0.8, 0.9]), [1.0, 1.0], atol=1e-12)


def test_holm_all_nan_or_empty():
    assert stats.holm([]).shape == (0,)
    assert np.isnan(stats.holm([np.nan, np.nan])).all()


def test_benjamini_hochberg_step_up_with_running_min():
    # p = [0.04, 0.01, 0.03, 0.2, 0.025], m = 5
    # sorted [0.01, 0.025, 0.03, 0.04, 0.2] * 5 / [1, 2, 3, 4, 5]
    #      = [0.05, 0.0625, 0.05, 0.05, 0.2]
    # running min from the largest: [0.05, 0.05, 0.05, 0.05, 0.2]   (0.0625 -> 0.05)
    out = stats.benjamini_hochberg([0.04, 0.01, 0.03, 0.2, 0.025])
    np.testing.assert_allclose(out, [0.05, 0.05, 0.05, 0.2, 0.05], rtol=0, atol=1e-12)


def test_benjamini_hochberg_differs_from_holm_where_it_should():
    # p = [0.01, 0.04, 0.03, 0.005]: sorted [0.005, 0.01, 0.03, 0.04] * 4 / [1, 2, 3, 4]
    #   = [0.02, 0.02, 0.04, 0.04] (already monotone) -> input order [0.02, 0.04, 0.04, 0.02]
    out = stats.benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(out, [0.02, 0.04, 0.04, 0.02], rtol=0, atol=1e-12)


def test_benjamini_hochberg_nan_kept_and_not_counted_in_family():
    # Family [0.02, 0.01] (m = 2): sorted [0.01, 0.02] * 2 / [1, 2] = [0.02, 0.02].
    out = stats.benjamini_hochberg([np.nan, 0.02, 0.01, np.nan])
    assert np.isnan(out[0]) and np.isnan(out[3])
    np.testing.assert_allclose(out[[1, 2]], [0.02, 0.02], rtol=0, atol=1e-12)


def test_benjamini_hochberg_single_and_large_p():
    # One test: q = p. [0.9, 0.95]: [0.9 * 2 / 1, 0.95 * 2 / 2] = [1.8, 0.95] -> min [0.95, 0.95]
    np.testing.assert_allclose(stats.benjamini_hochberg([0.3]), [0.3], atol=1e-12)
    np.testing.assert_allclose(stats.benjamini_hochberg([0.95, 0.9]), [0.95, 0.95], atol=1e-12)
    assert np.isnan(stats.benjamini_hochberg([np.nan])).all()


# ----------------------------------------------------------------------------------------
# Quantile accuracy
# ----------------------------------------------------------------------------------------


def test_quantile_accuracy_each_quartile_has_its_own_accuracy():
    # x = 1..8: quartile edges 1, 2.75, 4.5, 6.25, 8 -> bins {1,2} {3,4} {5,6} {7,8}
    # correct [1,0] [1,1] [0,0] [0,1] -> 0.5, 1.0, 0.0, 0.5. Rows given out of order.
    x = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    correct = np.array([1, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
    perm = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    assert stats.quantile_accuracy(x[perm], correct[perm]) == [0.5, 1.0, 0.0, 0.5]


def test_quantile_accuracy_ties_at_a_boundary_stay_in_one_bin():
    # x sorted [1, 2, 3, 3, 3, 3, 7, 8]; quantile positions 7q = 1.75, 3.5, 5.25 ->
    # edges 2 + 0.75 = 2.75, 3, 3 + 0.25 * 4 = 4. With side="right" every 3 goes past the
    # edge 3 into bin 3 (index 2); bin 2 is empty. Bin 1 {1, 2}: [1, 0] = 0.5;
    # bin 3 {3, 3, 3, 3}: [1, 1, 1, 0] = 0.75; bin 4 {7, 8}: [0, 0] = 0.
    x = np.array([3, 1, 3, 8, 2, 3, 7, 3], dtype=float)
    correct = np.array([1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    assert stats.quantile_accuracy(x, correct) == [0.5, None, 0.75, 0.0]


def test_quantile_accuracy_heavy_ties():
    # x sorted [1, 1, 1, 1, 1, 2, 3, 4]: edges 1, 1, 2 + 0.25 = 2.25 -> all 1s and the 2
    # go to bin 3 (index 2): correct [1, 0, 0, 0, 1 | 1] = 3/6 = 0.5; {3, 4}: [1, 1] = 1.0.
    x = np.array([1, 1, 1, 1, 1, 2, 3, 4], dtype=float)
    correct = np.array([1, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    assert stats.quantile_accuracy(x, correct) == [None, None, 0.5, 1.0]


def test_quantile_accuracy_soft_scores_and_bin_count():
    x = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    soft = np.array([0.2, 0.4, 1.0, 0.5, 0.0, 0.1, 0.9, 0.7])
    # quartiles: (0.2+0.4)/2, (1.0+0.5)/2, (0.0+0.1)/2, (0.9+0.7)/2
    out = stats.quantile_accuracy(x, soft)
    np.testing.assert_allclose(out, [0.3, 0.75, 0.05, 0.8], atol=1e-12)
    # halves: median 4.5 -> {1..4} mean 2.1/4 = 0.525, {5..8} mean 1.7/4 = 0.425
    np.testing.assert_allclose(stats.quantile_accuracy(x, soft, bins=2), [0.525, 0.425], atol=1e-12)


def test_quantile_accuracy_empty_input():
    assert stats.quantile_accuracy(np.array([]), np.array([])) == [None, None, None, None]
    assert stats.quantile_accuracy(np.array([]), np.array([]), bins=3) == [None, None, None]


# ----------------------------------------------------------------------------------------
# Within-sample permutation test
# ----------------------------------------------------------------------------------------


def _confounded_data():
    """10 samples x 4 configurations. Within each sample, larger x -> correct; but samples
    with larger x overall are harder (accuracy 0.25 vs 0.75), so the pooled relation is
    negative."""
    x, y, s = [], [], []
    for i in range(10):
        pattern = [0, 1, 1, 1] if i < 5 else [0, 0, 0, 1]  # correct on the c largest x
        for j in range(4):
            x.append(i + 0.1 * j)
            y.append(pattern[j])
            s.append(i)
    return np.array(x), np.array(y, dtype=float), np.array(s)


def test_permutation_within_strata_sees_through_between_sample_confound():
    x, y, s = _confounded_data()
    assert np.corrcoef(x, y)[0, 1] < -0.3  # pooled Pearson points the wrong way
    res = stats.within_sample_permutation_test(x, y, s, n_permutations=2000, seed=0)
    # Per sample: xc = [-.15, -.05, .05, .15], sum xc^2 = 0.05.
    # c = 3: yc = [-.75, .25, .25, .25]: sum xc*yc = .1125 - .0125 + .0125 + .0375 = 0.15
    # c = 1: yc = [-.25, -.25, -.25, .75]: sum = .0375 + .0125 - .0125 + .1125 = 0.15
    # sum yc^2 = 0.75 in both. r = 10 * 0.15 / sqrt(10 * 0.05 * 10 * 0.75) = sqrt(0.6)
    assert res["r"] == pytest.approx(math.sqrt(0.6), abs=1e-12)
    # Each sample reaches its maximum T with probability 6/24 = 1/4, so the exact two-sided
    # p is about 2 * 4^-10; the Monte Carlo p is its floor 1 / 2001.
    assert res["p_value"] < 0.01
    assert res["p_value"] == pytest.approx(1 / 2001)
    assert res["n"] == 40
    assert res["n_strata"] == 10


def _exact_within_strata_p(x, y, s) -> float:
    """Two-sided p by enumerating every within-stratum permutation of x (T = sum x_perm*yc)."""
    x, y, s = np.asarray(x, float), np.asarray(y, float), np.asarray(s)
    groups = [np.flatnonzero(s == u) for u in np.unique(s)]
    yc = y.copy()
    for g in groups:
        yc[g] -= y[g].mean()
    t_obs = float(x @ yc)
    hits = total = 0
    for perms in itertools.product(*[list(itertools.permutations(g)) for g in groups]):
        xp = np.empty_like(x)
        for g, p in zip(groups, perms):
            xp[g] = x[list(p)]
        total += 1
        hits += abs(float(xp @ yc)) >= abs(t_obs) - 1e-12
    return hits / total


_TINY_STRATA = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
_TINY_X = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6, 0.8, 0.1, 0.3])
_TINY_Y_WEAK = np.array([1, 0, 1, 0, 1, 1, 1, 0, 0, 1], dtype=float)
_TINY_Y_STRONG = np.array([0, 1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=float)


@pytest.mark.parametrize("y,exact_p", [(_TINY_Y_WEAK, 224 / 864), (_TINY_Y_STRONG, 32 / 864)],
                         ids=["no-association", "association"])
def test_permutation_p_matches_exhaustive_enumeration(y, exact_p):
    # 3! * 3! * 4! = 864 within-strata permutations, enumerated.
    assert _exact_within_strata_p(_TINY_X, y, _TINY_STRATA) == pytest.approx(exact_p, abs=1e-12)
    res = stats.within_sample_permutation_test(_TINY_X, y, _TINY_STRATA, n_permutations=20000, seed=3)
    # Monte Carlo SE <= sqrt(0.26 * 0.74 / 20000) = 0.0031; 0.015 is about 5 SE.
    assert res["p_value"] == pytest.approx(exact_p, abs=0.015)


def test_permutation_independent_data_is_not_significant():
    res = stats.within_sample_permutation_test(_TINY_X, _TINY_Y_WEAK, _TINY_STRATA, n_permutations=2000)
    assert res["p_value"] > 0.05


def test_permutation_r_is_the_within_stratum_correlation():
    # Written out for the weak tiny case: stratum means of x: 0.3, 0.5, 0.45; of y: 2/3, 2/3, 0.5.
    x, y, s = _TINY_X, _TINY_Y_WEAK, _TINY_STRATA
    xc = x - np.array([0.3] * 3 + [0.5] * 3 + [0.45] * 4)
    yc = y - np.array([2 / 3] * 6 + [0.5] * 4)
    expected = (xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))
    res = stats.within_sample_permutation_test(x, y, s, n_permutations=10)
    assert res["r"] == pytest.approx(expected, abs=1e-12)
    assert res["r"] < 0  # differs from the strong case's sign: r is not a constant
    assert stats.within_sample_permutation_test(x, _TINY_Y_STRONG, s, n_permutations=10)["r"] > 0.5


def test_permutation_single_row_and_constant_strata_contribute_nothing():
    x, y, s = _confounded_data()
    base = stats.within_sample_permutation_test(x, y, s, n_permutations=500, seed=7)
    # Singletons with extreme values, a stratum with constant y, one with constant x.
    x2 = np.concatenate([x, [100.0, -50.0, 1.0, 2.0, 3.0, 5.0, 5.0]])
    y2 = np.concatenate([y, [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    s2 = np.concatenate([s, [100, 101, 102, 102, 102, 103, 103]])
    res = stats.within_sample_permutation_test(x2, y2, s2, n_permutations=500, seed=7)
    # Constant-x / constant-y strata change neither sum(xc*yc) nor the other denominator,
    # but they do enter one denominator: stratum 102 (x 1, 2, 3) adds sum xc^2 = 2 to 0.5,
    # stratum 103 (y 0, 1) adds sum yc^2 = 0.5 to 7.5.
    assert res["r"] == pytest.approx(1.5 / math.sqrt((0.5 + 2.0) * (7.5 + 0.5)), abs=1e-12)
    assert res["n"] == 47
    assert res["n_strata"] == 12  # 10 + the constant-y and constant-x strata; not singletons
    assert res["p_value"] == base["p_value"]  # same draws: only informative strata are permuted
    # Singletons alone leave r exactly unchanged.
    res1 = stats.within_sample_permutation_test(x2[:42], y2[:42], s2[:42], n_permutations=500, seed=7)
    assert res1["r"] == pytest.approx(base["r"], abs=1e-12)
    assert res1["n_strata"] == 10


def test_permutation_drops_nan_rows():
    x, y, s = _confounded_data()
    base = stats.within_sample_permutation_test(x, y, s, n_permutations=300, seed=1)
    x2 = np.concatenate([x, [np.nan, 0.3]])
    y2 = np.concatenate([y, [1.0, np.nan]])
    s2 = np.concatenate([s, [0, 0]])
    res = stats.within_sample_permutation_test(x2, y2, s2, n_permutations=300, seed=1)
    assert res == base


def test_permutation_same_seed_same_p_and_seed_matters():
    y = _TINY_Y_WEAK
    a = stats.within_sample_permutation_test(_TINY_X, y, _TINY_STRATA, n_permutations=999, seed=11)
    b = stats.within_sample_permutation_test(_TINY_X, y, _TINY_STRATA, n_permutations=999, seed=11)
    c = stats.within_sample_permutation_test(_TINY_X, y, _TINY_STRATA, n_permutations=999, seed=12)
    assert a == b
    assert c["p_value"] != a["p_value"]


def test_permutation_no_variation_gives_nan():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    res = stats.within_sample_permutation_test(x, np.array([1.0, 1.0, 0.0, 0.0]), np.array([0, 0, 1, 1]))
    assert math.isnan(res["r"]) and math.isnan(res["p_value"])
    assert res["n_strata"] == 2
    empty = stats.within_sample_permutation_test(np.array([]), np.array([]), np.array([]))
    assert empty["n"] == 0 and math.isnan(empty["r"])


def test_permutation_handles_a_full_table_quickly():
    import time

    rng = np.random.default_rng(0)
    n = 12000
    s = rng.integers(0, 1500, n)
    x = rng.random(n)
    y = (rng.random(n) < 0.5).astype(float)
    t0 = time.perf_counter()
    res = stats.within_sample_permutation_test(x, y, s, n_permutations=2000, seed=0)
    assert time.perf_counter() - t0 < 10.0  # about 1 s on one busy core
    assert res["n"] == n and 0 < res["p_value"] <= 1


def test_permutation_test_sees_no_within_stratum_variation_in_a_repeated_float():
    """A sample property (same float in every row of a stratum) has no within-stratum r:
    three 0.1s average to 0.10000000000000002, which must not read as variation."""
    x = np.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    res = stats.within_sample_permutation_test(x, y, np.array([0, 0, 0, 1, 1, 1]), n_permutations=50)
    assert math.isnan(res["r"]) and math.isnan(res["p_value"])


# ----------------------------------------------------------------------------------------
# Copies of one item as one unit (issue 19.2)
# ----------------------------------------------------------------------------------------


def test_paired_unit_test_is_mcnemar_when_every_unit_is_one_sample():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        a, b = rng.random(n) < 0.6, rng.random(n) < 0.5
        assert stats.paired_unit_test(a, b, np.arange(n)) == pytest.approx(stats.mcnemar_exact(a, b), abs=1e-12)


def test_paired_unit_test_equals_enumerating_every_sign_flip_of_the_units():
    # Units u0: rows (1,0),(1,0) -> d = +2; u1: (1,0),(0,1) -> 0; u2: (1,0) -> +1; u3: (0,1) -> -1.
    # T_obs = 2. The 8 sign patterns of (2, 1, 1): sums 4, 2, 2, 0, 0, -2, -2, -4 -> |T| >= 2 in
    # 6 of 8: p = 0.75. McNemar on the rows (4 vs 2 discordant) would say 0.6875.
    a = np.array([1, 1, 1, 0, 1, 0])
    b = np.array([0, 0, 0, 1, 0, 1])
    units = ["u0", "u0", "u1", "u1", "u2", "u3"]
    assert stats.paired_unit_test(a, b, units) == pytest.approx(0.75)
    rng = np.random.default_rng(5)
    for _ in range(100):  # brute force over all 2^U sign patterns
        n = int(rng.integers(2, 16))
        units = rng.integers(0, 6, n)
        a, b = rng.random(n) < 0.6, rng.random(n) < 0.4
        d = np.bincount(np.unique(units, return_inverse=True)[1], weights=a.astype(int) - b.astype(int))
        signs = np.array(list(itertools.product([-1, 1], repeat=d.size)))
        expected = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-9)
        assert stats.paired_unit_test(a, b, units) == pytest.approx(expected, abs=1e-12)


def test_cluster_wilson_is_wilson_for_single_samples_and_wider_for_copies():
    y = np.array([1] * 30 + [0] * 10)
    assert stats.cluster_wilson_interval(y, np.arange(40)) == pytest.approx(stats.wilson_interval(30, 40))
    # The same 40 answers as 10 items x 4 identical copies: the cluster-robust variance is
    # sum_u (y_u - p m_u)^2 / n^2 = (7.5 * 1^2 + 2.5 * 3^2) / 1600 = 30 / 1600, so
    # n_eff = 0.75 * 0.25 / (30 / 1600) = 10: the Wilson interval of 7.5 / 10.
    units = np.repeat(np.arange(10), 4)
    y4 = np.repeat([1] * 7 + [0] * 2 + [1], 4)[:40].astype(float)
    y4[-4:] = [1, 1, 0, 0]  # one item split 2/2 so p = 0.75 exactly: 7*4 + 2 = 30
    p = y4.mean()
    v = sum((y4[units == u].sum() - p * 4) ** 2 for u in range(10)) / 40 ** 2
    n_eff = p * (1 - p) / v
    z = 1.959963984540054
    centre = (p + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z / (1 + z * z / n_eff) * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff ** 2))
    assert stats.cluster_wilson_interval(y4, units) == pytest.approx((centre - half, centre + half))
    lo, hi = stats.cluster_wilson_interval(y4, units)
    assert hi - lo > np.subtract(*stats.wilson_interval(30, 40)[::-1])
