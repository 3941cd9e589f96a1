"""Token-selection strategies for FastV-style pruning, as pure functions on tensors.

Everything here works on ``A`` = the attention that the last prompt token paid to each
image token at layer K-1, per head: a float tensor ``[..., H, N]`` (any leading batch
shape). A strategy turns ``A`` into a score per image token and keeps the top ``keep``.

Ranking is deterministic: a stable descending sort, so ties go to the lower image-token
index. Each score vector is ranked once (:func:`rank`); every keep count is then a prefix
of that ranking (:func:`top_k`), which is what lets :mod:`fastv_analysis.select` replay
a whole keep grid for the price of one sort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ATTENTION_METHODS = ("avg_all_heads", "max_head", "weighted_combination")
"""The methods that rank by the layer K-1 attention."""

CONTROL_METHODS = ("random", "uniform")
"""Controls that ignore attention: the only methods at K = 0, where nothing is ranked."""

METHODS = ATTENTION_METHODS + CONTROL_METHODS
"""All selection methods; every other method list in the package derives from these."""


@dataclass(frozen=True)
class Selection:
    """What a strategy chose, with the metadata the reference implementation reported.

    indices:         LongTensor ``[..., keep]``, kept image-token indices, ascending.
    scores:          ``[..., N]``, the score vector that was ranked.
    max_head:        LongTensor ``[...]``, argmax over heads of the summed image attention
                     (reported for every method, so head statistics never depend on it).
    head_importance: ``[..., H]``, summed attention each head paid to the image.
    method, alpha:   the strategy; ``alpha`` is None except for weighted_combination.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    max_head: torch.Tensor
    head_importance: torch.Tensor
    method: str
    alpha: float | None

    def metadata(self) -> dict:
        """The reference implementation's ``last_selection_metadata`` dict."""
        return {
            "method": self.method,
            "alpha": self.alpha,
            "max_head_idx": self.max_head,
            "head_importance": self.head_importance,
            "kept_indices": self.indices,
        }


def validate(attention: torch.Tensor, method: str, keep: int | None = None, alpha: float = 0.5) -> None:
    """Raise a one-line ValueError naming the bad argument; shared by select and replay."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if not isinstance(attention, torch.Tensor) or attention.dim() < 2:
        shape = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise ValueError(f"attention must be a tensor of shape [..., H, N], got {shape}")
    if not attention.is_floating_point():
        raise ValueError(f"attention must be floating point, got {attention.dtype}")
    if attention.shape[-2] < 1:
        raise ValueError("attention has no heads (H = 0)")
    if not torch.isfinite(attention).all():
        raise ValueError("attention contains NaN or infinite values")
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    n = attention.shape[-1]
    if keep is not None and not (isinstance(keep, int) and 0 <= keep <= n):
        raise ValueError(f"keep must be an integer in 0..{n} (the number of image tokens), got {keep!r}")


def head_importance(attention: torch.Tensor) -> torch.Tensor:
    """``[..., H]``: total attention each head paid to the image tokens."""
    return attention.sum(dim=-1)


def max_head_index(importance: torch.Tensor) -> torch.Tensor:
    """``[...]``: the head with the largest importance; ties go to the lower head index."""
    return importance.argmax(dim=-1)


def _gather_head(attention: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    index = head[..., None, None].expand(*head.shape, 1, attention.shape[-1])
    return attention.gather(-2, index).squeeze(-2)


def attention_scores(attention: torch.Tensor, method: str, alpha: float = 0.5) -> torch.Tensor:
    """``[..., N]`` score per image token for one of the attention-based methods.

    weighted_combination = alpha * A[h*] + (1 - alpha) * mean of the other heads. At
    alpha = 1/H that is exactly the mean over all heads; a float alpha cannot hold 1/H
    exactly, so alpha within 1e-9 of 1/H is scored as the mean itself and ranks
    bit-identically to avg_all_heads. With H = 1 the other-heads term is zero.
    """
    n_heads = attention.shape[-2]
    if method == "avg_all_heads":
        return attention.mean(dim=-2)
    top = _gather_head(attention, max_head_index(head_importance(attention)))
    if method == "max_head":
        return top
    if method != "weighted_combination":
        raise ValueError(f"{method!r} is not an attention-based method")
    if math.isclose(alpha * n_heads, 1.0, rel_tol=0.0, abs_tol=1e-9):
        return attention.mean(dim=-2)
    if n_heads == 1:
        return alpha * top
    others = (attention.sum(dim=-2) - top) / (n_heads - 1)
    return alpha * top + (1.0 - alpha) * others


def random_keys(seed: int, sample_keys: Sequence[int], n_tokens: int) -> torch.Tensor:
    """``[S, N]`` float64 random ranking keys, one independent stream per (seed, sample key).

    The random control must be drawn per sample: one subset reused for every sample
    measures that subset, not random selection. Keying by the sample (not its batch
    position or chunk) makes the draw identical online (:mod:`fastv_analysis.pruning`),
    in the select stage and in any batch, so all of them keep the same random set.
    """
    keys = [int(k) for k in sample_keys]
    if any(k < 0 for k in keys) or int(seed) < 0:
        raise ValueError("seed and sample keys of the random control must be non-negative integers")
    if not keys:
        return torch.zeros(0, n_tokens, dtype=torch.float64)
    return torch.from_numpy(np.stack([np.random.default_rng([int(seed), k]).random(n_tokens) for k in keys]))


def uniform_indices(n_tokens: int, keep: int) -> torch.Tensor:
    """``[keep]`` image-token indices spread evenly over the image grid (ascending).

    On a square grid (576 = 24 x 24) the kept tokens form an r x c lattice of cell
    centres, r = ceil(sqrt(keep)), c = ceil(keep / r), with any surplus points left out
    evenly along the raster order; otherwise an even stride over the raster order. The spatial baseline that attention ranking is compared with.
    """
    if keep == 0:
        return torch.zeros(0, dtype=torch.long)
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        return torch.floor((torch.arange(keep) + 0.5) * n_tokens / keep).long()
    rows_n = math.ceil(math.sqrt(keep))
    cols_n = math.ceil(keep / rows_n)
    rows = torch.floor((torch.arange(rows_n) + 0.5) * side / rows_n).long()
    cols = torch.floor((torch.arange(cols_n) + 0.5) * side / cols_n).long()
    lattice = (rows[:, None] * side + cols[None, :]).flatten()
    # r * c >= keep: leave out the surplus lattice points evenly, not all at the end
    chosen = torch.floor((torch.arange(keep) + 0.5) * lattice.numel() / keep).long()
    return lattice[chosen].sort().values


def rank(scores: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` image-token indices from best to worst; ties go to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def top_k(order: torch.Tensor, keep: int) -> torch.Tensor:
    """The first ``keep`` entries of a ranking, returned ascending (``[..., keep]``)."""
    return order[..., :keep].sort(dim=-1).values


def method_scores(
    attention: torch.Tensor, method: str, alpha: float = 0.5, seed: int = 0, sample_keys: Sequence[int] | None = None
) -> torch.Tensor:
    """Score vector ``[..., N]`` for a ranking method (``uniform`` is a set, see uniform_indices).

    ``random`` draws :func:`random_keys` for ``sample_keys`` (one per leading element, by
    default their flat positions 0..S-1, as :func:`fastv_analysis.select.replay` does
    without sample ids); its scores are float64 keys, never rounded to attention's dtype.
    """
    if method in ATTENTION_METHODS:
        return attention_scores(attention, method, alpha)
    if method == "random":
        batch_shape, n_tokens = attention.shape[:-2], attention.shape[-1]
        count = math.prod(batch_shape)
        keys = range(count) if sample_keys is None else list(sample_keys)
        if len(keys) != count:
            raise ValueError(f"random needs one sample key per element: got {len(keys)} for {count}")
        return random_keys(seed, keys, n_tokens).reshape(*batch_shape, n_tokens)
    raise ValueError(f"{method!r} has no keep-independent score; use uniform_indices")


def select(
    attention: torch.Tensor,
    method: str = "avg_all_heads",
    keep: int = 288,
    alpha: float = 0.5,
    *,
    seed: int = 0,
    sample_keys: Sequence[int] | None = None,
) -> Selection:
    """Choose ``keep`` of the N image tokens for every leading batch element.

    attention: ``[..., H, N]`` last-prompt-token attention at layer K-1, per head.
    method:    avg_all_heads (original FastV) | max_head | weighted_combination |
               random (per sample: ``seed`` and ``sample_keys``, see :func:`random_keys`) |
               uniform (even spread over the grid).
    keep:      number of image tokens to keep, 0..N.
    alpha:     weight of the max head in weighted_combination, in [0, 1].
    """
    validate(attention, method, keep, alpha)
    importance = head_importance(attention)
    top_head = max_head_index(importance)
    batch_shape = attention.shape[:-2]
    n_tokens = attention.shape[-1]
    if method == "uniform":
        lattice = uniform_indices(n_tokens, keep).to(attention.device)
        scores = torch.zeros(batch_shape + (n_tokens,), dtype=attention.dtype, device=attention.device)
        scores[..., lattice] = 1.0
        indices = lattice.expand(*batch_shape, keep).clone()
    else:
        scores = method_scores(attention, method, alpha, seed, sample_keys).to(attention.device)
        indices = top_k(rank(scores), keep)
    return Selection(
        indices=indices,
        scores=scores,
        max_head=top_head,
        head_importance=importance,
        method=method,
        alpha=float(alpha) if method == "weighted_combination" else None,
    )
