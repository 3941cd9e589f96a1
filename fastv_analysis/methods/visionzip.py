"""VisionZip (Yang et al., CVPR'25): dominant tokens by the vision tower's attention, the rest
merged into a few contextual tokens by key similarity.

Authors' code: dvlab-research/VisionZip@3151f6d (``visionzip/clip_encoder.py``; fidelity:
tests/test_vision_methods.py). Qwen2.5-VL as LightCompress does it (ModelTC/LightCompress@9701d03,
``token_reduction/visionzip.py``): mean attention received at the last vision block, keys
after RoPE, both averaged over the 2 x 2 patches of each LLM token.
"""

from __future__ import annotations

import torch

from ..positions import take_positions
from ..strategies import Merge, _Ctx, _Result, register

CONTEXTUAL_SHARE = (10, 64)
"""The authors' split: contextual = keep * 10 // 64 (64 -> 10, 128 -> 20, 192 -> 30)."""


def contextual_count(keep: int) -> int:
    """How many of ``keep`` tokens are contextual (merged) at the authors' share."""
    return keep * CONTEXTUAL_SHARE[0] // CONTEXTUAL_SHARE[1]


def visionzip_plan(attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
                   ) -> tuple[torch.Tensor, Merge]:
    """``(indices [S, keep], Merge)``: VisionZip's kept set and merge groups over N image tokens.

    attention ``[S, N]``: each token's attention score (CLS row, or mean received); keys
    ``[S, N, d]``: head-averaged keys. Dominant = the ``dominant`` top-attention tokens
    (``torch.topk``, as the authors). Leftovers = the other tokens, ascending; targets =
    leftovers ``0, step, 2 step, ...`` (step = max(1, L // contextual), the first
    ``contextual``); every other leftover joins the target whose unit key has the largest dot
    product with its own (first on ties). A contextual slot = target + mean(its members): weight
    1 for the target, 1 / count for each member. ``contextual`` is capped at the leftovers.
    """
    s, n = attention.shape
    dominant = min(dominant, n)
    dom = attention.topk(dominant, dim=-1).indices if dominant else attention.new_zeros(s, 0, dtype=torch.long)
    rest_mask = torch.ones(s, n, dtype=torch.bool, device=attention.device)
    rest_mask.scatter_(1, dom, False)
    left = rest_mask.nonzero()[:, 1].view(s, n - dominant)  # ascending leftovers
    contextual = min(contextual, n - dominant)
    assign = torch.full((s, n), -1, dtype=torch.long, device=attention.device)
    weight = torch.zeros(s, n, dtype=torch.float32, device=attention.device)
    anchors = dom
    if contextual:
        step = max(1, left.shape[1] // contextual)
        pick = torch.arange(0, left.shape[1], step, device=attention.device)[:contextual]
        targets = left[:, pick]  # [S, C]
        is_target = torch.zeros(left.shape[1], dtype=torch.bool, device=attention.device)
        is_target[pick] = True
        members = left[:, ~is_target]  # [S, L - C]
        k = keys.to(torch.promote_types(keys.dtype, torch.float32))
        unit = k / k.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # zero rows (LLaVA-NeXT newlines): cosine 0
        sim = torch.bmm(take_positions(unit, members, dim=1), take_positions(unit, targets, dim=1).transpose(1, 2))
        group = sim.argmax(dim=2)  # [S, L - C]: which target
        counts = torch.zeros(s, contextual, device=attention.device).scatter_add_(
            1, group, torch.ones_like(group, dtype=torch.float32)).clamp(min=1)
        anchors = torch.cat([dom, targets], dim=1)
        weight.scatter_(1, members, 1.0 / counts.gather(1, group))
        assign.scatter_(1, members, targets.gather(1, group))  # anchor token for now, slot below
    indices = anchors.sort(dim=1).values
    weight.scatter_(1, anchors, 1.0)
    assign.scatter_(1, anchors, anchors)
    slot = torch.searchsorted(indices, assign.clamp(min=0))
    assign = torch.where(assign >= 0, slot, assign)
    return indices, Merge(assign, weight)


@register("visionzip", "set", params={"contextual": None}, needs=("vision_attention", "vision_keys"),
          where="vision", positions="compact", merges=True,
          doc="VisionZip (vision tower): dominant tokens by CLS attention (LLaVA-NeXT: per tile, newline tokens 0; "
              "towers without CLS, e.g. Qwen2.5-VL: mean attention received at the last block, per 2x2-merged token, "
              "as LightCompress), the rest merged into keep*10//64 contextual tokens "
              "by key cosine (targets: every step-th leftover in token order, no grid needed); no CLS slot in the LLM, "
              "so dominant = keep - contextual patch tokens; merged after the projector; other towers (OneVision, "
              "InternVL, ...): a one-line error; positions: the authors' code renumbers (compact).")
def _visionzip(ctx: _Ctx, keep: int | None, *, contextual: int | None) -> _Result:
    """:func:`visionzip_plan` with ``keep - c`` dominant and ``c`` contextual tokens, c =
    ``contextual`` or the authors' share :func:`contextual_count`. The authors' 64 is CLS +
    53 patches + 10 contextual; HF LLaVA drops CLS before the projector, so its slot goes to one
    more dominant patch (54 + 10). The authors merge pre-projector features (contextual =
    target + mean of its group); here the same groups and weights apply to the post-projector
    embeddings, which differs by the projector's non-linearity. Scores: the attention."""
    if keep is None:
        raise ValueError("'visionzip' has no keep-independent score; use select")
    c = contextual_count(keep) if contextual is None else contextual
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= keep:
        raise ValueError(f"visionzip: contextual must be an int in 0..keep ({keep}), got {contextual!r}")
    attn, keys = ctx.inputs["vision_attention"], ctx.inputs["vision_keys"]
    batch, n = attn.shape[:-1], attn.shape[-1]
    idx, merge = visionzip_plan(attn.reshape(-1, n).float(), keys.reshape(-1, n, keys.shape[-1]), keep - c, c)
    device = ctx.attention.device
    merge = Merge(merge.assign.reshape(*batch, n).to(device), merge.weight.reshape(*batch, n).to(device))
    return _Result(attn.to(device), indices=idx.reshape(*batch, keep).to(device), merge=merge)
