"""Rewriting calls once a cut is decided: each decoder layer >= K is handed only the kept
positions (``mode="drop"``: hidden states at K, RoPE, position ids and the 4D mask along
query and key dims) or the full sequence with the pruned keys masked out (``mode="mask"``);
at K = 0 in drop mode the text decoder's input itself is pruned. Calls are read and rebuilt
as the adapter's :class:`~fastv_analysis.adapters.LayerCall` / ``DecoderCall``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..adapters import DecoderCall, LayerCall, replace
from ..positions import take_positions
from .compact import compact_ids, dropped_before, rope_at, shift_ids
from .merge import reduce_sequence
from .cut import decode_key_positions, keys_masked_out, mask_fillers, slice_mask
from .prompt import Governing, Prompt


class Memo:
    """Per-forward cache: layers >= K all receive the same mask / RoPE objects."""

    def __init__(self) -> None:
        self._values: dict = {}

    def get(self, key: str, source, compute):
        """``compute()``, reused while ``source`` (what it was computed from) is the same object."""
        hit = self._values.get(key)
        if hit is not None and hit[0] is source:
            return hit[1]
        value = compute()
        self._values[key] = (source, value)
        return value

    def clear(self) -> None:
        self._values = {}


def rewrite_layer(adapter, prompt: Prompt, phase: str, layer: int, call: LayerCall, memo: Memo) -> LayerCall | None:
    """Decoder layer ``layer`` >= K's call under the prompt's cut, or None to leave it as it is."""
    if prompt.mode == "drop" and prompt.agg_layer == 0:
        return None  # pruned at the decoder input, see rewrite_decoder_input
    if prompt.mode == "mask":
        return mask_layer(adapter, prompt, phase, layer, call, memo)
    cut = prompt.governing(layer)
    if phase == "decode":
        return _drop_decode_step(adapter, prompt, layer, call, memo, cut)
    return _drop_prefill(adapter, prompt, layer, call, memo, cut, merge_args(prompt) if cut.tag == "" else None)


def merge_args(prompt: Prompt) -> tuple | None:
    """The first cut's merge, as :func:`~fastv_analysis.pruning.merge.reduce_sequence` takes it."""
    if prompt.merge is None:
        return None
    return prompt.kept_positions, prompt.image_pos, prompt.kept_image, prompt.merge


def _drop_prefill(adapter, prompt: Prompt, layer: int, call: LayerCall, memo: Memo, cut: Governing,
                  merge: tuple | None = None) -> LayerCall:
    """Prefill, drop mode: the layer sees only the kept positions (gathered at the cut's K; a
    merge's ``(kept_positions, image_pos, kept_image, plan)`` fills the anchors' rows with its slots)."""
    tag, kept, fillers, mask = cut.tag, cut.kept_positions, cut.fillers, call.attention_mask
    if call.position_embeddings is None:
        raise adapter.missing("position_embeddings", f"decoder layer {layer}")
    hidden = call.hidden_states
    if layer == cut.first_layer:
        hidden = take_positions(hidden, cut.within, dim=1) if merge is None else reduce_sequence(hidden, *merge)

    def prefill_mask():
        sliced = slice_mask(mask, kept, kept)
        if fillers is None:
            return sliced
        return mask_fillers(sliced, fillers, kept.shape[1], hidden.dtype, diagonal=True)

    position_ids = call.position_ids
    if prompt.positions == "compact":
        rope, ids = memo.get("crope" + tag, call.position_embeddings[0],
                             lambda: _compact_prefill(adapter, prompt, cut, hidden, position_ids))
        return replace(call, hidden_states=hidden, attention_mask=memo.get("mask" + tag, mask, prefill_mask),
                       position_embeddings=rope, position_ids=ids)
    return replace(
        call, hidden_states=hidden,
        attention_mask=memo.get("mask" + tag, mask, prefill_mask),
        position_embeddings=memo.get("rope" + tag, call.position_embeddings[0],
                                     lambda: adapter.gather_rope(call.position_embeddings, kept)),
        position_ids=None if position_ids is None else memo.get(
            "ids" + tag, position_ids, lambda: adapter.gather_position_ids(position_ids, kept)),
    )


def _compact_prefill(adapter, prompt: Prompt, cut: Governing, hidden: torch.Tensor, layer_ids) -> tuple:
    """Compact positions from layer K on in a prefill: the RoPE at the compact ids of the cut's
    kept positions and the layer's own (1-D) ids re-numbered; the cut's shift kept for decoding."""
    ids, shift = compact_ids(prompt.decoder_ids, prompt.seq_len, prompt.image_pos, cut.kept_positions)
    prompt.shifts[cut.tag] = shift
    if layer_ids is not None:
        before = dropped_before(prompt.seq_len, prompt.image_pos, cut.kept_positions)
        layer_ids = take_positions(layer_ids, cut.kept_positions, dim=1) - before
    return rope_at(adapter, hidden, ids), layer_ids


def _compact_decode(adapter, prompt: Prompt, cut: Governing, call: LayerCall) -> tuple:
    """Compact positions from layer K on in a decode step: RoPE and ids shifted by the cut's shift."""
    shift = prompt.shifts[cut.tag]
    rope = rope_at(adapter, call.hidden_states, shift_ids(prompt.decoder_ids, shift, prompt.mrope))
    ids = call.position_ids
    return rope, None if ids is None else ids - shift.text.to(ids.device)[:, None]


def _drop_decode_step(adapter, prompt: Prompt, layer: int, call: LayerCall, memo: Memo,
                      cut: Governing) -> LayerCall | None:
    """Decoding, drop mode: the new tokens' mask keeps the kept prompt keys and every new one."""
    kept, fillers, mask = cut.kept_positions, cut.fillers, call.attention_mask
    if prompt.positions == "compact":
        rope, ids = memo.get("cdecode" + cut.tag, call.position_embeddings[0],
                             lambda: _compact_decode(adapter, prompt, cut, call))
        call = replace(call, position_embeddings=rope, position_ids=ids)
    if mask is None and fillers is None:
        return call if prompt.positions == "compact" else None
    # keys in original coordinates: the prompt, then every token generated so far (this
    # layer's cache, not yet updated in this step, holds the kept positions + those)
    kv_len = (mask.shape[-1] if mask is not None else prompt.seq_len + adapter.cache_length(prompt.cache(), layer)
              - kept.shape[1] + call.hidden_states.shape[1])
    keys = decode_key_positions(kept, prompt.seq_len, kv_len)

    def decode_mask():
        sliced = slice_mask(mask, None, keys)
        if fillers is None:
            return sliced
        extra = torch.zeros(fillers.shape[0], keys.shape[1] - fillers.shape[1], dtype=torch.bool,
                            device=fillers.device)
        return mask_fillers(sliced, torch.cat([fillers, extra], dim=1), call.hidden_states.shape[1],
                            call.hidden_states.dtype, diagonal=False)

    return replace(call, attention_mask=memo.get("mask" + cut.tag, mask, decode_mask))


def mask_layer(adapter, prompt: Prompt, phase: str, layer: int, call: LayerCall, memo: Memo) -> LayerCall:
    """Mask mode: every token stays, the pruned ones are masked out as keys."""
    mask, hidden = call.attention_mask, call.hidden_states
    q_len = hidden.shape[1]
    if phase == "prefill" and layer == prompt.agg_layer and hidden.shape[0] != prompt.batch:
        hidden = hidden.expand(prompt.batch, -1, -1)
    kv_len = prompt.seq_len if phase == "prefill" else (
        mask.shape[-1] if mask is not None else adapter.cache_length(prompt.cache(), layer) + q_len
    )
    cut = prompt.governing(layer)
    key_kept = cut.kept_mask
    if kv_len > prompt.seq_len:
        extra = torch.ones(key_kept.shape[0], kv_len - prompt.seq_len, dtype=torch.bool, device=key_kept.device)
        key_kept = torch.cat([key_kept, extra], dim=1)
    new_mask = memo.get("mask" + cut.tag, mask, lambda: keys_masked_out(mask, key_kept, q_len, hidden.dtype))
    return replace(call, hidden_states=hidden, attention_mask=new_mask)


def rewrite_decoder_input(adapter, prompt: Prompt, phase: str, call: DecoderCall,
                          positions_given: bool) -> DecoderCall:
    """K = 0 in drop mode: the text decoder's call with only the kept positions (prefill), or a
    decode step's mask and positions in the unpruned prompt's coordinates."""
    mask2d = call.attention_mask
    if isinstance(mask2d, Mapping) or (mask2d is not None and mask2d.dim() == 4):
        return _prepared_masks_input(adapter, prompt, phase, call)
    if mask2d is not None and mask2d.dim() != 2:
        raise adapter.missing("a 2D attention mask", "the text decoder at K = 0")
    if phase == "prefill":
        return _prefill_input(adapter, prompt, call)
    return _decode_step_input(adapter, prompt, call, positions_given)


def _prepared_masks_input(adapter, prompt: Prompt, phase: str, call: DecoderCall) -> DecoderCall:
    """K = 0 in drop mode for a model that prepares its 4D mask above the text decoder
    (PaliGemma's prefix-LM), or one per layer type (Gemma3: ``{layer type: mask}``): in a
    prefill each is gathered at the kept positions along queries and keys, as the layers'
    masks are from K > 0; a decode step's
    masks and positions were prepared in original indices by the adapter's
    ``family_hooks``, so its call passes unchanged."""
    if phase != "prefill":
        return call
    embeds, kept, fillers = call.inputs_embeds, prompt.kept_positions, prompt.fillers
    if embeds is None:
        raise adapter.missing("inputs_embeds", "the text decoder")

    def gathered(mask):
        if mask is not None and mask.dim() != 4:
            raise adapter.missing("prepared 4D attention masks", "the text decoder at K = 0")
        sliced = slice_mask(mask, kept, kept)
        if fillers is None:
            return sliced
        return mask_fillers(sliced, fillers, kept.shape[1], embeds.dtype, diagonal=True)

    position_ids = call.position_ids
    if position_ids is None:
        position_ids = adapter.default_position_ids(embeds.shape[0], embeds.shape[1], embeds.device)
    mask = call.attention_mask
    masks = {kind: gathered(one) for kind, one in mask.items()} if isinstance(mask, Mapping) else gathered(mask)
    position_ids = adapter.gather_position_ids(position_ids, kept)
    return DecoderCall(take_positions(embeds, kept, dim=1), None, masks, position_ids, call.cache)


def _kept_mask2d(mask2d: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """The 2D mask of the kept prompt positions, fillers masked out."""
    kept = take_positions(mask2d, prompt.kept_positions, dim=1)
    return kept if prompt.fillers is None else kept.masked_fill(prompt.fillers, 0)


def _prefill_input(adapter, prompt: Prompt, call: DecoderCall) -> DecoderCall:
    embeds, mask2d, position_ids, kept = call.inputs_embeds, call.attention_mask, call.position_ids, prompt.kept_positions
    if embeds is None:
        raise adapter.missing("inputs_embeds", "the text decoder")
    batch, seq_len = embeds.shape[0], embeds.shape[1]
    if position_ids is None:
        position_ids = adapter.default_position_ids(batch, seq_len, embeds.device)
    if mask2d is None:  # explicit mask: gapped position ids must not look like packed sequences
        mask2d = torch.ones(batch, seq_len, dtype=torch.long, device=embeds.device)
    merge = merge_args(prompt)
    reduced = take_positions(embeds, kept, dim=1) if merge is None else reduce_sequence(embeds, *merge)
    if prompt.positions == "compact":
        ids, prompt.shifts[""] = compact_ids(position_ids, prompt.seq_len, prompt.image_pos, kept)
    else:
        ids = adapter.gather_position_ids(position_ids, kept)
    return DecoderCall(reduced, None, _kept_mask2d(mask2d, prompt), ids, call.cache)


def _decode_step_input(adapter, prompt: Prompt, call: DecoderCall, positions_given: bool) -> DecoderCall:
    embeds, mask2d, kept = call.inputs_embeds, call.attention_mask, prompt.kept_positions
    q_len = embeds.shape[1] if embeds is not None else call.input_ids.shape[1]
    new_mask = None
    if mask2d is not None:
        new_mask = torch.cat([_kept_mask2d(mask2d[:, : prompt.seq_len], prompt), mask2d[:, prompt.seq_len :]], dim=1)
    elif prompt.fillers is not None:
        raise adapter.missing("an attention mask while decoding a batch of different image sizes", "the text decoder")
    new_ids = call.position_ids if positions_given else None
    if not positions_given:  # the model counts from its cache, which holds only the kept tokens
        generated = adapter.cache_length(call.cache) - kept.shape[1]
        device = embeds.device if embeds is not None else kept.device
        new_ids = adapter.step_position_ids(prompt.seq_len + generated, q_len, kept.shape[0], mask2d, device)
    if prompt.positions == "compact" and new_ids is not None:
        new_ids = shift_ids(new_ids, prompt.shifts[""], prompt.mrope)
    return DecoderCall(None, None, new_mask, new_ids, call.cache)
