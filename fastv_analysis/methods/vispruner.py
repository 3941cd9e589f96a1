"""VisPruner (Zhang et al., ICCV'25): important tokens by the vision tower's attention, then
diverse tokens by removing near-duplicates among the rest.

Authors' code: Theia-4869/VisPruner@aefa01a (``llava/model/llava_arch.py``, ``encode_images``;
fidelity: tests/test_vision_methods.py). Qwen2.5-VL as LightCompress does it
(ModelTC/LightCompress@9701d03, ``token_reduction/vispruner.py``).
"""

from __future__ import annotations

import torch

from ..strategies import _Ctx, _Result, register

ROUND_DROP = 8
"""At most this many near-duplicates are removed per round (the authors' ``min(8, ...)``)."""
GRAM_ELEMENTS = 1 << 25
"""Samples are de-duplicated in chunks whose ``[chunk, N, N]`` Gram matrices hold at most this
many entries (128 MiB at float32)."""


def vispruner_keep(attention: torch.Tensor, features: torch.Tensor, keep: int, important_ratio: float = 0.5
                   ) -> torch.Tensor:
    """``[S, keep]`` VisPruner's kept image tokens, ascending.

    Important: the ``int(keep * ratio)`` tokens of largest ``attention`` ``[S, N]`` (the
    authors' ``argsort`` descending); the others, in that order, go through rounds: the list
    is split into even / odd places, each even-place token scored by its largest cosine with
    an odd-place one (``features`` ``[S, N, D]``), the ``r = min(8, R - diverse)`` highest
    dropped, the list re-ordered as surviving even-place (by ascending score) + odd-place,
    until ``keep - important`` remain. An odd leftover count makes the authors' code raise
    IndexError; as LightCompress, one more token is important then (here only while the
    diverse part is not empty, so exactly ``keep`` tokens are kept). A round with fewer even
    places than ``r`` (small N only; the authors' code fails there too) drops them all.
    """
    s, n = attention.shape
    important = int(keep * important_ratio)
    if keep > important and (n - important) % 2:
        important += 1
    diverse = keep - important
    order = attention.argsort(dim=-1, descending=True)
    imp, rest = order[:, :important], order[:, important:]
    x = features.to(torch.promote_types(features.dtype, torch.float32))
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # zero rows (LLaVA-NeXT newlines): cosine 0
    chunk = max(1, GRAM_ELEMENTS // max(n * n, 1))
    rest = torch.cat([_dedup_rounds(unit[i:i + chunk], rest[i:i + chunk], diverse) for i in range(0, s, chunk)]) \
        if s else rest
    kept = torch.cat([imp, rest], dim=1) if diverse > 0 else imp
    return kept.sort(dim=1).values


def _dedup_rounds(unit: torch.Tensor, rest: torch.Tensor, diverse: int) -> torch.Tensor:
    """The authors' rounds on ``rest`` ``[S, R]`` until ``diverse`` remain; the cosines come
    from one Gram matrix per sample instead of a product per round (the same values)."""
    if diverse <= 0:
        return rest
    gram = unit @ unit.transpose(-1, -2)  # [S, N, N]
    samples = torch.arange(gram.shape[0], device=gram.device)[:, None, None]
    while True:
        r_total = rest.shape[1]
        r = min(ROUND_DROP, r_total - diverse, (r_total + 1) // 2)  # the authors fail past the even places
        if r <= 0:
            return rest
        even, odd = rest[:, ::2], rest[:, 1::2]
        score = gram[samples, even[:, :, None], odd[:, None, :]].amax(dim=-1)  # [S, E]: best odd-place match
        distinct = score.argsort(dim=-1, descending=True)[:, r:]
        rest = torch.cat([even.gather(1, distinct), odd], dim=1)


@register("vispruner", "set", params={"important_ratio": 0.5}, needs=("vision_attention", "vision_features"),
          where="vision", positions="compact",
          doc="VisPruner (vision tower): int(keep*0.5) important tokens by CLS attention (LLaVA-NeXT: per tile, "
              "newline tokens 0; towers without CLS, "
              "e.g. Qwen2.5-VL: mean attention received per 2x2-merged token, features = LLM-input embeddings, as "
              "LightCompress), the rest by rounds removing near-duplicates (no grid needed); odd leftovers: one more "
              "important token (LightCompress's fix); other towers (OneVision, InternVL, ...): a one-line error; "
              "positions: the authors' code renumbers (compact).")
def _vispruner(ctx: _Ctx, keep: int | None, *, important_ratio: float) -> _Result:
    """:func:`vispruner_keep` of ``vision_attention`` / ``vision_features``; scores: the attention."""
    if keep is None:
        raise ValueError("'vispruner' has no keep-independent score; use select")
    r = important_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
        raise ValueError(f"vispruner: important_ratio must be in [0, 1], got {important_ratio!r}")
    attn, feats = ctx.inputs["vision_attention"], ctx.inputs["vision_features"]
    batch, n = attn.shape[:-1], attn.shape[-1]
    kept = vispruner_keep(attn.reshape(-1, n).float(), feats.reshape(-1, n, feats.shape[-1]), keep, float(r))
    device = ctx.attention.device
    return _Result(attn.to(device), indices=kept.reshape(*batch, keep).to(device))
