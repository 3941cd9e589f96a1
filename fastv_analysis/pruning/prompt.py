"""What one prefill decided: the prompt's image spans and query rows, the kept set of its first
cut and the schedule's later cuts (:class:`Prompt`, :class:`Cut`). The decoding steps of the
same cache reuse it, whatever the live config says by then; :meth:`Prompt.governing` says
which cut a layer runs under."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import strategies
from ..positions import take_positions
from .config import FastVConfig
from .merge import check_merge
from .cut import (
    filler_positions,
    fixed_image_positions,
    kept_token_mask,
    last_token_positions,
    mask_to_positions,
    padded_image_positions,
)


@dataclass
class Cut:
    """A later stage's decision: what it kept, in original image-token indices and sequence
    positions, and where those positions sit in the previous cut's (drop mode gathers there)."""

    agg_layer: int
    kept_image: torch.Tensor  # [B, k]
    kept_mask: torch.Tensor  # [B, S]
    kept_positions: torch.Tensor  # [B, M]
    within: torch.Tensor  # [B, M] indices into the previous cut's kept_positions


class Governing(NamedTuple):
    """The cut a layer runs under (:meth:`Prompt.governing`)."""

    tag: str  # memo key suffix: "" for the first cut, "s1", "s2", ... for the later ones
    kept_positions: torch.Tensor  # [B, M] sequence positions kept
    fillers: torch.Tensor | None  # [B, M] True where kept_positions holds a filler (first cut only)
    kept_mask: torch.Tensor  # [B, S]
    first_layer: int  # the cut's K: the layer whose hidden states are gathered
    within: torch.Tensor  # [B, M] where kept_positions sit in what that first layer receives


@dataclass
class Prompt:
    """What one prefill decided; decoding steps of the same cache reuse it."""

    seq_len: int
    batch: int  # batch inside the decoder from layer K on (> input batch when fanning out)
    agg_layer: int
    mode: str
    image_pos: torch.Tensor  # [B, N_max], padded (see padded_image_positions)
    n_image: torch.Tensor  # [B] image tokens of each element
    query_pos: torch.Tensor | None = None  # [B, 1] last real token of each element
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    keys: list[int] | None = None  # per-element keys of the random control, set when first needed
    selection: strategies.Selection | None = None
    given: torch.Tensor | None = None  # [B, keep] image-token indices chosen outside
    kept_mask: torch.Tensor | None = None  # [B, S]
    kept_positions: torch.Tensor | None = None  # [B, n_kept] (fillers included)
    fillers: torch.Tensor | None = None  # [B, n_kept] True where kept_positions holds a filler
    image_rows: torch.Tensor | None = None  # [B, H, N_max]
    cache: weakref.ref | None = None
    inputs: dict | None = None  # the top-level call's keywords (image sizes / grids for the layouts)
    kept_image: torch.Tensor | None = None  # [B, keep] image-token indices the first cut kept
    stages: tuple = ()  # the schedule's later Stages
    later: list = field(default_factory=list)  # their Cuts, decided during the prefill
    hidden_in: torch.Tensor | None = None  # residual stream entering layer K-1 (when a strategy needs it)
    embeds_in: torch.Tensor | None = None  # residual stream entering layer 0 (when a strategy needs it)
    pending: tuple | None = None  # layer K-1's attention call, kept until layer K when a strategy reads its output
    merge: strategies.Merge | None = None  # the first cut's merge plan ([B, N] assign / weight), None: a drop
    positions: str = "original"  # the positions policy from the cut on
    decoder_ids: torch.Tensor | None = None  # the running forward's text-decoder position ids (full format)
    mrope: bool = False  # whether the decoder's ids are M-RoPE's rows
    shifts: dict = field(default_factory=dict)  # cut tag -> compact.Shift, set in the prefill (positions="compact")

    @property
    def ragged(self) -> bool:
        return bool((self.n_image != self.n_image[0]).any())

    def choose(self, kept_image: torch.Tensor, merge: strategies.Merge | None = None) -> None:
        """Decide the first cut: keep these image-token indices ``[B, keep]`` (the anchors of a
        ``merge`` plan's slots, ascending)."""
        if merge is not None:
            if self.ragged:
                raise ValueError("a merge reduction needs one image-token count per batch (batch samples of one N)")
            self.merge = check_merge(merge, kept_image, int(self.n_image[0]))
        self.kept_image = kept_image
        self.kept_mask = kept_token_mask(self.seq_len, self.image_pos, kept_image)
        fill = filler_positions(self.kept_mask, self.image_pos.expand(self.kept_mask.shape[0], -1))
        self.kept_positions = mask_to_positions(self.kept_mask | fill)
        self.fillers = take_positions(fill, self.kept_positions, dim=1) if fill.any() else None

    def owns(self, cache) -> bool:
        return cache is not None and self.cache is not None and self.cache() is cache

    def governing(self, layer: int) -> Governing:
        """The cut that governs ``layer`` (the last one whose K is at or below it)."""
        c = sum(layer >= stage.agg_layer for stage in self.stages)
        if c == 0:
            return Governing("", self.kept_positions, self.fillers, self.kept_mask, self.agg_layer,
                             self.kept_positions)
        cut = self.later[c - 1]
        return Governing(f"s{c}", cut.kept_positions, None, cut.kept_mask, cut.agg_layer, cut.within)


def _given_sets(config: FastVConfig, n_image: torch.Tensor, batch: int, device) -> torch.Tensor:
    """``config.kept`` as ``[B or C, keep]`` indices, checked against the prompt's image tokens."""
    given = torch.as_tensor(config.kept, dtype=torch.long, device=device)
    given = given.unsqueeze(0) if given.dim() == 1 else given
    if given.shape[0] not in (1, batch) and batch != 1:
        raise ValueError(f"kept has {given.shape[0]} rows for a batch of {batch}")
    if given.shape[1] != config.keep:
        raise ValueError(f"kept has {given.shape[1]} indices per row but keep is {config.keep}")
    if given.numel() and (given.min() < 0 or (given >= n_image[:, None]).any()):
        raise ValueError(f"kept indices must lie in 0..N-1 (N = {n_image.tolist()} image tokens)")
    if given.shape[0] > batch and config.agg_layer == 0 and config.mode == "mask":
        raise ValueError("fanning one prompt out to several kept sets needs agg_layer >= 1 in mask mode")
    return given


def new_prompt(config: FastVConfig, adapter, input_ids: torch.Tensor, attention_mask=None) -> Prompt:
    """The state of a new prefill of ``input_ids``, its first cut decided when ``config.kept``
    gives it (replay, shared prefill); otherwise ranking decides it at layer K-1."""
    batch, seq_len = input_ids.shape
    if config.image_start is not None:
        image_pos = fixed_image_positions(batch, config.image_start, config.image_tokens, seq_len, input_ids.device)
        n_image = torch.full((batch,), config.image_tokens, device=input_ids.device)
    else:
        image_pos, n_image = padded_image_positions(input_ids, adapter.image_token_id)
    config.validate(adapter.num_layers, int(n_image.min()))
    given = None if config.kept is None else _given_sets(config, n_image, batch, input_ids.device)
    fan_out = batch if given is None else max(batch, given.shape[0])
    prompt = Prompt(seq_len, fan_out, config.agg_layer, config.mode, image_pos, n_image, given=given,
                    query_pos=last_token_positions(attention_mask, batch, seq_len, input_ids.device),
                    input_ids=input_ids, attention_mask=attention_mask)
    if config.sample_ids is not None and len(config.sample_ids) != batch:
        raise ValueError(f"sample_ids has {len(config.sample_ids)} ids for a batch of {batch}")
    prompt.stages = tuple(config.stages)
    prompt.positions = config.positions
    if config.merges and config.newline == "keep":
        raise ValueError("a merge reduction needs newline='prune' (its plan covers every image token)")
    if prompt.stages and (prompt.ragged or config.newline == "keep"):
        raise ValueError("a schedule needs one image-token count per batch and newline='prune' "
                         "(batch samples of one N, as capture and eval do)")
    if given is not None:
        order = given.sort(dim=1)
        if config.merge is not None and not torch.equal(order.values, given):
            raise ValueError("kept: a merge plan's anchor indices must be ascending (slot j = the j-th anchor)")
        prompt.choose(order.values, config.merge)
    return prompt
