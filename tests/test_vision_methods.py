"""VisionZip and VisPruner: the authors' own selection functions' results on a fixed input.

The expected values below were obtained by running, in this repository's session, the
authors' code on the fixture of :func:`_attn` / :func:`_feats` (tie-free scores):
* VisionZip: ``CLIPVisionTower_VisionZip.forward`` of dvlab-research/VisionZip@3151f6d
  (visionzip/clip_encoder.py), fed a fake tower whose CLS attention row (all heads) is
  ``_attn``, whose layer -2 ``metric`` (head-mean keys) is ``_feats`` and whose hidden states
  are one-hot rows, so each output row spells its merge group and weights (dominant_num =
  patches, CLS added by the authors);
* VisPruner: ``encode_images`` of Theia-4869/VisPruner@aefa01a (llava/model/llava_arch.py),
  fed a fake tower returning ``_feats`` as the patch features and ``_attn`` as every head's
  CLS attention.
"""

import math

import pytest
import torch

from fastv_analysis.methods.visionzip import contextual_count, visionzip_plan
from fastv_analysis.methods.vispruner import vispruner_keep
from fastv_analysis.strategies import STRATEGIES, select


def _attn(n, a, b):
    return torch.tensor([((a * t + b) % n + 1) / n for t in range(n)], dtype=torch.float64)


def _feats(n, d, c):
    return torch.tensor([[math.cos(c * (t + 1) * (j + 1) + 0.7 * j) for j in range(d)] for t in range(n)],
                        dtype=torch.float64)


# (n, d, spec, dominant, contextual) -> the authors' dominant patches and (target, members) groups
VISIONZIP = [
    (16, 4, (5, 3, 1.3), 5, 3, [2, 5, 8, 12, 15], [(0, [7, 10, 13]), (4, [3, 11]), (9, [1, 6, 14])]),
    (16, 4, (3, 1, 0.9), 5, 3, [4, 9, 10, 14, 15], [(0, [2, 11]), (3, [1, 6, 8, 13]), (7, [5, 12])]),
    (24, 3, (7, 2, 1.1), 6, 4, [3, 6, 13, 16, 20, 23],
     [(0, [12, 14, 17]), (5, [22]), (10, [1, 2, 4, 8, 18, 19, 21]), (15, [7, 9, 11])]),
]


@pytest.mark.parametrize("n,d,spec,dominant,contextual,want_dom,want_groups", VISIONZIP)
def test_visionzip_matches_the_authors_groups(n, d, spec, dominant, contextual, want_dom, want_groups):
    indices, merge = visionzip_plan(_attn(n, *spec[:2])[None], _feats(n, d, spec[2])[None], dominant, contextual)
    indices, assign, weight = indices[0].tolist(), merge.assign[0], merge.weight[0]
    targets = [t for t, _ in want_groups]
    assert indices == sorted(want_dom + targets)
    for t in want_dom:
        assert (assign == indices.index(t)).nonzero()[:, 0].tolist() == [t] and weight[t] == 1
    for t, members in want_groups:
        slot = indices.index(t)
        assert (assign == slot).nonzero()[:, 0].tolist() == sorted([t] + members)
        assert weight[t] == 1 and all(weight[m] == pytest.approx(1 / len(members)) for m in members)
    assert int((assign >= 0).sum()) == n  # VisionZip drops nothing: every token is kept or merged


# (n, d, specs, keep, ratio) -> the authors' kept indices per sample
VISPRUNER = [
    (40, 5, [(7, 2, 1.1), (3, 1, 0.9)], 12, 0.5,
     [[2, 5, 10, 11, 12, 16, 22, 23, 28, 34, 38, 39], [5, 11, 12, 13, 24, 25, 26, 29, 32, 37, 38, 39]]),
    (64, 6, [(5, 3, 1.3)], 16, 0.5, [[9, 11, 12, 14, 20, 24, 25, 26, 37, 49, 50, 52, 53, 58, 62, 63]]),
    # 41 - int(12 * 0.5) = 35 leftovers: the authors' code raises IndexError; LightCompress makes 7
    # tokens important, which the authors' code gives at ratio 0.6 (int(7.2) = 7)
    (41, 4, [(5, 3, 1.3)], 12, 0.5, [[7, 14, 15, 19, 21, 23, 24, 31, 32, 36, 39, 40]]),
]


@pytest.mark.parametrize("n,d,specs,keep,ratio,want", VISPRUNER)
def test_vispruner_matches_the_authors_kept_set(n, d, specs, keep, ratio, want):
    attn = torch.stack([_attn(n, *s[:2]) for s in specs])
    feats = torch.stack([_feats(n, d, s[2]) for s in specs])
    assert vispruner_keep(attn, feats, keep, ratio).tolist() == want


def test_vispruner_keeps_exactly_keep_where_the_authors_fail():
    attn, feats = _attn(32, 5, 3)[None], _feats(32, 6, 1.3)[None]  # authors: negative expand at R = 12
    for keep in range(0, 33):
        kept = vispruner_keep(attn, feats, keep)
        assert kept.shape == (1, keep) and len(set(kept[0].tolist())) == keep


def test_registered_strategies_select_through_the_registry():
    n = 24
    attn = _attn(n, 7, 2)[None].float()
    inputs = {"vision_attention": attn, "vision_keys": _feats(n, 3, 1.1)[None].float(),
              "vision_features": _feats(n, 5, 0.9)[None].float()}
    rows = torch.zeros(1, 2, n)
    sel = select(rows, "visionzip", 10, inputs=inputs, contextual=4)
    indices, merge = visionzip_plan(attn, inputs["vision_keys"], 6, 4)
    assert torch.equal(sel.indices, indices) and torch.equal(sel.merge.assign, merge.assign)
    assert contextual_count(64) == 10 and contextual_count(128) == 20 and contextual_count(192) == 30
    assert select(rows, "visionzip", 64 if n >= 64 else 20, inputs=inputs).merge.assign.max() == 19
    sel = select(rows, "vispruner", 8, inputs=inputs)
    assert sel.indices.tolist() == vispruner_keep(attn, inputs["vision_features"], 8).tolist()
    assert sel.merge is None
    for name in ("visionzip", "vispruner"):
        spec = STRATEGIES[name]
        assert spec.where == "vision" and spec.positions == "compact" and spec.merges == (name == "visionzip")
    with pytest.raises(ValueError, match="vision_keys"):
        select(rows, "visionzip", 4, inputs={"vision_attention": attn})
    with pytest.raises(ValueError, match="contextual"):
        select(rows, "visionzip", 4, inputs=inputs, contextual=5)
