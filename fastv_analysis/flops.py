"""Theoretical prefill cost of FastV pruning, by FastV's own formula and the 3-matrix variant.

FastV (Chen et al., 2024) counts one decoder layer over n tokens as
``4 n d^2 + 2 n^2 d + 2 n d m`` (d hidden size, m MLP size): the attention projections,
the attention itself and the MLP. Layers before K see all n tokens, layers from K on
see n-hat = n - (N - keep). Later work on gated (SwiGLU) decoders — LLaVA's Llama/Vicuna
among them — counts the MLP's three matrices, ``4 n d^2 + 2 n^2 d + 3 n d m``
(``mlp_matrices=3``); both are reported, since papers quote either. A schedule prunes
in stages: each cut's layers run at that cut's token count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


def layer_flops(n_tokens: int, hidden: int, intermediate: int, mlp_matrices: int = 2) -> int:
    """FLOPs of one decoder layer over ``n_tokens`` tokens: 4nd^2 + 2n^2d + (2 or 3)ndm."""
    n, d, m = n_tokens, hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + mlp_matrices * n * d * m


def schedule_flops(n_tokens: int, cuts: Sequence[tuple[int, int]], num_layers: int, hidden: int,
                   intermediate: int, mlp_matrices: int = 2) -> int:
    """Prefill FLOPs when ``cuts`` = [(K_1, n_1), (K_2, n_2), ...]: layers before K_1 run at
    ``n_tokens``, layers K_i .. K_(i+1)-1 at n_i tokens."""
    bounds = [0] + [k for k, _ in cuts] + [num_layers]
    counts = [n_tokens] + [n for _, n in cuts]
    if any(b > c for b, c in zip(bounds, bounds[1:])) or bounds[-2] > num_layers:
        raise ValueError(f"cut layers must rise within 0..{num_layers}, got {[k for k, _ in cuts]}")
    return sum((end - start) * layer_flops(n, hidden, intermediate, mlp_matrices)
               for start, end, n in zip(bounds, bounds[1:], counts))


def prefill_flops(
    n_tokens: int, n_kept: int, num_layers: int, agg_layer: int, hidden: int, intermediate: int,
    mlp_matrices: int = 2,
) -> int:
    """Prefill FLOPs with ``agg_layer`` layers at ``n_tokens`` and the rest at ``n_kept``."""
    if not 0 <= agg_layer <= num_layers:
        raise ValueError(f"agg_layer must be in 0..{num_layers}, got {agg_layer}")
    return schedule_flops(n_tokens, [(agg_layer, n_kept)], num_layers, hidden, intermediate, mlp_matrices)


def flops_ratio(
    n_tokens: int, n_image: int, keep: int, num_layers: int, agg_layer: int, hidden: int, intermediate: int,
    stages: Sequence[tuple[int, int]] = (), mlp_matrices: int = 2,
) -> float:
    """Pruned / full prefill FLOPs for keeping ``keep`` of ``n_image`` image tokens from
    ``agg_layer`` on, then ``stages`` = [(K, keep), ...] of a schedule."""
    cuts = [(agg_layer, n_tokens - n_image + keep)] + [(k, n_tokens - n_image + kp) for k, kp in stages]
    full = schedule_flops(n_tokens, [], num_layers, hidden, intermediate, mlp_matrices)
    return schedule_flops(n_tokens, cuts, num_layers, hidden, intermediate, mlp_matrices) / full


def equivalent_image_tokens(n_image: int, keep: int, num_layers: int, agg_layer: int,
                            stages: Sequence[tuple[int, int]] = ()) -> float:
    """Image tokens averaged over all layers (how pruned the model is, in tokens)."""
    bounds = [0, agg_layer] + [k for k, _ in stages] + [num_layers]
    counts = [n_image, keep] + [kp for _, kp in stages]
    return sum((end - start) * n for start, end, n in zip(bounds, bounds[1:], counts)) / num_layers


# ----------------------------------------------------------------------------- a method's own cost

@dataclass(frozen=True)
class CostShape:
    """The sizes a method's own cost depends on (one sample, one cut).

    n: image tokens entering the cut (N); keep: tokens (or merged slots) it keeps;
    hidden: the LLM width d; heads: LLM attention heads H; text: prompt tokens after the
    image (the instruction, T); prompt: all prompt tokens (S); vision_hidden /
    vision_tokens: the vision tower's width and patch count at the layer a vision-side
    method reads (None when unknown: those methods are then not counted); params: the
    configuration's parameters (query, pivot counts, ...), registry defaults filled in.
    """

    n: int
    keep: int
    hidden: int
    heads: int
    text: int = 0
    prompt: int = 0
    vision_hidden: int | None = None
    vision_tokens: int | None = None
    params: Mapping[str, object] = field(default_factory=dict)


def _query_rows(c: CostShape) -> int:
    """How many query rows an attention ranking averages (FastV's last token: 1)."""
    return {"text_mean": c.text, "all_mean": c.prompt}.get(str(c.params.get("query", "last")), 1)


def _rows_mean(c: CostShape) -> int:
    """Reducing the ranked attention rows ``[H, Q, N]`` to a score: H * Q * N (the rows
    themselves are layer K-1's attention, already in the model's ``2 n^2 d``)."""
    return c.heads * _query_rows(c) * c.n


def _base(c: CostShape) -> int:
    """A strategy's base ranking (``base`` parameter, default avg_all_heads)."""
    return method_cost(str(c.params.get("base", "avg_all_heads")), c)[0] or 0


def _vision(c: CostShape, extra: int) -> int | None:
    """A vision-side method: the CLS / mean-received attention row at its ViT layer
    (``vision_tokens * vision_hidden``, recomputed from q and k) + ``extra``; None when
    the vision tower's size is unknown."""
    if c.vision_hidden is None:
        return None
    return (c.vision_tokens or c.n) * c.vision_hidden + extra


METHOD_COSTS: dict[str, tuple[str, Callable[[CostShape], int | None]]] = {
    "avg_all_heads": ("H Q N (head mean of the ranked rows)", _rows_mean),
    "max_head": ("H Q N", _rows_mean),
    "weighted_combination": ("H Q N", _rows_mean),
    "dynamic_alpha": ("H Q N", _rows_mean),
    "random": ("0 (a seeded draw)", lambda c: 0),
    "uniform": ("0 (a fixed lattice)", lambda c: 0),
    "no_rope": ("N d + H N (the row's q.k without RoPE)", lambda c: c.n * c.hidden + c.heads * c.n),
    "sink_excluded": ("N d (input norms) + base", lambda c: c.n * c.hidden + _base(c)),
    "diverse": ("64 N d (sketch) + 64 N keep (greedy) + base",
                lambda c: 64 * c.n * c.hidden + 64 * c.n * c.keep + _base(c)),
    "hybrid_uniform": ("base", _base),
    "divprune": ("N^2 d (pairwise cosine) + N d (norms) + N keep (max-min updates)",
                 lambda c: c.n * c.n * c.hidden + c.n * c.hidden + c.n * c.keep),
    "dart": ("(P + 2) N d + T d: key L1 norms, final norm, cosine to P = pivot_image + pivot_text pivots",
             lambda c: (int(c.params.get("pivot_image", 4)) + int(c.params.get("pivot_text", 4)) + 2) * c.n * c.hidden
             + c.text * c.hidden),
    "cdpruner": ("N^2 d (kernel) + N T d (relevance) + N keep (keep - 1) / 2 + N keep (greedy MAP)",
                 lambda c: c.n * c.n * c.hidden + c.n * c.text * c.hidden + c.n * c.keep * (c.keep - 1) // 2
                 + c.n * c.keep),
    "pooling": ("N d (group means)", lambda c: c.n * c.hidden),
    "visionzip": ("N_v d_v (CLS row) + (N - keep) keep d_v (key cosine to the targets, a bound) + N d_v (means)",
                  lambda c: _vision(c, (c.n - c.keep) * c.keep * c.vision_hidden + c.n * c.vision_hidden)
                  if c.vision_hidden else None),
    "vispruner": ("N_v d_v (CLS row) + (N - keep)^2 d_v (similarity of the rest, a bound)",
                  lambda c: _vision(c, (c.n - c.keep) ** 2 * c.vision_hidden) if c.vision_hidden else None),
    "sparsevlm": ("T N d (rater choice) + T N d (raters' rows) + (N - keep)^2 d (DPC-KNN on the recycled, a bound)",
                  lambda c: 2 * c.text * c.n * c.hidden + (c.n - c.keep) ** 2 * c.hidden),
}
"""Each strategy's own cost, in multiply-accumulates (FastV's unit: ``4 n d^2`` counts the four
projections' MACs), by registry name: (the formula in words, the function). A name missing
here is *not counted* (:func:`method_cost` returns None), never 0. ``cdpruner``, ``pooling``,
``visionzip``, ``vispruner`` and ``sparsevlm`` are the names the issue-23 methods register
under; a bound is marked as one. Sorting and top-k are not counted for any method."""


def method_cost(name: str, shape: CostShape) -> tuple[int | None, str]:
    """(MACs of strategy ``name``'s own computation for one cut, the formula) — (None,
    "not counted") when the registry name has no formula here or a size it needs is unknown."""
    entry = METHOD_COSTS.get(name)
    if entry is None:
        return None, "not counted"
    text, fn = entry
    value = fn(shape)
    return (None, f"not counted ({text}: a size is unknown)") if value is None else (int(value), text)


def kv_cache_bytes(n_tokens: int, n_image: int, keep: int, num_layers: int, agg_layer: int, kv_heads: int,
                   head_dim: int, dtype_bytes: int, stages: Sequence[tuple[int, int]] = ()) -> int:
    """Bytes of the KV cache after the prefill: per layer 2 (K and V) x its sequence length x
    kv_heads x head_dim x dtype_bytes; layers before ``agg_layer`` hold all ``n_tokens``,
    later ones ``n_tokens - n_image + keep`` (and each ``stages`` cut its own count)."""
    bounds = [0, agg_layer] + [k for k, _ in stages] + [num_layers]
    if any(b > c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"cut layers must rise within 0..{num_layers}, got {bounds[1:-1]}")
    lengths = [n_tokens] + [n_tokens - n_image + kp for kp in [keep] + [kp for _, kp in stages]]
    per_token = 2 * kv_heads * head_dim * dtype_bytes
    return sum((end - start) * length * per_token for start, end, length in zip(bounds, bounds[1:], lengths))
