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
    unit = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - torch.bmm(unit, unit.transpose(1, 2))  # [S, N, N]
    count = x.shape[0]
    order = torch.empty(count, depth, dtype=torch.long, device=x.device)
    if depth == 0 or count == 0:
        return order.reshape(*batch_shape, depth)
    rows = torch.arange(count, device=x.device)
    nearest = dist.kthvalue(2, dim=1).values if n > 1 else dist[:, 0]  # second-smallest of each column
    pick = torch.max(nearest, dim=-1).indices  # first maximum: ties to the lower index
    closest = torch.full((count, n), math.inf, device=x.device)
    for p in range(depth):
        order[:, p] = pick
        torch.minimum(closest, dist[rows, pick], out=closest)
        closest[rows, pick] = -math.inf  # never again
        if p < depth - 1:
            pick = torch.max(closest, dim=-1).indices
    return order.reshape(*batch_shape, depth)


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
