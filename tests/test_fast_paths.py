"""The fast paths select what their plain definitions select: DART's similarities as one batched
product, DivPrune's distance matrices in blocks of samples, rank's integer-key sort."""

import math

import torch

from fastv_analysis import strategies  # noqa: F401  (first: importing methods first leaves ALL_METHODS short)
from fastv_analysis.methods import divprune
from fastv_analysis.methods.dart import dart_keep, python_set_order


def _plain_dart(img, txt, keep, pivot_image=4, pivot_text=4):
    """DART as its docstring reads, one sample and one pivot at a time (torch.cosine_similarity)."""
    n = img.shape[0]
    n_img = min(pivot_image, keep)
    pivots = torch.sort(img[:, 1], descending=True, stable=True).indices[:n_img]
    taken = torch.zeros(n, dtype=torch.bool)
    taken[pivots] = True
    vectors = [img[p, 2:] for p in pivots] + [t[1:] for t in txt[:pivot_text]]
    positions = [int(img[p, 0]) for p in pivots] + [int(t[0]) for t in txt[:pivot_text]]
    share, extra = divmod(keep - n_img, len(vectors))
    for slot, pos in enumerate(python_set_order(positions)):
        sim = torch.cosine_similarity(vectors[positions.index(pos)][None], img[:, 2:], dim=-1)
        budget = share + (slot < extra)
        if budget:
            taken[torch.where(taken, -math.inf, -sim).topk(budget).indices] = True
    return taken.nonzero()[:, 0]


def test_dart_batched_similarities_keep_what_one_pivot_at_a_time_keeps():
    g = torch.Generator().manual_seed(3)
    n, dim, count = 400, 64, 6
    pos = torch.arange(35, 35 + n, dtype=torch.float32).expand(count, n)
    img = torch.cat([pos[..., None], torch.rand(count, n, 1, generator=g) * 100,
                     torch.randn(count, n, dim, generator=g)], dim=-1)
    txt = torch.cat([torch.arange(500, 504, dtype=torch.float32).expand(count, 4)[..., None],
                     torch.randn(count, 4, dim, generator=g)], dim=-1)
    for keep in (200, 100, 45, 9, 3):
        fast = dart_keep(img, txt, keep)
        for s in range(count):
            assert fast[s].tolist() == _plain_dart(img[s], txt[s], keep).tolist(), (keep, s)


def test_divprune_in_blocks_picks_what_one_block_picks(monkeypatch):
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(7, 300, 32, generator=g)
    whole = divprune.divprune_order(emb, 150)
    monkeypatch.setattr(divprune, "BLOCK_BYTES", 2 * 4 * 300 * 300)  # 2 samples a block: 4 blocks
    assert torch.equal(divprune.divprune_order(emb, 150), whole)
    assert all(torch.equal(divprune.divprune_order(emb[s], 150), whole[s]) for s in range(7))


def test_rank_orders_as_the_stable_descending_sort():
    """rank's key sort == torch's stable descending sort: ties to the lower index, -0.0 tied with
    0.0, negatives, infinities, a batch of samples, N = 2,880."""
    from fastv_analysis import strategies

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 4, 2880, generator=g)
    scores[..., ::7] = scores[..., 3:4]  # many exact ties
    scores[0, 0, :6] = torch.tensor([0.0, -0.0, 0.0, float("inf"), -float("inf"), -0.0])
    scores[1] = torch.round(scores[1] * 4) / 4  # coarse values: ties everywhere
    expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    assert torch.equal(strategies.rank(scores), expected)
    assert torch.equal(strategies.rank(scores[0, 0, :6]), torch.tensor([3, 0, 1, 2, 5, 4]))
    with_nan = scores[2, 0].clone()
    with_nan[10] = float("nan")  # the sort's own order (NaN first)
    assert torch.equal(strategies.rank(with_nan), torch.sort(with_nan, descending=True, stable=True).indices)
