"""The geometry of a cut, as pure functions on tensors: where each element's image tokens sit,
its query row, which sequence positions a layer keeps (and the filler tokens that even out a
ragged batch), the 4D masks restricted to kept queries and keys, and each sample's key for
the random control. Nothing here knows a model or a hook."""

from __future__ import annotations

import hashlib

import torch

from ..positions import take_positions


def is_image_token(input_ids: torch.Tensor, image_token_id: int | tuple[int, ...]) -> torch.Tensor:
    """Bool like ``input_ids``: the image tokens, those with ``image_token_id`` or, given several
    ids, with any of them (Mistral3: ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``)."""
    if isinstance(image_token_id, (tuple, list)):
        return torch.isin(input_ids, torch.tensor(image_token_id, device=input_ids.device))
    return input_ids == image_token_id


def image_positions(input_ids: torch.Tensor, image_token_id: int | tuple[int, ...]) -> torch.Tensor:
    """LongTensor ``[B, N]``: sequence positions of the image tokens, per element (equal N)."""
    positions, counts = padded_image_positions(input_ids, image_token_id)
    if (counts != counts[0]).any():
        raise ValueError(f"batch elements have different numbers of image tokens: {counts.tolist()}")
    return positions


def padded_image_positions(input_ids: torch.Tensor, image_token_id: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, N_max], [B])``: image-token positions of each element and their count N_b.

    Images of different sizes give different N_b in one batch (anyres tiles, dynamic
    resolution); row b is padded after its N_b positions by repeating its last one, so
    scatters and gathers over the padded row touch only its own image tokens.
    """
    is_image = is_image_token(input_ids, image_token_id)
    counts = is_image.sum(dim=1)
    if (counts == 0).any():
        raise ValueError(f"no image token (id {image_token_id}) in input_ids of batch element(s) "
                         f"{(counts == 0).nonzero().flatten().tolist()}")
    seq = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    order = torch.where(is_image, seq, seq + input_ids.shape[1]).sort(dim=1).values[:, : int(counts.max())]
    last = order.gather(1, (counts - 1)[:, None])
    return torch.where(order < input_ids.shape[1], order, last), counts


def fixed_image_positions(batch: int, image_start: int, image_tokens: int, seq_len: int, device) -> torch.Tensor:
    """``[B, N]`` for a span given by the reference's sys_length / image_token_length."""
    if image_start + image_tokens > seq_len:
        raise ValueError(f"image span {image_start}..{image_start + image_tokens} exceeds the sequence ({seq_len})")
    return torch.arange(image_start, image_start + image_tokens, device=device).expand(batch, image_tokens)


def filler_positions(kept_mask: torch.Tensor, image_pos: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, S]``: pruned image tokens that pad each element's kept count to the batch's most.

    With N_b image tokens, element b keeps ``S - N_b + keep`` positions; a tensor needs the
    same count in every row, so the rows that kept fewer take their first pruned image
    tokens along as *fillers*, masked out as keys everywhere (:func:`mask_fillers`), so no
    real token ever sees them.
    """
    counts = kept_mask.sum(dim=1)
    need = counts.max() - counts  # [B]
    is_image = torch.zeros_like(kept_mask).scatter_(1, image_pos, True)
    pruned = is_image & ~kept_mask
    return pruned & (pruned.long().cumsum(dim=1) <= need[:, None])


def mask_fillers(mask: torch.Tensor | None, filler_keys: torch.Tensor, q_len: int, dtype: torch.dtype,
                 diagonal: bool) -> torch.Tensor:
    """``mask`` with filler key columns removed; a filler query still sees itself (``diagonal``,
    in the prefill), so that no row is empty and nothing turns NaN."""
    kv_len = filler_keys.shape[1]
    out = keys_masked_out(mask, ~filler_keys, q_len, dtype)
    if diagonal:
        eye = torch.eye(q_len, kv_len, dtype=torch.bool, device=out.device)[None, None]
        own = eye & filler_keys[:, None, None, :]
        out = out.masked_fill(own, 0.0)
    return out


def kept_token_mask(seq_len: int, image_pos: torch.Tensor, kept_image: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, S]``: True for every text token and every kept image token."""
    batch = max(image_pos.shape[0], kept_image.shape[0])
    image_pos = image_pos.expand(batch, -1)
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=image_pos.device)
    mask.scatter_(1, image_pos, False)
    mask.scatter_(1, image_pos.gather(1, kept_image.to(image_pos.device).expand(batch, -1)), True)
    return mask


def mask_to_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` ascending positions of the True entries (equal count per row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return positions[mask].view(mask.shape[0], -1)


def decode_key_positions(kept_positions: torch.Tensor, prompt_len: int, kv_len: int) -> torch.Tensor:
    """Key columns seen from layer K on while decoding: kept prompt positions + all new ones."""
    new = torch.arange(prompt_len, kv_len, device=kept_positions.device).expand(kept_positions.shape[0], -1)
    return torch.cat([kept_positions, new], dim=1)


def slice_mask(mask: torch.Tensor | None, query_pos: torch.Tensor | None, key_pos: torch.Tensor) -> torch.Tensor | None:
    """A 4D mask ``[B, 1, q, kv]`` restricted to kept query rows and key columns."""
    if mask is None:
        return None
    if query_pos is not None:
        mask = take_positions(mask, query_pos, dim=2)
    return take_positions(mask, key_pos, dim=3)


def keys_masked_out(
    mask: torch.Tensor | None, key_kept: torch.Tensor, q_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive float mask ``[B, 1, q, kv]``: ``mask`` with the non-kept keys removed.

    ``mask`` is None (plain causal, only possible in a prefill or a single-token decode
    step), bool (True = attend) or already additive float. Works for SDPA and eager.
    """
    lowest = torch.finfo(dtype).min
    kv_len = key_kept.shape[1]
    if mask is None:
        queries = torch.arange(kv_len - q_len, kv_len, device=key_kept.device)
        mask = torch.arange(kv_len, device=key_kept.device)[None, :] <= queries[:, None]
        mask = mask[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, lowest)
    return torch.where(key_kept[:, None, None, :], mask.to(dtype), lowest)


def image_attention(rows: torch.Tensor, image_pos: torch.Tensor) -> torch.Tensor:
    """``[B, H, N]``: one query row ``[B, H, S]`` restricted to the image columns."""
    return take_positions(rows, image_pos, dim=2)


def last_token_positions(attention_mask: torch.Tensor | None, batch: int, seq_len: int, device) -> torch.Tensor:
    """``[B, 1]`` position of each element's last real token: FastV's query.

    With left padding (what generate needs) it is ``seq_len - 1``; a right-padded element
    ends earlier, and ranking by its padding would rank by a token that is not the prompt.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.full((batch, 1), seq_len - 1, dtype=torch.long, device=device)
    real = attention_mask.to(device).bool()
    if not real.any(dim=1).all():
        raise ValueError("an element of the batch is all padding (attention_mask is 0 everywhere)")
    last = seq_len - 1 - real.flip(1).long().argmax(dim=1)
    return last[:, None]


def sample_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                pixel_values: torch.Tensor | None) -> list[int]:
    """One integer key per element: a hash of its unpadded input ids and its pixel values.

    Both enter because benchmarks like POPE ask the same question about thousands of
    images; padding is left out so the key does not depend on the batch it came in.
    """
    keys = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b] if attention_mask is None or attention_mask.dim() != 2 else input_ids[b][attention_mask[b].bool()]
        h = hashlib.blake2b(ids.detach().cpu().to(torch.int64).numpy().tobytes(), digest_size=8)
        if pixel_values is not None and (pixel_values.shape[0] == input_ids.shape[0] or input_ids.shape[0] == 1):
            # one image per element, or a single element (whatever its pixels' layout: anyres
            # tiles arrive as [tiles, 3, h, w]); in a batch whose pixels do not map one to one
            # to its elements, hashing them all would make the key depend on the batch: the
            # ids alone key the sample then
            pixels = pixel_values[b] if pixel_values.shape[0] == input_ids.shape[0] else pixel_values
            h.update(pixels.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
        keys.append(int.from_bytes(h.digest(), "little") >> 1)
    return keys
