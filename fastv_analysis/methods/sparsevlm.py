"""SparseVLM v1.0 (Zhang et al., ICML'25): text raters score the image tokens; pruned tokens recycled.

Authors' code: Gumpest/SparseVLMs@26a5f48 (v1.0: ``llava/model/language_model/
modelling_sparse_llama.py`` ``LlamaDynamicvitModel.forward``, ``score.py``
``attn_postprocess_topk``, ``utils.py`` ``cluster_and_merge``; fidelity:
tests/test_text_methods.py).

One cut of the authors' progressive schedule, at K = l + 1 for their layer l (they read
layer l's own attention and prune its output: layers 2, 6, 15, so K = 3, 7, 16):

* raters: the text tokens after the image whose layer-0 share of the image tokens' softmax
  is above the mean (:func:`fastv_analysis.probes.sparsevlm_raters`), chosen once;
* rating: layer K-1's head-mean attention rows of the raters, averaged over them
  (``inputs["attention_raters"]``, the head mean taken here);
* keep the top-rated tokens; recycle the top 30 % (+1) of the pruned by rating: DPC-KNN
  (``int(m / 10) + 1`` clusters, k = that count) on their layer K-1 outputs
  (``inputs["hidden_out"]``), each cluster one merged token = sum / (count + 1e-6).

Differences, stated: ``keep`` is the *total* token budget (kept + merged, so methods compare
at equal counts; the authors add the merged tokens on top of their 300/200/110): the largest
top-rated count k with ``k + clusters(k) <= keep`` (reached exactly, see
:func:`recycle_split`); a keep below the smallest cluster count recycles nothing. The authors'
``torch.rand * 1e-6`` density noise is left out: equal densities are ordered by token index
instead (the lower index counts as denser), so the plan is deterministic. A merged token
sits at its cluster centre's slot in the image span (the authors append the merged tokens
after the kept ones); the positions policy is the authors' (compact: renumbered).
"""

from __future__ import annotations

import torch

from ..strategies import Merge, _Ctx, _Result, rank, register

RECYCLE_SHARE = 0.3  # int(pruned * 0.3) + 1 tokens recycled (the authors' "Top 30%")
CLUSTER_DIVISOR = 10  # int(recycled / 10) + 1 clusters


def recycled_count(pruned: int) -> int:
    """How many of ``pruned`` tokens the authors recycle (0 when nothing was pruned)."""
    return int(pruned * RECYCLE_SHARE) + 1 if pruned > 0 else 0


def cluster_count(recycled: int) -> int:
    """How many merged tokens ``recycled`` tokens make (0 for none)."""
    return int(recycled / CLUSTER_DIVISOR) + 1 if recycled > 0 else 0


def recycle_split(n: int, keep: int, recycle: bool = True) -> tuple[int, int]:
    """``(k, c)``: the top-rated tokens kept and the merged tokens, ``k + c == keep``.

    k + clusters(k) grows by 0 or 1 per step of k, so the largest k with ``k + c(k) <= keep``
    meets keep exactly; keep >= N prunes nothing; a keep below c(0) (or ``recycle`` off):
    ``(keep, 0)``, a pure drop."""
    if keep >= n:
        return n, 0
    if recycle:
        for k in range(keep, -1, -1):
            c = cluster_count(recycled_count(n - k))
            if k + c <= keep:
                return k, c
    return keep, 0


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centres [S, c], cluster [S, m])`` DPC-KNN of the rows of ``x`` ``[S, m, D]`` as the
    authors' ``cluster_and_merge``: distance = L2 / sqrt(D); density = exp(-mean squared
    distance to the ``clusters`` nearest rows, itself included); each row's parent distance
    = the smallest distance to a denser row (the largest distance of the sample where none);
    centres = the ``clusters`` largest ``distance x density`` (ties: lower index); each row
    joins its nearest centre (first on ties), a centre its own cluster. Equal densities: the
    lower index counts as denser (the authors add ``torch.rand * 1e-6`` instead)."""
    s, m, d = x.shape
    dist = torch.cdist(x.float(), x.float(), compute_mode="donot_use_mm_for_euclid_dist") / d ** 0.5  # [S, m, m]
    density = (-(dist.sort(dim=-1).values[..., :clusters] ** 2).mean(dim=-1)).exp()  # [S, m]
    idx = torch.arange(m, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | \
        ((density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None])[None])  # [S, i, j]: j denser
    far = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = torch.where(denser, dist, far).min(dim=-1).values
    centres = rank(parent * density)[:, :clusters]  # [S, c]
    cluster = dist.gather(1, centres[:, :, None].expand(-1, -1, m)).argmin(dim=1)  # [S, m]
    cluster.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(s, -1))
    return centres, cluster


def sparsevlm_plan(rating: torch.Tensor, hidden: torch.Tensor, keep: int,
                   recycle: bool = True) -> tuple[torch.Tensor, Merge | None]:
    """``(indices [..., keep] ascending, Merge | None)``: SparseVLM's cut (see the module
    docstring) from the rating ``[..., N]`` and the image tokens' layer K-1 outputs
    ``[..., N, D]``. The slots are anchored at the kept tokens and the cluster centres; a
    kept token fills its own slot (weight 1), a recycled token its centre's slot (weight
    1 / (cluster size + 1e-6), the authors' mean); the other pruned tokens are dropped."""
    batch_shape, n = rating.shape[:-1], rating.shape[-1]
    r = rating.reshape(-1, n).float()
    count = r.shape[0]
    k, c = recycle_split(n, keep, recycle)
    order = rank(r)  # descending rating, ties to the lower index (the authors' topk)
    kept = order[:, :k]
    if c == 0:
        return kept.sort(dim=-1).values.reshape(*batch_shape, k), None
    pruned = order[:, k:].sort(dim=-1).values  # ascending, as the authors' torch.where
    top = rank(r.gather(1, pruned))[:, :recycled_count(n - k)]  # into pruned, in rating order
    recycled = pruned.gather(1, top)  # [S, m] image-token indices
    x = hidden.reshape(count, n, hidden.shape[-1]).float()
    centres, cluster = dpc_knn(x.gather(1, recycled[..., None].expand(-1, -1, x.shape[-1])), c)
    anchors = torch.cat([kept, recycled.gather(1, centres)], dim=1)
    indices = anchors.sort(dim=-1).values
    slot_of = torch.full((count, n), -1, dtype=torch.long, device=r.device)
    slot_of.scatter_(1, indices, torch.arange(keep, device=r.device).expand(count, -1))
    assign = torch.full((count, n), -1, dtype=torch.long, device=r.device)
    weight = torch.zeros(count, n, device=r.device)
    assign.scatter_(1, kept, slot_of.gather(1, kept))
    weight.scatter_(1, kept, 1.0)
    sizes = torch.zeros(count, c, device=r.device).scatter_add_(1, cluster, torch.ones_like(cluster, dtype=torch.float))
    assign.scatter_(1, recycled, slot_of.gather(1, recycled.gather(1, centres).gather(1, cluster)))
    weight.scatter_(1, recycled, 1.0 / (sizes.gather(1, cluster) + 1e-6))
    merge = Merge(assign.reshape(*batch_shape, n), weight.reshape(*batch_shape, n))
    return indices.reshape(*batch_shape, keep), merge


@register("sparsevlm", "set", params={"recycle": True}, needs=("attention_raters", "hidden_out"), where="llm",
          positions="compact", merges=True,
          doc="SparseVLM v1.0 (LLM layers; authors' first cut at layer 2 = K 3): text raters chosen at layer 0 rate the "
              "image tokens by layer K-1 attention; the top 30 % of the pruned recycled by DPC-KNN into merged tokens "
              "(keep counts them); positions: compact, as the authors' code.")
def _sparsevlm(ctx: _Ctx, keep: int | None, *, recycle: bool) -> _Result:
    """:func:`sparsevlm_plan`; scores are the raters' head-mean attention (the rating)."""
    if keep is None:
        raise ValueError("'sparsevlm' has no keep-independent score; use select")
    if not isinstance(recycle, bool):
        raise ValueError(f"sparsevlm: recycle must be true or false, got {recycle!r}")
    rating = ctx.inputs["attention_raters"].mean(dim=-2)
    indices, merge = sparsevlm_plan(rating, ctx.inputs["hidden_out"], keep, recycle)
    device = ctx.attention.device
    if merge is not None:
        merge = Merge(merge.assign.to(device), merge.weight.to(device))
    return _Result(rating.to(device), indices=indices.to(device), merge=merge)
