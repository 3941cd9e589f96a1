"""The selection strategies: semantics from DEVELOPERS.md, checked against independent computations."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fastv_analysis.strategies import METHODS, select, uniform_indices


def _attention(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 3, dim=-1)


def _reference_topk(scores: np.ndarray, keep: int) -> np.ndarray:
    """Independent ranking: Python sort by (-score, index), i.e. ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return np.array(sorted(order[:keep]), dtype=np.int64)


def test_avg_all_heads_keeps_top_mean_attention():
    a = _attention(6, 40)
    sel = select(a, "avg_all_heads", 10)
    expected = _reference_topk(a.numpy().mean(axis=0), 10)
    assert sel.indices.tolist() == expected.tolist()
    assert sel.method == "avg_all_heads" and sel.alpha is None


def test_max_head_uses_head_with_largest_image_attention():
    a = torch.rand(4, 30)
    a[2] *= 5  # head 2 pays by far the most attention to the image
    sel = select(a, "max_head", 7)
    assert int(sel.max_head) == 2
    assert sel.indices.tolist() == _reference_topk(a[2].numpy(), 7).tolist()
    assert torch.allclose(sel.head_importance, a.sum(-1))


def test_weighted_combination_matches_formula():
    a = torch.rand(5, 50, dtype=torch.float64)
    h = int(a.sum(-1).argmax())
    others = np.delete(a.numpy(), h, axis=0).mean(axis=0)
    expected_scores = 0.7 * a[h].numpy() + 0.3 * others
    sel = select(a, "weighted_combination", 12, alpha=0.7)
    np.testing.assert_allclose(sel.scores.numpy(), expected_scores, rtol=1e-12)
    assert sel.indices.tolist() == _reference_topk(expected_scores, 12).tolist()
    assert sel.alpha == 0.7


def test_weighted_formula_near_one_over_h_approaches_the_mean():
    """The shortcut at alpha = 1/H is what the formula tends to, not a different score."""
    from fastv_analysis.strategies import attention_scores

    a = _attention(5, 7, 100).double()
    mean = a.mean(dim=-2)
    for eps in (1e-3, 1e-6):
        near = attention_scores(a, "weighted_combination", 1 / 7 + eps)
        assert (near - mean).abs().max() < 10 * eps


@pytest.mark.parametrize("heads", [1, 3, 7, 8, 32, 40])
def test_alpha_one_is_max_head_and_alpha_one_over_h_is_avg(heads):
    a = _attention(3, heads, 576, seed=heads)
    for keep in (0, 1, 64, 288, 576):
        assert torch.equal(select(a, "weighted_combination", keep, alpha=1.0).indices,
                           select(a, "max_head", keep).indices)
        assert torch.equal(select(a, "weighted_combination", keep, alpha=1 / heads).indices,
                           select(a, "avg_all_heads", keep).indices)


def test_single_head_weighted_combination_is_defined():
    a = torch.rand(1, 20)
    sel = select(a, "weighted_combination", 5, alpha=0.3)
    assert sel.indices.tolist() == _reference_topk(a[0].numpy(), 5).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_per_element(method):
    a = _attention(2, 3, 4, 64)
    sel = select(a, method, 9, alpha=0.4, seed=1)
    assert sel.indices.shape == (2, 3, 9) and sel.scores.shape == (2, 3, 64) and sel.max_head.shape == (2, 3)
    if method == "random":  # keyed by flat position by default: each element its own subset
        rows = sel.indices.reshape(-1, 9).tolist()
        assert all(len(set(r)) == 9 and r == sorted(r) for r in rows)
        assert len({tuple(r) for r in rows}) == 6  # not batch element 0's subset copied
        return
    for i in range(2):
        for j in range(3):
            one = select(a[i, j], method, 9, alpha=0.4)
            assert torch.equal(sel.indices[i, j], one.indices)
            assert int(sel.max_head[i, j]) == int(one.max_head)


def test_batch_elements_get_their_own_selection():
    """The reference implementation only looked at batch element 0."""
    a = torch.zeros(2, 2, 10)
    a[0, :, :3] = 1.0
    a[1, :, -3:] = 1.0
    sel = select(a, "avg_all_heads", 3)
    assert sel.indices.tolist() == [[0, 1, 2], [7, 8, 9]]


def test_ties_go_to_lower_index():
    a = torch.ones(2, 10)
    assert select(a, "avg_all_heads", 4).indices.tolist() == [0, 1, 2, 3]
    assert select(a, "max_head", 4).max_head.item() == 0


def test_head_permutation_does_not_change_avg_all_heads():
    a = _attention(8, 100)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(select(a, "avg_all_heads", 30).indices, select(a[perm], "avg_all_heads", 30).indices)


def test_keep_zero_and_keep_all():
    a = _attention(2, 4, 16)
    for method in METHODS:
        assert select(a, method, 0).indices.shape == (2, 0)
        assert select(a, method, 16).indices.tolist() == [list(range(16))] * 2


def test_random_is_seeded_per_sample_key():
    a = _attention(2, 4, 100)
    one = select(a, "random", 10, seed=5, sample_keys=[3, 8]).indices
    two = select(a, "random", 10, seed=5, sample_keys=[3, 8]).indices
    other = select(a, "random", 10, seed=6, sample_keys=[3, 8]).indices
    assert torch.equal(one, two) and not torch.equal(one, other)
    # a sample's subset depends on its key only, not on its position or its batch
    swapped = select(a, "random", 10, seed=5, sample_keys=[8, 3]).indices
    assert torch.equal(swapped, one.flip(0))
    alone = select(a[1], "random", 10, seed=5, sample_keys=[8]).indices
    assert torch.equal(alone, one[1])
    # the stream is numpy's default_rng((seed, key)): the keep smallest-ranked = largest keys
    keys = np.random.default_rng([5, 3]).random(100)
    assert one[0].tolist() == sorted(np.argsort(-keys, kind="stable")[:10].tolist())
    with pytest.raises(ValueError, match="one sample key per element"):
        select(a, "random", 10, sample_keys=[1])


def test_uniform_spreads_over_the_grid():
    idx = uniform_indices(576, 64)
    rows, cols = idx // 24, idx % 24
    assert len(set(idx.tolist())) == 64
    assert sorted(set(rows.tolist())) == [1, 4, 7, 10, 13, 16, 19, 22]  # 8 x 8 lattice of cell centres
    assert abs(rows.float().mean().item() - 11.5) < 0.01 and abs(cols.float().mean().item() - 11.5) < 0.01
    for keep in range(0, 577, 7):
        got = uniform_indices(576, keep)
        assert len(set(got.tolist())) == keep and torch.equal(got, got.sort().values)
    assert len(set(uniform_indices(50, 13).tolist())) == 13  # non-square N falls back to a stride
    for keep in (20, 60, 192, 300):  # truncated lattices stay centred
        got = uniform_indices(576, keep)
        assert abs((got // 24).float().mean().item() - 11.5) < 1.0 and abs((got % 24).float().mean().item() - 11.5) < 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "best"}, "unknown method"),
        ({"alpha": 1.5, "method": "weighted_combination"}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"keep": 11}, "keep"),
        ({"keep": -1}, "keep"),
    ],
)
def test_bad_arguments_say_which(kwargs, message):
    args = {"method": "avg_all_heads", "keep": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        select(torch.rand(2, 10), **args)


def test_bad_attention_is_rejected():
    with pytest.raises(ValueError, match=r"\[\.\.\., H, N\]"):
        select(torch.rand(10), "avg_all_heads", 2)
    bad = torch.rand(2, 10)
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select(bad, "avg_all_heads", 2)


def test_metadata_has_reference_names():
    meta = select(_attention(4, 20), "weighted_combination", 5, alpha=0.6).metadata()
    assert set(meta) == {"method", "alpha", "max_head_idx", "head_importance", "kept_indices"}


@settings(max_examples=60, deadline=None)
@given(
    att=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 30)),
               elements=st.floats(0, 1, width=32)),
    data=st.data(),
)
def test_property_selection_is_valid_and_matches_reference(att, data):
    h, n = att.shape
    keep = data.draw(st.integers(0, n))
    alpha = data.draw(st.floats(0, 1))
    a = torch.from_numpy(att)
    for method in ("avg_all_heads", "max_head", "weighted_combination"):
        sel = select(a, method, keep, alpha=alpha)
        idx = sel.indices.tolist()
        assert len(idx) == keep and idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
        assert idx == _reference_topk(sel.scores.numpy(), keep).tolist()
        # every kept token scores at least as high as every dropped one
        dropped = sorted(set(range(n)) - set(idx))
        if idx and dropped:
            assert sel.scores[idx].min() >= sel.scores[dropped].max()
    # alpha = 1 and 1/H identities hold on arbitrary input too
    assert select(a, "weighted_combination", keep, alpha=1.0).indices.tolist() == select(a, "max_head", keep).indices.tolist()
    assert (select(a, "weighted_combination", keep, alpha=1 / h).indices.tolist()
            == select(a, "avg_all_heads", keep).indices.tolist())
    assert math.isclose(float(sel.head_importance.sum()), float(att.astype(np.float64).sum()), rel_tol=1e-4, abs_tol=1e-4)
