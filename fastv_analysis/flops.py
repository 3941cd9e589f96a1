"""Theoretical prefill cost of FastV pruning, by FastV's own formula.

FastV (Chen et al., 2024) counts one decoder layer over n tokens as
``4 n d^2 + 2 n^2 d + 2 n d m`` (d hidden size, m MLP size): the attention projections,
the attention itself and the MLP. Layers before K see all n tokens, layers from K on
see n-hat = n - (N - keep). Every FastV comparison reports this ratio next to accuracy.
"""

from __future__ import annotations


def layer_flops(n_tokens: int, hidden: int, intermediate: int) -> int:
    """FLOPs of one decoder layer over ``n_tokens`` tokens: 4nd^2 + 2n^2d + 2ndm."""
    n, d, m = n_tokens, hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(
    n_tokens: int, n_kept: int, num_layers: int, agg_layer: int, hidden: int, intermediate: int
) -> int:
    """Prefill FLOPs with ``agg_layer`` layers at ``n_tokens`` and the rest at ``n_kept``."""
    if not 0 <= agg_layer <= num_layers:
        raise ValueError(f"agg_layer must be in 0..{num_layers}, got {agg_layer}")
    return agg_layer * layer_flops(n_tokens, hidden, intermediate) + (num_layers - agg_layer) * layer_flops(
        n_kept, hidden, intermediate
    )


def flops_ratio(
    n_tokens: int, n_image: int, keep: int, num_layers: int, agg_layer: int, hidden: int, intermediate: int
) -> float:
    """Pruned / full prefill FLOPs for keeping ``keep`` of ``n_image`` image tokens."""
    n_kept = n_tokens - n_image + keep
    full = prefill_flops(n_tokens, n_tokens, num_layers, 0, hidden, intermediate)
    return prefill_flops(n_tokens, n_kept, num_layers, agg_layer, hidden, intermediate) / full


def equivalent_image_tokens(n_image: int, keep: int, num_layers: int, agg_layer: int) -> float:
    """Image tokens averaged over all layers (how pruned the model is, in tokens)."""
    return (agg_layer * n_image + (num_layers - agg_layer) * keep) / num_layers
