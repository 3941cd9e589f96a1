"""What strategies read off a layer besides attention rows, as the model computes it: the
keys after RoPE (DART's pivots) and the decoder's final norm (DART's similarity space).
Mixed into :class:`~fastv_analysis.adapters.base.Adapter`; needs its ``head_dim``,
``apply_rotary`` and ``language_model``."""

from __future__ import annotations

import torch
from torch import nn


class Readouts:
    """Keys after RoPE and the final norm, for the strategies' named inputs."""

    def attention_keys(self, module: nn.Module, call) -> torch.Tensor:
        """``[B, S, H_kv * d]`` the keys of one attention call after the model's RoPE, heads
        concatenated (DART's pivots rank tokens by their L1 norm)."""
        batch, seq_len, _ = call.hidden_states.shape
        k = module.k_proj(call.hidden_states).view(batch, seq_len, -1, self.head_dim)
        norm = getattr(module, "k_norm", None)  # Qwen3-VL, Gemma3: per-head norm before RoPE, as their forward
        k = (norm(k) if norm is not None else k).transpose(1, 2)
        cos, sin = call.position_embeddings
        _, k = self.apply_rotary(k, k, cos, sin)
        return k.transpose(1, 2).reshape(batch, seq_len, -1)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm applied to ``hidden`` (DART's similarity space)."""
        return self.language_model.norm(hidden)
