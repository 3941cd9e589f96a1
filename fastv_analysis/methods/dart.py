"""DART (Wen et al., EMNLP'25): keep the image tokens least duplicated with a few pivot tokens.

Authors' code: ZichenWen1/DART (read at xqy1111111/DART@5a19452; fidelity:
tests/test_field_methods.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..strategies import _Ctx, _Result, register


def python_set_order(values: Sequence[int]) -> list[int]:
    """The iteration order of ``set(values)`` (CPython's hash order): DART visits its pivots so."""
    return list(set(int(v) for v in values))


def _cosines(tokens: torch.Tensor, pivots: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``[S, N, P]`` cosine of every token ``[S, N, D]`` with every pivot ``[S, P, D]``, as
    ``torch.cosine_similarity`` defines it (each vector over its norm clamped at ``eps``), as one
    batched product instead of P broadcast calls (the cost at N = 2,880)."""
    unit_pivots = pivots / pivots.norm(dim=-1, keepdim=True).clamp_min(eps)
    # the tokens' norms divide the [S, N, P] product, not the [S, N, D] tokens (no copy of them)
    return torch.bmm(tokens, unit_pivots.transpose(1, 2)) / tokens.norm(dim=-1, keepdim=True).clamp_min(eps)


def dart_keep(dart_image: torch.Tensor, dart_text: torch.Tensor, keep: int, pivot_image: int = 4,
              pivot_text: int = 4) -> torch.Tensor:
    """``[..., keep]`` DART's kept image tokens (Wen et al., EMNLP'25), ascending.

    Pivots: the ``pivot_image`` image tokens with the largest layer K-1 key L1 norm and the
    first ``pivot_text`` stored text pivots. Visiting the pivots in the order of a Python
    ``set`` of their prompt positions, each takes the tokens of the pool (image tokens not yet
    taken, image pivots excluded) least cosine-similar to it (final-normed layer K-1
    outputs) and removes them from the pool. Kept = image pivots + every token taken. Each
    pivot takes ``(keep - pivot_image) // P`` (P = all pivots), the first ``r`` visited one
    more, r the remainder: the authors' count whenever keep - pivot_image is a multiple of P
    (LLaVA: max_num_trunction 128 -> 16 a pivot, 132 kept). keep <= pivot_image: the top
    ``keep`` image pivots.
    """
    batch_shape, n = dart_image.shape[:-2], dart_image.shape[-2]
    img = dart_image.reshape(-1, n, dart_image.shape[-1]).float()
    txt = dart_text.reshape(-1, *dart_text.shape[-2:])[:, :pivot_text].float()
    count, device = img.shape[0], img.device
    n_img = min(pivot_image, keep)
    pivots = torch.sort(img[..., 1], dim=-1, descending=True, stable=True).indices[:, :n_img]  # [S, n_img]
    taken = torch.zeros(count, n, dtype=torch.bool, device=device)
    taken.scatter_(1, pivots, True)
    rest = keep - n_img
    if rest:
        vectors = torch.cat([img.gather(1, pivots[..., None].expand(-1, -1, img.shape[-1]))[..., 2:], txt[..., 1:]], 1)
        positions = torch.cat([img[..., 0].gather(1, pivots), txt[..., 0]], dim=1).long().tolist()
        visit = torch.tensor([[p.index(v) for v in python_set_order(p)] for p in positions], device=device)
        vectors = vectors.gather(1, visit[..., None].expand(-1, -1, vectors.shape[-1]))  # in visiting order
        sims = _cosines(img[..., 2:], vectors)  # [S, N, P]: every pivot's similarities in one product
        share, extra = divmod(rest, visit.shape[1])
        for slot in range(visit.shape[1]):
            budget = share + (slot < extra)
            if budget:
                least = torch.where(taken, -math.inf, -sims[..., slot]).topk(budget, dim=-1).indices
                taken.scatter_(1, least, True)
    kept = taken.nonzero()[:, 1].view(count, keep)
    return kept.reshape(*batch_shape, keep)


@register("dart", "set", params={"pivot_image": 4, "pivot_text": 4}, needs=("dart_image", "dart_text"),
          doc="DART (layer K, default 2): keep tokens least duplicated with key-norm pivots, no attention needed; "
              "positions: original, as the authors' code.")
def _dart(ctx: _Ctx, keep: int | None, *, pivot_image: int, pivot_text: int) -> _Result:
    """:func:`dart_keep`; scores are the image tokens' key L1 norms (what picks the pivots)."""
    if keep is None:
        raise ValueError("'dart' has no keep-independent score; use select")
    img, txt = ctx.inputs["dart_image"], ctx.inputs["dart_text"]
    if not (isinstance(pivot_image, int) and pivot_image >= 1 and isinstance(pivot_text, int) and
            0 <= pivot_text <= txt.shape[-2]):
        raise ValueError(f"dart: pivot_image must be >= 1 and pivot_text in 0..{txt.shape[-2]} (the stored text "
                         f"pivots), got {pivot_image!r}, {pivot_text!r}")
    kept = dart_keep(img, txt, keep, pivot_image, pivot_text).to(ctx.attention.device)
    return _Result(img[..., 1].to(ctx.attention.device), indices=kept)
