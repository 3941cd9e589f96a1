"""The ``compact`` positions policy: the reduced sequence re-numbered from the cut on.

``original`` (FastV's) gives a kept token, or a merged slot, its anchor token's position
and text its own, so the reduced sequence has gaps where image tokens were dropped.
``compact`` closes the gaps, as the pre-LLM methods' released code does (their reduced
input is a new, shorter sequence the model numbers itself):

* 1-D RoPE (LLaVA, InternVL, ...): every kept token's position minus the number of dropped
  image tokens before it, so the real tokens are numbered 0..L'-1 (left padding keeps its
  own convention); new tokens continue from the compact length.
* M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): text before the first image keeps its
  positions; a kept image token (or slot) keeps its (t, h, w) offsets relative to its
  image's start, the start being one after the text before it; text after an image
  restarts at max(compact positions so far) + 1 and runs on consecutively. It is
  Qwen's own rule (``get_rope_index``) applied to the reduced sequence with each kept
  token's grid coordinates kept; it moves the text only when the kept tokens no longer
  reach the image's last row or column. A leading text-only row (``[4, B, S]`` ids) gets
  the 1-D rule. (Released code has no M-RoPE renumbering to follow: LightCompress's
  Qwen2.5-VL DivPrune hook, ModelTC/LightCompress@9701d03
  llmc/compression/token_reduction/divprune.py ``prune_qwenv25vl_hook``, gathers the 3-D
  ids at the kept tokens, which is ``original`` here.)

Layers before the cut (K > 0) keep their own positions, their cache too; from layer K on
the RoPE is recomputed by the decoder's own ``rotary_emb`` at the compact ids. Decoding
continues with ids shifted by the prompt's shift (its largest original id minus its
largest compact one), per row kind: :class:`Shift`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..positions import take_positions


class Shift(NamedTuple):
    """What a decoded token's original ids lose under compact: ``text`` [B] for 1-D ids (and
    a text-only row), ``mrope`` [B] for M-RoPE rows (None for a 1-D model)."""

    text: torch.Tensor
    mrope: torch.Tensor | None


def _image_flags(seq_len: int, image_pos: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, S]``: the image tokens of the full prompt (``kept_positions``' batch and device)."""
    batch = kept_positions.shape[0]
    is_image = torch.zeros(batch, seq_len, dtype=torch.bool, device=kept_positions.device)
    return is_image.scatter_(1, image_pos.expand(batch, -1).to(kept_positions.device), True)


def dropped_before(seq_len: int, image_pos: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """``[B, M]``: image tokens dropped before each kept position."""
    is_image = _image_flags(seq_len, image_pos, kept_positions)
    kept = torch.zeros_like(is_image).scatter_(1, kept_positions, True)
    return (is_image & ~kept).long().cumsum(dim=1).gather(1, kept_positions)


def _mrope_row(ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """One element's compact M-RoPE ids ``[3, M]`` from its kept tokens' original ids and
    image flags ``[M]``: runs of text and image tokens, each run shifted as one."""
    out = ids.clone()
    flips = torch.nonzero(image[1:] != image[:-1]).flatten() + 1
    bounds = [0, *flips.tolist(), ids.shape[-1]]
    shift, top = 0, None
    for start, end in zip(bounds[:-1], bounds[1:]):
        if not bool(image[start]) and top is not None:  # text after an image: one after the largest so far
            shift = int(ids[0, start]) - (top + 1)
        out[:, start:end] = ids[:, start:end] - shift
        run_top = int(out[:, start:end].max())
        top = run_top if top is None else max(top, run_top)
    return out


def compact_ids(ids: torch.Tensor, seq_len: int, image_pos: torch.Tensor, kept_positions: torch.Tensor
                ) -> tuple[torch.Tensor, Shift]:
    """The compact ids of the kept positions, in the format of the full prompt's ``ids``
    (``[B, S]`` 1-D, ``[3, B, S]`` M-RoPE, ``[4, B, S]`` text row + M-RoPE), and the
    :class:`Shift` of the tokens decoded after it."""
    before = dropped_before(seq_len, image_pos, kept_positions)
    text_shift = before[:, -1]
    if ids.dim() == 2:
        return take_positions(ids, kept_positions, dim=1) - before, Shift(text_shift, None)
    kept_ids = take_positions(ids.transpose(0, 1), kept_positions, dim=2).transpose(0, 1)  # [R, B, M]
    batch = kept_positions.shape[0]
    image = _image_flags(seq_len, image_pos, kept_positions).gather(1, kept_positions)
    mrope = torch.stack([_mrope_row(kept_ids[-3:, b], image[b]) for b in range(batch)], dim=1)
    full = ids[-3:].expand(-1, batch, -1)
    m_shift = full.amax(dim=(0, 2)) - mrope.amax(dim=(0, 2))
    out = mrope if ids.shape[0] == 3 else torch.cat([(kept_ids[0] - before)[None], mrope])
    return out, Shift(text_shift, m_shift)


def shift_ids(ids: torch.Tensor, shift: Shift, mrope: bool) -> torch.Tensor:
    """Decoded tokens' original ``ids`` (any of the formats above; 2-D ids of an M-RoPE model
    stand for its three rows) moved to compact coordinates."""
    if ids.dim() == 2:
        return ids - (shift.mrope if mrope else shift.text)[:, None].to(ids.device)
    m = shift.mrope[None, :, None].to(ids.device)
    if ids.shape[0] == 3:
        return ids - m
    return torch.cat([ids[:1] - shift.text[None, :, None].to(ids.device), ids[1:] - m])


def rope_ids(ids: torch.Tensor) -> torch.Tensor:
    """The ids a decoder's ``rotary_emb`` takes: a leading text-only row dropped."""
    return ids[1:] if ids.dim() == 3 and ids.shape[0] == 4 else ids


def rope_at(adapter, hidden: torch.Tensor, ids: torch.Tensor) -> tuple:
    """The decoder's own RoPE ``(cos, sin)`` at ``ids`` (any format above)."""
    rotary = getattr(adapter.language_model, "rotary_emb", None)
    if rotary is None:
        raise adapter.missing("a rotary_emb module", "the text decoder (positions='compact')")
    return rotary(hidden, rope_ids(ids).to(hidden.device))
