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

from collections.abc import Sequence


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
