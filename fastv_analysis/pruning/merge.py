"""Merge reductions in drop mode: the reduced sequence's image slots are weighted means of groups
of image tokens (:class:`~fastv_analysis.strategies.Merge`), placed at their anchor tokens.

A merge is applied where a drop gathers: at layer K the hidden states entering it, at K = 0
the decoder's input embeddings. The kept sequence is first gathered as for a drop (text
tokens and the anchors ``indices[j]``), then each anchor's row is replaced by
:func:`~fastv_analysis.strategies.merge_tokens` of the full image span, so slot j holds
``sum(weight[t] * x[t] for assign[t] == j)`` at the position of its anchor. Layers after the
cut and the decoding steps see only these rows (the cache holds the slots).
"""

from __future__ import annotations

import torch

from ..positions import take_positions
from ..strategies import Merge, merge_tokens


def check_merge(merge: Merge, kept_image: torch.Tensor, n_image: int) -> Merge:
    """``merge`` as ``[B, N]`` tensors matching ``kept_image`` ``[B, k]``; one-line ValueError otherwise."""
    assign = torch.as_tensor(merge.assign, dtype=torch.long, device=kept_image.device)
    weight = torch.as_tensor(merge.weight, device=kept_image.device)
    assign = assign.unsqueeze(0) if assign.dim() == 1 else assign
    weight = weight.unsqueeze(0) if weight.dim() == 1 else weight
    keep = kept_image.shape[-1]
    if assign.shape != weight.shape or assign.dim() != 2 or assign.shape[1] != n_image:
        raise ValueError(f"merge plan: assign and weight must both be [B, N] with N = {n_image} image tokens, "
                         f"got {tuple(assign.shape)} and {tuple(weight.shape)}")
    if assign.shape[0] not in (1, kept_image.shape[0]):
        raise ValueError(f"merge plan has {assign.shape[0]} rows for {kept_image.shape[0]} kept sets")
    if assign.numel() and (assign.min() < -1 or assign.max() >= keep):
        raise ValueError(f"merge plan: assign must be a slot in 0..{keep - 1} or -1 (dropped)")
    if not weight.is_floating_point() or not bool(torch.isfinite(weight).all()):
        raise ValueError("merge plan: weight must be finite floating point")
    return Merge(assign.expand(kept_image.shape[0], -1), weight.expand(kept_image.shape[0], -1))


def anchor_slots(kept_positions: torch.Tensor, image_pos: torch.Tensor, kept_image: torch.Tensor) -> torch.Tensor:
    """``[B, k]``: where each anchor (slot j's token ``kept_image[:, j]``) sits in ``kept_positions``."""
    batch = kept_positions.shape[0]
    anchors = image_pos.expand(batch, -1).gather(1, kept_image.expand(batch, -1))
    return torch.searchsorted(kept_positions.contiguous(), anchors.contiguous())


def reduce_sequence(x: torch.Tensor, kept_positions: torch.Tensor, image_pos: torch.Tensor,
                    kept_image: torch.Tensor, merge: Merge | None) -> torch.Tensor:
    """``[B, M, D]``: the full-length sequence ``x`` ``[B or 1, S, D]`` reduced to ``kept_positions``,
    the anchors' rows holding the merged slots (a plain gather when ``merge`` is None)."""
    out = take_positions(x, kept_positions, dim=1)
    if merge is None:
        return out
    batch = out.shape[0]
    image = take_positions(x, image_pos.expand(batch, -1), dim=1)  # [B, N, D]
    slots = merge_tokens(image, kept_image.expand(batch, -1), merge)  # [B, k, D]
    at = anchor_slots(kept_positions, image_pos, kept_image)
    return out.scatter(1, at[..., None].expand(-1, -1, out.shape[-1]), slots)
