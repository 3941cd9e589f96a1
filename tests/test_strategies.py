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


# ----------------------------------------------------------------------------- registry and new strategies
# Expected values below are worked out by hand in the comments, never by the code under test.

from fastv_analysis import strategies as S  # noqa: E402

NEW = ("dynamic_alpha", "no_rope", "sink_excluded", "diverse", "hybrid_uniform", "divprune", "dart", "cdpruner",
       "sparsevlm", "visionzip", "vispruner")


def _t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def _random_inputs(attention, seed=0, d=8):
    """Arbitrary well-formed inputs for the generic (non hand-computed) checks."""
    g = torch.Generator().manual_seed(seed)
    batch, n = attention.shape[:-2], attention.shape[-1]
    return {
        "attention_no_rope": torch.softmax(torch.randn(attention.shape, generator=g), dim=-1),
        "attention_text_mean": torch.softmax(torch.randn(attention.shape, generator=g), dim=-1),
        "attention_all_mean": torch.softmax(torch.randn(attention.shape, generator=g), dim=-1),
        "hidden_norm": torch.rand(*batch, n, generator=g) + torch.eye(n)[0] * 100,  # token 0 a sink
        "sketch": torch.randn(*batch, n, d, generator=g),
        "embeddings": torch.randn(*batch, n, d, generator=g),
        "dart_image": torch.cat([(5.0 + torch.arange(n)).expand(*batch, n)[..., None],
                                 torch.rand(*batch, n, 1, generator=g), torch.randn(*batch, n, d, generator=g)], -1),
        "dart_text": torch.cat([(5.0 + n + torch.arange(4.0)).expand(*batch, 4)[..., None],
                                torch.randn(*batch, 4, d, generator=g)], -1),
        "instruction": torch.randn(*batch, d, generator=g),
        "attention_raters": torch.softmax(torch.randn(attention.shape, generator=g), dim=-1),
        "hidden_out": torch.randn(*batch, n, d, generator=g),
        "vision_attention": torch.rand(*batch, n, generator=g),
        "vision_keys": torch.randn(*batch, n, d, generator=g),
        "vision_features": torch.randn(*batch, n, d, generator=g),
    }


def test_registry_order_keeps_the_original_five_first():
    assert tuple(S.STRATEGIES) == S.ALL_METHODS == (
        "avg_all_heads", "max_head", "weighted_combination", "random", "uniform",
        "dynamic_alpha", "no_rope", "sink_excluded", "diverse", "hybrid_uniform", "divprune", "dart", "pooling",
        "cdpruner", "sparsevlm", "visionzip", "vispruner")
    assert METHODS == ("avg_all_heads", "max_head", "weighted_combination", "random", "uniform")
    assert S.ATTENTION_METHODS == ("avg_all_heads", "max_head", "weighted_combination")
    assert S.CONTROL_METHODS == ("random", "uniform")
    kinds = {name: s.kind for name, s in S.STRATEGIES.items()}
    assert kinds == {"avg_all_heads": "ranking", "max_head": "ranking", "weighted_combination": "ranking",
                     "random": "control", "uniform": "control", "dynamic_alpha": "ranking", "no_rope": "ranking",
                     "sink_excluded": "ranking", "diverse": "ranking", "hybrid_uniform": "set",
                     "divprune": "ranking", "dart": "set", "pooling": "set", "cdpruner": "ranking", "sparsevlm": "set",
                     "visionzip": "set", "vispruner": "set"}
    assert S.strategy("weighted_combination").params == {"alpha": 0.5, "query": "last"}
    assert S.strategy("sink_excluded").params == {"base": "avg_all_heads", "sink_ratio": 5.0, "query": "last"}
    assert S.strategy("sink_excluded").needs == ("hidden_norm",)
    assert S.strategy("diverse").needs == ("sketch",) and S.strategy("no_rope").needs == ("attention_no_rope",)
    assert all(s.doc and "\n" not in s.doc for s in S.STRATEGIES.values())
    assert S.QUERIES == ("last", "text_mean", "all_mean")


def test_unknown_method_lists_every_registered_name():
    for call in (lambda: S.strategy("best"), lambda: select(torch.rand(2, 4), "best", 1),
                 lambda: S.method_scores(torch.rand(2, 4), "best")):
        with pytest.raises(ValueError, match="unknown method 'best'") as err:
            call()
        assert all(name in str(err.value) for name in S.ALL_METHODS)


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        S.register("max_head", "ranking", doc="dup")(lambda ctx, keep: None)


def test_dynamic_alpha_with_equal_heads_is_exactly_avg_all_heads():
    # both heads sum to 1 (eighths): alpha = 1/2 = 1/H, so the score is the head mean
    # [1.5, 2.5, 3, 1] / 8 -> top 2 = tokens 2, 1; top 3 adds token 0
    a = _t([[1, 4, 2, 1], [2, 1, 4, 1]]) / 8
    sel = select(a, "dynamic_alpha", 2)
    assert sel.indices.tolist() == [1, 2] and select(a, "dynamic_alpha", 3).indices.tolist() == [0, 1, 2]
    assert torch.equal(sel.scores, _t([1.5, 2.5, 3, 1]) / 8)
    assert torch.equal(sel.scores, select(a, "avg_all_heads", 2).scores)
    assert sel.sample_alpha.item() == 0.5 and sel.alpha is None and sel.method == "dynamic_alpha"


def test_dynamic_alpha_with_one_dominant_head_is_max_head():
    # head 1 holds all the image attention: alpha = 1, score = head 1 = [.1, .5, .3, .1] -> top 2 = 1, 2
    a = _t([[0, 0, 0, 0], [0.1, 0.5, 0.3, 0.1], [0, 0, 0, 0]])
    sel = select(a, "dynamic_alpha", 2)
    assert sel.sample_alpha.item() == 1.0
    assert sel.indices.tolist() == [1, 2] == select(a, "max_head", 2).indices.tolist()
    assert torch.equal(sel.scores, a[1])


def test_dynamic_alpha_weights_the_max_head_by_its_share():
    # importance: head 0 = .30+.25+.05 = .60, head 1 = .10+.05 = .15 -> alpha = .60/.75 = .8
    # scores = .8 * h0 + .2 * h1 = [.24, .2 + .02, .04 + .01, 0] = [.24, .22, .05, 0]
    a = _t([[[0.30, 0.25, 0.05, 0.0], [0.0, 0.10, 0.05, 0.0]],
            [[0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]])  # sample 2: equal heads, alpha = 1/2
    sel = select(a, "dynamic_alpha", 1)
    np.testing.assert_allclose(sel.sample_alpha.numpy(), [0.8, 0.5], rtol=1e-12)
    np.testing.assert_allclose(sel.scores[0].numpy(), [0.24, 0.22, 0.05, 0.0], rtol=1e-12, atol=1e-15)
    assert sel.indices.tolist() == [[0], [0]]  # sample 2: all tied -> lowest index
    assert select(a[0], "avg_all_heads", 1).indices.tolist() == [1]  # mean [.15, .175, ...] would keep 1


def test_no_rope_ranks_the_no_rope_rows_not_attention():
    # attention ranks token 3 first; no-RoPE mean = [4.5, 2, 2, 1.5] / 8 -> top 2 = 0, then 1 (tie with 2)
    a = _t([[1, 2, 3, 4], [1, 2, 3, 4]]) / 10
    rows = _t([[4, 3, 2, 1], [5, 1, 2, 2]]) / 8
    sel = select(a, "no_rope", 2, inputs={"attention_no_rope": rows})
    assert sel.indices.tolist() == [0, 1]
    assert torch.equal(sel.scores, _t([4.5, 2, 2, 1.5]) / 8)


@pytest.mark.parametrize("method, needed", [("no_rope", "attention_no_rope"), ("sink_excluded", "hidden_norm"),
                                            ("diverse", "sketch")])
def test_missing_input_raises_one_line_naming_strategy_and_input(method, needed):
    with pytest.raises(ValueError) as err:
        select(torch.rand(2, 6), method, 2)
    msg = str(err.value)
    assert method in msg and repr(needed) in msg and "\n" not in msg
    assert S.required_inputs(method) == (needed,)


def test_query_variants_need_their_rows():
    with pytest.raises(ValueError, match="avg_all_heads needs input 'attention_text_mean'"):
        select(torch.rand(2, 6), "avg_all_heads", 2, query="text_mean")
    with pytest.raises(ValueError, match="sink_excluded needs input 'attention_all_mean'"):
        select(torch.rand(2, 6), "sink_excluded", 2, query="all_mean", inputs={"hidden_norm": torch.ones(6)})
    assert S.required_inputs("diverse", query="all_mean", base="max_head") == ("sketch", "attention_all_mean")
    assert S.required_inputs("hybrid_uniform", base="no_rope") == ("attention_no_rope",)


@pytest.mark.parametrize("kwargs, message", [
    ({"query": "first"}, "query must be one of last, text_mean, all_mean"),
    ({"colour": 1}, "avg_all_heads has no parameter 'colour'"),
])
def test_bad_params_say_which(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select(torch.rand(2, 6), "avg_all_heads", 2, **kwargs)


def test_bad_inputs_are_rejected():
    a = torch.rand(2, 3, 6)
    with pytest.raises(ValueError, match="'hidden_norm' must have shape"):
        select(a, "sink_excluded", 2, inputs={"hidden_norm": torch.ones(2, 5)})
    with pytest.raises(ValueError, match="'attention_no_rope' must have shape"):
        select(a, "no_rope", 2, inputs={"attention_no_rope": torch.ones(2, 2, 6)})
    with pytest.raises(ValueError, match="unknown input 'sketches'"):
        select(a, "diverse", 2, inputs={"sketches": torch.ones(2, 6, 4)})
    bad = torch.ones(2, 6, 4)
    bad[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="'sketch' contains NaN"):
        select(a, "diverse", 2, inputs={"sketch": bad})
    with pytest.raises(ValueError, match="no_rope has no parameter 'query'"):
        select(a, "no_rope", 2, inputs={"attention_no_rope": a}, query="text_mean")
    with pytest.raises(ValueError, match="base must be one of"):
        select(a, "diverse", 2, inputs={"sketch": bad.clamp(max=1)}, base="random")
    with pytest.raises(ValueError, match="sink_ratio"):
        select(a, "sink_excluded", 2, inputs={"hidden_norm": torch.ones(2, 6)}, sink_ratio=0)
    with pytest.raises(ValueError, match="uniform_share"):
        select(a, "hybrid_uniform", 2, uniform_share=1.5)


@pytest.mark.parametrize("method, extra", [
    ("avg_all_heads", {}), ("max_head", {}), ("weighted_combination", {}), ("dynamic_alpha", {}),
    ("sink_excluded", {"hidden_norm": torch.ones(1, 4)}),  # no sinks: plain base ranking
    ("diverse", {"sketch": torch.eye(4)[None]}),  # orthogonal sketches: plain base ranking
    ("hybrid_uniform", {}),  # keep 1 with share 1/2: floor(0.5) = 0 lattice tokens, 1 from the base
])
def test_query_variants_read_the_right_rows(method, extra):
    # equal heads so every attention ranking agrees: last-token rows put token 0 first,
    # text-mean rows token 1, all-mean rows token 2
    def rows(top):
        r = torch.full((1, 2, 4), 0.1, dtype=torch.float64)
        r[..., top] = 0.7
        return r

    inputs = {"attention_text_mean": rows(1), "attention_all_mean": rows(2), **extra}
    for query, top in (("last", 0), ("text_mean", 1), ("all_mean", 2)):
        sel = select(rows(0), method, 1, inputs=inputs, query=query)
        assert sel.indices.tolist() == [[top]], query
        assert sel.params["query"] == query
        assert sel.max_head.tolist() == [0]  # head statistics always come from `attention`


def test_sink_mask_uses_the_median_of_each_sample():
    # sorted [1, 2, 3, 5, 6, 100]: median (3 + 5) / 2 = 4; x1.25 -> threshold 5: tokens 4 (100) and 5 (6)
    # (the lower median 3 would give threshold 3.75 and flag 5 as well)
    norms = _t([[1, 2, 3, 5, 100, 6], [7, 7, 7, 7, 7, 7]])
    assert S.sink_mask(norms, 1.25).tolist() == [[False, False, False, False, True, True], [False] * 6]


def test_sink_excluded_drops_a_planted_sink_until_keep_exceeds_the_non_sinks():
    # base (avg) ranking: 0, 1, 2, 3, 4; norms sorted [1, 1, 1.5, 2, 50]: median 1.5,
    # threshold 5 x 1.5 = 7.5 -> token 0 (norm 50) is a sink -> ranking 1, 2, 3, 4, 0
    a = _t([[0.5, 0.2, 0.15, 0.1, 0.05]] * 2)
    inputs = {"hidden_norm": _t([50, 1, 2, 1.5, 1])}
    assert select(a, "avg_all_heads", 1).indices.tolist() == [0]
    assert select(a, "sink_excluded", 1, inputs=inputs).indices.tolist() == [1]
    assert select(a, "sink_excluded", 4, inputs=inputs).indices.tolist() == [1, 2, 3, 4]
    assert select(a, "sink_excluded", 5, inputs=inputs).indices.tolist() == [0, 1, 2, 3, 4]
    # scores are positional: rank 1 -> 5 ... the sink last -> 1
    assert select(a, "sink_excluded", 2, inputs=inputs).scores.tolist() == [1, 5, 4, 3, 2]
    # sink_ratio 1 makes token 2 (norm 2 > 1 x 1.5) a sink too: ranking 1, 3, 4, then sinks 2, 0
    assert select(a, "sink_excluded", 3, inputs=inputs, sink_ratio=1.0).indices.tolist() == [1, 3, 4]


def test_sinks_keep_their_base_order_among_themselves():
    # base ranking: 2 (.5), 1 (.2), 3 (.15), 0 (.1), 4 (.05); norms sorted [1, 1, 1.5, 40, 50]:
    # median 1.5, threshold 7.5 -> sinks 0 and 2 -> ranking 1, 3, 4, then sink 2 before sink 0
    a = _t([[0.1, 0.2, 0.5, 0.15, 0.05]])
    inputs = {"hidden_norm": _t([50, 1, 40, 1.5, 1])}
    assert select(a, "sink_excluded", 3, inputs=inputs).indices.tolist() == [1, 3, 4]
    assert select(a, "sink_excluded", 4, inputs=inputs).indices.tolist() == [1, 2, 3, 4]
    assert S.rank(S.method_scores(a, "sink_excluded", inputs=inputs)).tolist() == [1, 3, 4, 2, 0]


def _diverse_case():
    # base scores (1 head) [.4, .35, .2, .05]; sketch: token 1 is a near-duplicate of token 0
    # (cos = 1/sqrt(1 + 1e-6) ~ 1 - 5e-7), token 2 orthogonal to 0, token 3 at 45 degrees.
    # pick 1: argmax = 0. gains: t1 .35 x 5e-7 ~ 1.75e-7, t2 .2 x (1 - 0) = .2,
    #   t3 .05 x (1 - .7071) = .0146 -> pick 2.
    # then max cos: t1 max(~1, 1e-3) ~ 1 -> ~0; t3 max(.7071, .7071) -> .0146 -> pick 3, last 1.
    a = _t([[[0.4, 0.35, 0.2, 0.05]]])
    sketch = _t([[[1, 0], [1, 1e-3], [0, 1], [1, 1]]])
    return a, sketch


def test_diverse_skips_a_near_duplicate_of_the_first_pick():
    a, sketch = _diverse_case()
    inputs = {"sketch": sketch}
    assert select(a, "avg_all_heads", 2).indices.tolist() == [[0, 1]]
    assert select(a, "diverse", 1, inputs=inputs).indices.tolist() == [[0]]
    assert select(a, "diverse", 2, inputs=inputs).indices.tolist() == [[0, 2]]
    assert select(a, "diverse", 3, inputs=inputs).indices.tolist() == [[0, 2, 3]]
    assert S.diverse_order(a.mean(-2), sketch).tolist() == [[0, 2, 3, 1]]
    # the greedy order is the ranking: positional scores 4, 3, 2, 1 along 0, 2, 3, 1
    assert S.method_scores(a, "diverse", inputs=inputs).tolist() == [[4, 1, 3, 2]]


def test_diverse_is_vectorised_per_sample_and_ties_go_to_the_lower_index():
    a, sketch = _diverse_case()
    # sample 2: equal scores and orthogonal (one-hot) sketches: every gain equal -> 0, 1, 2, 3
    a2 = torch.cat([a, torch.full((1, 1, 4), 0.25, dtype=torch.float64)])
    sketch2 = torch.cat([sketch.expand(1, 4, 2).repeat(1, 1, 2), torch.eye(4, dtype=torch.float64)[None]])
    assert S.diverse_order(a2.mean(-2), sketch2).tolist() == [[0, 2, 3, 1], [0, 1, 2, 3]]
    assert select(a2, "diverse", 2, inputs={"sketch": sketch2}).indices.tolist() == [[0, 2], [0, 1]]


def test_hybrid_uniform_takes_the_lattice_then_the_base_top():
    # 4 x 4 grid. keep 4, share .5 -> 2 lattice tokens: rows floor((.5, 1.5) x 4 / 2) = 1, 3,
    # column floor(.5 x 4) = 2 -> tokens 6 and 14. Base (avg) scores: 6 -> .5, 3 -> .3, 9 -> .2, rest 0,
    # so the other 2 are the base top outside the lattice: 3 and 9.
    scores = torch.zeros(16, dtype=torch.float64)
    scores[[6, 3, 9]] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    a = scores.expand(2, 16)
    assert uniform_indices(16, 2).tolist() == [6, 14]
    assert select(a, "hybrid_uniform", 4).indices.tolist() == [3, 6, 9, 14]
    # keep 5 -> floor(2.5) = 2 lattice tokens, 3 from the base: 3, 9, then the lowest-index 0-score token 0
    assert select(a, "hybrid_uniform", 5).indices.tolist() == [0, 3, 6, 9, 14]
    # share 0: plain avg top 4 = 6, 3, 9, 0; share 1: the 2 x 2 lattice rows/cols 1, 3 -> 5, 7, 13, 15
    assert select(a, "hybrid_uniform", 4, uniform_share=0.0).indices.tolist() == [0, 3, 6, 9]
    assert select(a, "hybrid_uniform", 4, uniform_share=1.0).indices.tolist() == [5, 7, 13, 15]
    # a set, not a ranking: keep 2 -> lattice of 1 = centre token 10 plus base top 6; 10 is not kept at 4
    assert select(a, "hybrid_uniform", 2).indices.tolist() == [6, 10]
    with pytest.raises(ValueError, match="no keep-independent score"):
        S.method_scores(a, "hybrid_uniform")


def test_hybrid_uniform_lattice_part_is_uniform_indices():
    a = _attention(3, 4, 576, seed=4)
    for keep in (0, 1, 7, 64, 192, 288, 576):
        kept = select(a, "hybrid_uniform", keep, uniform_share=0.25).indices
        lattice = uniform_indices(576, math.floor(0.25 * keep))
        for row in kept.tolist():
            assert len(set(row)) == keep and set(lattice.tolist()) <= set(row)
    assert S.uniform_count(100, 0.29) == 29  # float 0.29 x 100 = 28.999999999999996


@pytest.mark.parametrize("method", NEW)
def test_new_strategies_batch_equals_per_element_and_keep_extremes(method):
    a = _attention(2, 3, 4, 16, seed=7)
    inputs = _random_inputs(a, seed=8)
    sel = select(a, method, 5, inputs=inputs)
    assert sel.indices.shape == (2, 3, 5) and sel.scores.shape == (2, 3, 16)
    for i in range(2):
        for j in range(3):
            one = select(a[i, j], method, 5, inputs={k: v[i, j] for k, v in inputs.items()})
            assert torch.equal(sel.indices[i, j], one.indices)
    assert select(a, method, 0, inputs=inputs).indices.shape == (2, 3, 0)
    assert select(a, method, 16, inputs=inputs).indices.tolist() == [[list(range(16))] * 3] * 2


@pytest.mark.parametrize("method", S.ALL_METHODS)
def test_select_keeps_equals_select_and_rankings_are_prefixes(method):
    a = _attention(5, 4, 36, seed=9)
    inputs = _random_inputs(a, seed=10)
    keeps = [30, 12, 5, 0]
    many = S.select_keeps(a, method, keeps, alpha=0.3, seed=2, inputs=inputs)
    for k in keeps:
        assert torch.equal(many[k].indices, select(a, method, k, alpha=0.3, seed=2, inputs=inputs).indices)
    if S.strategy(method).kind == "set" or method == "uniform":
        return
    order = S.rank(S.method_scores(a, method, 0.3, 2, inputs=inputs))
    for k in keeps:
        assert torch.equal(many[k].indices, S.top_k(order, k))


def test_old_methods_ignore_inputs_and_report_default_params():
    a = _attention(2, 4, 20)
    inputs = _random_inputs(a)
    for method in METHODS:
        plain, with_inputs = select(a, method, 6, alpha=0.7), select(a, method, 6, alpha=0.7, inputs=inputs)
        assert torch.equal(plain.indices, with_inputs.indices) and plain.sample_alpha is None
    assert dict(select(a, "max_head", 3).params) == {"query": "last"}
    assert select(a, "weighted_combination", 3, alpha=0.7).alpha == 0.7
    assert select(a, "hybrid_uniform", 3, alpha=0.7, base="weighted_combination").alpha == 0.7
