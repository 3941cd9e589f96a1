"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution vision tower + Qwen2 decoder with M-RoPE.

Differences from LLaVA that the hooks must respect:
* position ids are 3-D (temporal, height, width: ``[3, B, S]``), or ``[4, B, S]`` with the
  text positions as row 0 when ``generate`` builds them; image tokens share positions
  along rows, and text after the image continues from the image's largest position, so a
  token's position is not its sequence index. Kept tokens keep their original 3-D
  positions: gathering the decoder's ``(cos, sin)`` (already merged across the M-RoPE
  sections) at kept positions does that from layer K on, and gathering the id rows does it
  at K = 0.
* the model derives 3-D ids itself from ``mm_token_type_ids`` and ``image_grid_thw``;
  explicit positions for a shared prefill come from its own ``get_rope_index`` plus the
  per-sample ``rope_deltas`` for the decoding steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Adapter
from .family import Contract, Family, lazy
from .llava import decoder_fields


class QwenVLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL conventions: M-RoPE position ids."""

    def default_position_ids(self, batch: int, seq_len: int, device) -> torch.Tensor:
        return torch.arange(seq_len, device=device).view(1, 1, -1).expand(3, batch, -1)

    def step_position_ids(self, start: int, q_len: int, batch: int, attention_mask: torch.Tensor | None,
                          device) -> torch.Tensor:
        """As the model's ``compute_3d_position_ids`` places tokens decoded without position ids
        (text positions + the ``rope_deltas`` it kept from the unpruned prompt), with the
        unpruned cache length ``start``; with a 2D mask, the mask's running count (as
        ``generate``), since the model itself cannot decode one token with a full-length mask."""
        if attention_mask is not None:
            text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:].to(device)
        else:
            text = torch.arange(start, start + q_len, device=device).expand(batch, -1)
        deltas = self.model.model.rope_deltas
        if deltas is not None:  # none: the model derived no M-RoPE offsets, its decoder counts from 0
            text = text + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return text[None].expand(3, -1, -1)

    def prompt_positions(self, inputs: dict, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        for name in ("mm_token_type_ids", "image_grid_thw"):
            if inputs.get(name) is None:
                raise ValueError(f"{self.architecture} needs the processor's {name} to place image tokens (M-RoPE)")
        vision, deltas = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=attention_mask)
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.cat([text[None].to(vision.device), vision]), deltas

    def token_layouts(self, inputs: dict, n_image: list[int]) -> list:
        """Each image's own grid: ``image_grid_thw`` patches merged ``spatial_merge_size``^2 to one token."""
        from ..layout import TokenLayout

        merge = self.model.config.vision_config.spatial_merge_size
        grids = inputs.get("image_grid_thw")
        if grids is None:
            raise ValueError(f"{self.architecture} needs the processor's image_grid_thw to lay out its tokens")
        out = []
        for (t, h, w), n in zip(grids.tolist(), n_image):
            rows, cols = h // merge, w // merge
            if t * rows * cols != n:
                raise RuntimeError(f"{self.architecture}: image_grid_thw {t} x {h} x {w} gives {t * rows * cols} tokens, "
                                   f"the prompt has {n}")
            out.append(TokenLayout.grid(t * rows, cols))
        return out

    def decode_positions(self, attention_mask: torch.Tensor, state: Any) -> torch.Tensor:
        text = attention_mask.long().sum(dim=1, keepdim=True) - 1  # [C, 1]
        mrope = (text + state.to(text.device).expand(text.shape[0], -1))[None].expand(3, -1, -1)
        return torch.cat([text[None], mrope])


def build(model: nn.Module) -> Adapter:
    return QwenVLAdapter(image_token_id=model.config.image_token_id, vision_tower=model.model.visual,
                         vision_kind="qwen_merge", **decoder_fields(model, model.model.language_model))


# smart_resize: 28 px per merged token. 2 x 2 grid: r = 2, c = 1 -> rows 0, 1, col 1 -> 1, 3; 4 x 7 grid:
# r = 2, c = 1 -> rows 1, 3, col 3 -> 10, 24. The CLI run's sizes: round(h / 28) x round(w / 28).
CONTRACT = Contract(sizes=((56, 56), (196, 112)), uniform_keep_2=((1, 3), (10, 24)),
                    mixed_grids=((2, 2), (3, 4), (4, 3), (2, 2), (3, 7)))
FAMILIES = (
    Family("Qwen2VLForConditionalGeneration", build, lazy("fastv_analysis.toy.families", "save_tiny_qwen2_vl_checkpoint"),
           CONTRACT, note="M-RoPE (3-row position ids, gathered at kept tokens), dynamic resolution"),
    Family("Qwen2_5_VLForConditionalGeneration", build,
           lazy("fastv_analysis.toy.families", "save_tiny_qwen2_5_vl_checkpoint"), CONTRACT,
           note="as Qwen2-VL, windowed vision tower"),
)
