"""Attention probabilities of a few query positions, without eager attention.

The model keeps its fast attention kernel (SDPA) everywhere. For a recorded layer a
forward hook on its attention module takes the module's own inputs (the
input-layernormed hidden states, RoPE ``(cos, sin)`` and the 4D attention mask) and
recomputes softmax(q k^T * scale + mask) for the selected query rows only: q_proj on Q
positions, k_proj on all S. That costs O(Q*S) per layer instead of the O(S^2) memory of
``output_attentions`` on every layer, which is what makes capture affordable on a 7B
model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import nn

QueryPositions = Union[str, torch.Tensor, Callable[[int, int], torch.Tensor]]
"""``"last"`` | LongTensor ``[Q]`` or ``[B, Q]`` | ``fn(batch_size, seq_len) -> [Q] or [B, Q]``."""


# ----------------------------------------------------------------------------------------
# Small indexing helpers (shared with pruning.py)
# ----------------------------------------------------------------------------------------


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


def query_positions_tensor(query_positions: QueryPositions, batch: int, seq_len: int, device) -> torch.Tensor:
    """LongTensor ``[B, Q]`` of query positions from any accepted spelling."""
    if isinstance(query_positions, str):
        if query_positions != "last":
            raise ValueError(f"query_positions must be 'last', a LongTensor or a callable, got {query_positions!r}")
        positions = torch.tensor([seq_len - 1])
    elif callable(query_positions) and not isinstance(query_positions, torch.Tensor):
        positions = torch.as_tensor(query_positions(batch, seq_len))
    else:
        positions = torch.as_tensor(query_positions)
    positions = positions.to(device=device, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2 or positions.shape[0] not in (1, batch):
        raise ValueError(f"query positions must be [Q] or [B, Q], got shape {tuple(positions.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= seq_len):
        raise ValueError(f"query positions must lie in 0..{seq_len - 1}")
    return positions.expand(batch, positions.shape[1])


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


# ----------------------------------------------------------------------------------------
# The row computation (Llama-family attention: q_proj/k_proj, RoPE, GQA)
# ----------------------------------------------------------------------------------------


def llama_attention_rows(
    adapter,
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """``[B, H, Q, S]`` float32 attention probabilities of query rows ``[B, Q]``.

    Same arithmetic as eager attention for a prefill with an empty cache: the model's
    own RoPE and repeat_kv, its scaling, the mask, softmax in float32. Scores are formed
    in float32 so half-precision models do not overflow before the softmax.
    """
    batch, seq_len, _ = hidden_states.shape
    head_dim = adapter.head_dim
    cos, sin = position_embeddings
    query_hidden = take_positions(hidden_states, query_positions, dim=1)
    q = module.q_proj(query_hidden).view(batch, query_positions.shape[1], -1, head_dim).transpose(1, 2)
    k = module.k_proj(hidden_states).view(batch, seq_len, -1, head_dim).transpose(1, 2)
    q_cos, q_sin = take_positions(cos, query_positions, dim=1), take_positions(sin, query_positions, dim=1)
    q, _ = adapter.apply_rotary(q, q, q_cos, q_sin)
    _, k = adapter.apply_rotary(k, k, cos, sin)
    k = adapter.repeat_kv(k, adapter.num_heads // adapter.num_kv_heads)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * module.scaling
    scores = scores + additive_mask_rows(attention_mask, query_positions, seq_len)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def attention_module_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
    """(hidden_states, position_embeddings, attention_mask) from an attention module call."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None and len(args) > 1:
        position_embeddings = args[1]
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None and len(args) > 2:
        attention_mask = args[2]
    return hidden_states, position_embeddings, attention_mask


def rows_from_call(adapter, module, args, kwargs, query_positions: QueryPositions) -> torch.Tensor:
    """Attention rows ``[B, H, Q, S]`` for one attention-module call seen by a hook."""
    hidden_states, position_embeddings, attention_mask = attention_module_inputs(args, kwargs)
    batch, seq_len, _ = hidden_states.shape
    positions = query_positions_tensor(query_positions, batch, seq_len, hidden_states.device)
    return adapter.attention_rows(adapter, module, hidden_states, position_embeddings, attention_mask, positions)


# ----------------------------------------------------------------------------------------
# Recorder
# ----------------------------------------------------------------------------------------


class AttentionRecorder:
    """Record attention rows of chosen layers during ordinary (SDPA) forwards.

    >>> with AttentionRecorder(model, layers=[1], query_positions="last") as rec:
    ...     model(**inputs)
    >>> rec.rows[1]          # [B, H, 1, S] float32, layer 1's last-position attention

    Only prefill forwards (more than one query position) are recorded; decode steps are
    ignored, so ``rows`` after ``generate`` describe the prompt. Hooks are removed on exit
    and nothing else on the model is touched.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], query_positions: QueryPositions = "last"):
        from .adapters import get_adapter

        self.adapter = get_adapter(model)
        self.layers = [int(i) for i in layers]
        bad = [i for i in self.layers if not 0 <= i < self.adapter.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{self.adapter.num_layers - 1}")
        self.query_positions = query_positions
        self.rows: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: int):
        def record(module, args, kwargs, output):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if hidden_states.shape[1] > 1:
                with torch.no_grad():
                    self.rows[layer] = rows_from_call(self.adapter, module, args, kwargs, self.query_positions)

        return record

    def start(self) -> "AttentionRecorder":
        if not self._handles:
            self._handles = [
                self.adapter.attention(i).register_forward_hook(self._hook(i), with_kwargs=True) for i in self.layers
            ]
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "AttentionRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
