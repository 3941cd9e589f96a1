"""DivPrune (Alvar et al., CVPR'25): max-min diversity selection over the LLM-input embeddings.

Authors' code: vbdi/divprune@799e2d9 (fidelity: tests/test_field_methods.py).
"""

from __future__ import annotations

import math

import torch

from ..strategies import _Ctx, _positional, _Result, register


def divprune_order(embeddings: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """``[..., depth]`` DivPrune's max-min diversity picks (Alvar et al., CVPR'25), in pick order.

    Distance = 1 - cosine of the rows (each divided by its raw L2 norm); the first pick is
    the token whose nearest other token is farthest (the second-smallest distance of its
    column, the smallest being itself); each later pick maximises its distance to the
    nearest token picked so far; ties go to the lower index. Picked tokens are never picked
    again (the authors' loop could re-pick one only once every unpicked token duplicates a
    picked one exactly). The first ``d`` picks do not depend on ``depth``.
    """
    batch_shape, n = embeddings.shape[:-2], embeddings.shape[-2]
    depth = n if depth is None else depth
    x = embeddings.reshape(-1, n, embeddings.shape[-1]).float()
    block = max(1, BLOCK_BYTES // (4 * n * n))  # samples per [block, N, N] distance matrix
    order = torch.cat([_greedy(x[i:i + block], depth) for i in range(0, x.shape[0], block)]) if x.shape[0] else \
        torch.empty(0, depth, dtype=torch.long, device=x.device)
    return order.reshape(*batch_shape, depth)


BLOCK_BYTES = 1 << 28
"""The distance matrices :func:`divprune_order` holds at once (256 MiB: 8 samples at N = 2,880)."""


def _greedy(x: torch.Tensor, depth: int) -> torch.Tensor:
    """``[S, depth]`` the max-min picks of each of ``x``'s ``[S, N, D]`` samples (:func:`divprune_order`)."""
    count, n = x.shape[:2]
    unit = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - torch.bmm(unit, unit.transpose(1, 2))  # [S, N, N]
    order = torch.empty(count, depth, dtype=torch.long, device=x.device)
    if depth == 0:
        return order
    rows = torch.arange(count, device=x.device)
    # second-smallest of each column (topk of 2 gives kthvalue(2)'s value, faster)
    nearest = dist.topk(2, dim=1, largest=False).values[:, 1] if n > 1 else dist[:, 0]
    pick = torch.max(nearest, dim=-1).indices  # first maximum: ties to the lower index
    closest = torch.full((count, n), math.inf, device=x.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the picks' small ops run best on one thread (strategies.DIVERSE_CHUNK_TOKENS)
    try:
        for p in range(depth):
            order[:, p] = pick
            torch.minimum(closest, dist[rows, pick], out=closest)
            closest[rows, pick] = -math.inf  # never again
            if p < depth - 1:
                pick = torch.max(closest, dim=-1).indices
    finally:
        torch.set_num_threads(threads)
    return order


@register("divprune", "ranking", needs=("embeddings",), where="input", positions="compact",
          doc="DivPrune (before the LLM): max-min diversity of the LLM-input embeddings; positions: compact, as the "
              "authors' LLaVA code renumbers (eval --positions original: FastV's).")
def _divprune(ctx: _Ctx, keep: int | None) -> _Result:
    """:func:`divprune_order` of ``inputs["embeddings"]``; the greedy order is the ranking
    (positional scores, as for diverse). The authors keep ``round(ratio * N)`` tokens; here
    ``keep`` is given."""
    emb = ctx.inputs["embeddings"]
    order = divprune_order(emb, keep)
    return _Result(_positional(order.to(ctx.attention.device), ctx.attention.dtype, emb.shape[-2]))
