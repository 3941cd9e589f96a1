"""Recomputing a layer's attention rows from its attention module's inputs.

The model keeps its fast kernel (SDPA); a hook hands the module's own inputs here and
softmax(q k^T * scale + mask) is formed for a few query rows only (O(Q*S)). Same
arithmetic as eager attention for a prefill with an empty cache: the model's own RoPE and
repeat_kv, its scaling, the mask, softmax in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..positions import additive_mask_rows, take_positions


def llama_attention_rows(adapter, module: nn.Module, call, query_positions: torch.Tensor,
                         rope: bool = True) -> torch.Tensor:
    """``[B, H, Q, S]`` float32 attention probabilities of query rows ``[B, Q]``.

    ``rope=False`` leaves the rotary embedding out of q and k (FEATHER's diagnosis of
    FastV's positional bias: how would the same query rank the image without positions?).

    Llama-family attention (Llama, Mistral, Vicuna, Qwen2 and Qwen2-VL's text decoder,
    whose M-RoPE ``(cos, sin)`` arrive already merged per position): q_proj / k_proj
    (with their biases), RoPE, grouped-query heads. Scores are formed in float32 so
    half-precision models do not overflow before the softmax.
    """
    hidden_states = call.hidden_states
    batch, seq_len, _ = hidden_states.shape
    head_dim = adapter.head_dim
    cos, sin = call.position_embeddings
    query_hidden = take_positions(hidden_states, query_positions, dim=1)
    q = module.q_proj(query_hidden).view(batch, query_positions.shape[1], -1, head_dim).transpose(1, 2)
    k = module.k_proj(hidden_states).view(batch, seq_len, -1, head_dim).transpose(1, 2)
    if rope:
        q_cos, q_sin = take_positions(cos, query_positions, dim=1), take_positions(sin, query_positions, dim=1)
        q, _ = adapter.apply_rotary(q, q, q_cos, q_sin)
        _, k = adapter.apply_rotary(k, k, cos, sin)
    k = adapter.repeat_kv(k, adapter.num_heads // adapter.num_kv_heads)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * module.scaling
    scores = scores + additive_mask_rows(call.attention_mask, query_positions, seq_len)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)
