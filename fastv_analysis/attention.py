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

from .adapters import get_adapter
from .positions import take_positions  # noqa: F401  (re-exported: the recorder's users index with it)

QueryPositions = Union[str, torch.Tensor, Callable[[int, int], torch.Tensor]]
"""``"last"`` | LongTensor ``[Q]`` or ``[B, Q]`` | ``fn(batch_size, seq_len) -> [Q] or [B, Q]``."""


# ----------------------------------------------------------------------------------------
# Query positions
# ----------------------------------------------------------------------------------------


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


def rows_from_call(adapter, module, args, kwargs, query_positions: QueryPositions) -> torch.Tensor:
    """Attention rows ``[B, H, Q, S]`` for one attention-module call seen by a hook."""
    call = adapter.attention_call(args, kwargs)
    batch, seq_len, _ = call.hidden_states.shape
    positions = query_positions_tensor(query_positions, batch, seq_len, call.hidden_states.device)
    return adapter.attention_rows(module, call, positions)


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
        self.adapter = get_adapter(model)
        self.adapter.check_attention_implementation()  # rows are recomputed from the layers' 4D mask
        self.layers = [int(i) for i in layers]
        bad = [i for i in self.layers if not 0 <= i < self.adapter.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{self.adapter.num_layers - 1}")
        self.query_positions = query_positions
        self.rows: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: int):
        def record(module, args, kwargs, output):
            if self.adapter.attention_call(args, kwargs).hidden_states.shape[1] > 1:
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
