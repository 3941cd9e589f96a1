"""Indexing along the sequence, per batch element: the one primitive every hook uses.

Pure functions on tensors, shared by the adapters (which know where a model keeps its
sequence dims) and by :mod:`fastv_analysis.attention` / :mod:`fastv_analysis.pruning`.
"""

from __future__ import annotations

import torch


def take_positions(x: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Select sequence ``positions`` ``[B, M]`` of ``x`` along ``dim``, per batch element.

    ``x`` has the batch in dim 0; a batch of 1 on either side is broadcast, which is how a
    single prompt is fanned out to several kept sets (shared-prefix batching).
    """
    dim = dim % x.dim()
    batch = max(x.shape[0], positions.shape[0])
    x = x.expand(batch, *x.shape[1:])
    positions = positions.to(x.device).expand(batch, positions.shape[-1])
    view = [batch] + [1] * (x.dim() - 1)
    view[dim] = positions.shape[-1]
    size = list(x.shape)
    size[dim] = positions.shape[-1]
    return x.gather(dim, positions.view(view).expand(size))


def additive_mask_rows(
    attention_mask: torch.Tensor | None, query_positions: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Float32 additive mask ``[B, 1, Q, S]`` for the given query rows.

    The decoder hands attention a 4D mask that is None (plain causal; SDPA's is_causal),
    boolean (True = attend; SDPA) or additive float (0 / dtype min; eager). All three
    become one additive float32 mask, masked entries at float32 min as eager has them.
    """
    lowest = torch.finfo(torch.float32).min
    if attention_mask is None:
        keys = torch.arange(seq_len, device=query_positions.device)
        allowed = (keys[None, None, None, :] <= query_positions[:, None, :, None])
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, lowest)
    rows = take_positions(attention_mask[..., :seq_len], query_positions, dim=2)
    if rows.dtype == torch.bool:
        return torch.zeros(rows.shape, dtype=torch.float32, device=rows.device).masked_fill(~rows, lowest)
    return rows.to(torch.float32)
