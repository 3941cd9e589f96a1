"""FastV on an unmodified Hugging Face VLM (LLaVA, LLaVA-NeXT, OneVision, Qwen2-VL / 2.5-VL, InternVL), by hooks.

FastV (Chen et al., 2024): layers 0..K-1 see every token; the last prompt token's
attention at layer K-1 ranks the image tokens; from layer K on only the ``keep`` best
image tokens remain. Here that is done without a copy of transformers' modeling code:

* a pre-hook on the top-level model reads ``input_ids`` and finds each element's image
  span (``input_ids == image_token_id``; left padding and different prompt lengths work);
* a hook on layer K-1's attention recomputes the last prompt row of its attention
  probabilities (:mod:`fastv_analysis.attention`) and ranks it with
  :func:`fastv_analysis.strategies.select`, each batch element on its own;
* pre-hooks on layers >= K gather the kept positions: layer K its hidden states, every
  layer >= K the RoPE ``(cos, sin)`` along the query dim and the 4D mask along query and
  key dims. During decoding the key columns are the kept prompt positions plus every
  position after the prompt. The cache of layers >= K thus holds only kept tokens, while
  the layer-0 cache stays full length, so new tokens get their original RoPE positions,
  and kept tokens keep theirs.

K = 0 (no attention to rank by) keeps a random subset and prunes the decoder's input
embeddings instead (a pre-hook on the language model), passing explicit positions. Random
subsets (K = 0 and ``method="random"``) are drawn per sample, keyed by (seed, sample): an
explicit ``sample_ids`` or a hash of the element's unpadded input ids and pixel values,
so a sample keeps the same set whatever its batch, and the same set as the select stage
when ``sample_ids`` are the run's sample ids.
``mode="mask"`` keeps every token but masks the pruned ones out as keys from layer K on,
as the reference implementation did; it exists to check ``mode="drop"`` against.

Images of different sizes in one batch give each element its own N: every element keeps
``keep`` image tokens, and the rows that keep fewer positions carry some pruned image
tokens as fillers that no token attends to. A schedule (``stages``) cuts again at later
layers, each cut ranking what the previous one kept by the pruned model's attention. All
reading and rewriting of transformers' calls goes through the model's
:class:`~fastv_analysis.adapters.Adapter`.

Nothing on the model is changed permanently: :func:`apply_fastv` returns a wrapper that
owns the hook handles and removes them on :meth:`FastVModel.remove` / context exit.
"""

from __future__ import annotations

import hashlib
import numbers
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from . import probes, strategies
from .adapters import Adapter, DecoderCall, get_adapter, replace
from .attention import rows_from_call
from .layout import NEWLINE_POLICIES, uniform_tokens
from .positions import take_positions

MODES = ("drop", "mask")

ALIASES = {
    "fast_v_agg_layer": "agg_layer",
    "fast_v_attention_rank": "keep",
    "fast_v_sys_length": "image_start",
    "fast_v_image_token_length": "image_tokens",
    "fast_v_token_selection_method": "method",
    "fast_v_weighted_alpha": "alpha",
    "fast_v_inplace": None,  # the reference's in-place flag: drop mode is always in place
}


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A later pruning stage of a schedule: from layer ``agg_layer`` on, keep ``keep`` of the
    image tokens the earlier stages kept, ranked by ``method`` on the attention that layer
    ``agg_layer - 1`` of the *pruned* model pays them (what online pruning would see; the
    cache of the full model only approximates it). Its random control is seeded with the
    config's seed + the stage's number (1, 2, ...)."""

    agg_layer: int
    keep: int
    method: str = "avg_all_heads"
    alpha: float = 0.5
    params: Mapping = field(default_factory=dict)


@dataclass
class FastVConfig:
    """FastV settings; fields can be changed between forwards (``m.fastv.keep = 64``).

    agg_layer:    K, the first pruned layer; layer K-1's attention ranks the image tokens.
    keep:         image tokens kept (the reference's ``attention_rank``), 0..N.
    method/alpha: selection strategy, see :mod:`fastv_analysis.strategies`.
    stages:       later :class:`Stage` s of a per-layer schedule (e.g. keep 50 % at K = 2
                  by one method, then 25 % at K = 8 by another); empty = FastV's one cut.
    params:       the strategy's declared parameters (``query="text_mean"``, ``base=...``,
                  ``sink_ratio=...``); the inputs it needs beyond the last-token rows are
                  computed at layer K-1 (:mod:`fastv_analysis.probes`).
    image_start, image_tokens: a fixed image span for every element (the reference's
                  ``sys_length``/``image_token_length``); None = find it in input_ids.
    seed:         seeds the random method and the K = 0 subset (with each sample's key).
    sample_ids:   one non-negative id per batch element keying its random subset (the
                  select stage's ``sample_id``); None = a hash of the element's unpadded
                  input ids and pixel values (:func:`sample_keys`).
    mode:         "drop" (physically remove) or "mask" (mask out as keys).
    newline:      LLaVA-NeXT / OneVision ``image_newline`` tokens: "prune" (ranked like
                  every image token) or "keep" (always kept, outside the budget), see
                  :data:`fastv_analysis.layout.NEWLINE_POLICIES`.
    kept:         externally chosen image-token indices ``[B, keep]`` or ``[keep]``
                  (replaying the select stage); overrides method when set.
    """

    agg_layer: int = 2
    keep: int = 288
    method: str = "avg_all_heads"
    alpha: float = 0.5
    use_fast_v: bool = True
    image_start: int | None = None
    image_tokens: int | None = None
    seed: int = 0
    sample_ids: Sequence[int] | None = None
    mode: str = "drop"
    newline: str = "prune"
    params: Mapping = field(default_factory=dict)
    stages: Sequence[Stage] = ()
    kept: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.stages = tuple(s if isinstance(s, Stage) else Stage(**s) for s in self.stages)
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping) -> "FastVConfig":
        """Build from a dict; the reference implementation's key names are accepted too."""
        names = {f.name for f in fields(cls)}
        values = {}
        for key, value in d.items():
            name = ALIASES.get(key, key)
            if name is None:  # accepted for compatibility, nothing to set
                continue
            if name not in names:
                raise ValueError(f"unknown FastV config key {key!r}")
            if name in values:
                raise ValueError(f"FastV config key {key!r} given twice (also as an alias)")
            values[name] = value
        return cls(**values)

    def validate(self, num_layers: int | None = None, n_image: int | None = None) -> None:
        """One-line ValueError for a bad setting; model-dependent limits when given."""
        if not (isinstance(self.agg_layer, int) and self.agg_layer >= 0):
            raise ValueError(f"agg_layer must be a non-negative integer, got {self.agg_layer!r}")
        if num_layers is not None and self.agg_layer >= num_layers:
            raise ValueError(f"agg_layer must be < the number of decoder layers ({num_layers}), got {self.agg_layer}")
        if not (isinstance(self.keep, int) and self.keep >= 0):
            raise ValueError(f"keep must be a non-negative integer, got {self.keep!r}")
        if n_image is not None and self.keep > n_image:
            raise ValueError(f"keep must be in 0..{n_image} (the number of image tokens), got {self.keep}")
        if self.method not in strategies.STRATEGIES:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(strategies.STRATEGIES)}")
        strategies.required_inputs(self.method, **dict(self.params))  # unknown or bad parameters raise here
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.newline not in NEWLINE_POLICIES:
            raise ValueError(f"newline must be one of {', '.join(NEWLINE_POLICIES)}, got {self.newline!r}")
        if (self.image_start is None) != (self.image_tokens is None):
            raise ValueError("image_start and image_tokens must be given together (or neither)")
        if self.sample_ids is not None and not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                   and i >= 0 for i in self.sample_ids):
            raise ValueError(f"sample_ids must be non-negative integers, got {list(self.sample_ids)!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        previous = (self.agg_layer, self.keep)
        for i, stage in enumerate(self.stages, start=1):
            where = f"stage {i} of the schedule"
            if self.agg_layer == 0:
                raise ValueError("a schedule's first cut must be at agg_layer >= 1 (K = 0 prunes the input)")
            if not (isinstance(stage.agg_layer, int) and stage.agg_layer > previous[0]):
                raise ValueError(f"{where}: agg_layer must be an integer above the previous cut's {previous[0]}, "
                                 f"got {stage.agg_layer!r}")
            if num_layers is not None and stage.agg_layer >= num_layers:
                raise ValueError(f"{where}: agg_layer must be < the number of decoder layers ({num_layers})")
            if not (isinstance(stage.keep, int) and 0 <= stage.keep <= previous[1]):
                raise ValueError(f"{where}: keep must be an integer in 0..{previous[1]} (what the previous cut kept), "
                                 f"got {stage.keep!r}")
            if stage.method not in strategies.STRATEGIES or stage.method in strategies.LAYOUT_METHODS or \
                    strategies.required_inputs(stage.method, **dict(stage.params)):
                raise ValueError(f"{where}: method must rank by attention alone (e.g. "
                                 f"{', '.join(strategies.ATTENTION_METHODS)}, dynamic_alpha, random), "
                                 f"got {stage.method!r}")
            if not (isinstance(stage.alpha, (int, float)) and 0.0 <= float(stage.alpha) <= 1.0):
                raise ValueError(f"{where}: alpha must be in [0, 1], got {stage.alpha!r}")
            previous = (stage.agg_layer, stage.keep)
        for name in ("image_start", "image_tokens"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


# ----------------------------------------------------------------------------------------
# Pure functions on tensors
# ----------------------------------------------------------------------------------------


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """LongTensor ``[B, N]``: sequence positions of the image tokens, per element (equal N)."""
    positions, counts = padded_image_positions(input_ids, image_token_id)
    if (counts != counts[0]).any():
        raise ValueError(f"batch elements have different numbers of image tokens: {counts.tolist()}")
    return positions


def padded_image_positions(input_ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, N_max], [B])``: image-token positions of each element and their count N_b.

    Images of different sizes give different N_b in one batch (anyres tiles, dynamic
    resolution); row b is padded after its N_b positions by repeating its last one, so
    scatters and gathers over the padded row touch only its own image tokens.
    """
    is_image = input_ids == image_token_id
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


# ----------------------------------------------------------------------------------------
# The per-prompt state and the hooks
# ----------------------------------------------------------------------------------------


@dataclass
class _Prompt:
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
    later: list = field(default_factory=list)  # their _Cuts, decided during the prefill
    hidden_in: torch.Tensor | None = None  # residual stream entering layer K-1 (when a strategy needs it)

    @property
    def ragged(self) -> bool:
        return bool((self.n_image != self.n_image[0]).any())

    def choose(self, kept_image: torch.Tensor) -> None:
        self.kept_image = kept_image
        self.kept_mask = kept_token_mask(self.seq_len, self.image_pos, kept_image)
        fill = filler_positions(self.kept_mask, self.image_pos.expand(self.kept_mask.shape[0], -1))
        self.kept_positions = mask_to_positions(self.kept_mask | fill)
        self.fillers = take_positions(fill, self.kept_positions, dim=1) if fill.any() else None

    def owns(self, cache) -> bool:
        return cache is not None and self.cache is not None and self.cache() is cache


@dataclass
class _Cut:
    """A later stage's decision: what it kept, in original image-token indices and sequence
    positions, and where those positions sit in the previous cut's (drop mode gathers there)."""

    agg_layer: int
    kept_image: torch.Tensor  # [B, k]
    kept_mask: torch.Tensor  # [B, S]
    kept_positions: torch.Tensor  # [B, M]
    within: torch.Tensor  # [B, M] indices into the previous cut's kept_positions


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, FastVModel]" = weakref.WeakKeyDictionary()
"""model -> its live FastVModel: two sets of FastV hooks on one model would both fire."""


class FastVModel:
    """A LLaVA model with FastV hooks installed; ``.fastv`` is the live config.

    Call it, ``forward`` or ``generate`` it like the wrapped model. After every prefill:
    ``last_selection_metadata``, ``last_gen_kept_indices`` ``[B, n_kept]`` (sequence
    positions kept) and ``last_gen_attention_mask`` (bool ``[B, S]``, True = kept), under
    the reference implementation's names. ``with apply_fastv(...) as m:`` or ``m.remove()``
    takes every hook off again.
    """

    def __init__(self, model: nn.Module, config: FastVConfig):
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.adapter.check_attention_implementation()
        self.fastv = config
        config.validate(self.adapter.num_layers)
        if _ACTIVE.get(model) is not None:
            raise ValueError("this model already has FastV hooks installed; remove() them first "
                             "(switch settings through .fastv instead of stacking wrappers)")
        self.prompt: _Prompt | None = None
        self.phase: str | None = None  # "prefill" | "decode" | None for the running forward
        self._positions_given = False  # whether the running forward's caller passed position ids
        self._memo: dict = {}
        self._pixels: torch.Tensor | None = None  # what the vision tower last encoded
        self._handles: list = []
        self._install()

    # -- public API ------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    __call__ = forward

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def force_kept(self, indices: torch.Tensor | None) -> None:
        """Use these image-token indices ``[B, keep]`` (or ``[keep]``) instead of ranking."""
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long)
            indices = indices.unsqueeze(0) if indices.dim() == 1 else indices
            self.fastv.keep = int(indices.shape[1])
        self.fastv.kept = indices

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before :func:`apply_fastv`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.prompt, self.phase, self._memo = None, None, {}
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> "FastVModel":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __getattr__(self, name):
        # only reached for names the wrapper lacks: config, device, generation_config, ...
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def last_selection_metadata(self) -> dict | None:
        if self.prompt is None:
            return None
        if self.prompt.selection is not None:
            return self.prompt.selection.metadata()
        return {"method": "given", "alpha": None, "max_head_idx": None, "head_importance": None,
                "kept_indices": self.prompt.given}

    @property
    def last_gen_kept_indices(self) -> torch.Tensor | None:
        """Sequence positions the last layers keep (the schedule's last cut)."""
        if self.prompt is None:
            return None
        return self.prompt.later[-1].kept_positions if self.prompt.later else self.prompt.kept_positions

    @property
    def last_gen_attention_mask(self) -> torch.Tensor | None:
        if self.prompt is None:
            return None
        return self.prompt.later[-1].kept_mask if self.prompt.later else self.prompt.kept_mask

    @property
    def last_stage_kept(self) -> list[torch.Tensor] | None:
        """``[B, keep]`` image-token indices each cut of the schedule kept, first cut first."""
        if self.prompt is None or self.prompt.kept_image is None:
            return None
        return [self.prompt.kept_image] + [cut.kept_image for cut in self.prompt.later]

    @property
    def last_image_attention(self) -> torch.Tensor | None:
        """``[B, H, N]`` float32 last-token attention at layer K-1 that was ranked."""
        return None if self.prompt is None else self.prompt.image_rows

    # -- hooks -----------------------------------------------------------------------------

    def _install(self) -> None:
        adapter = self.adapter
        _ACTIVE[self.model] = self
        self._handles.append(adapter.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        self._handles.append(adapter.model.register_forward_hook(self._after_model, always_call=True))
        self._handles.append(adapter.vision_tower.register_forward_pre_hook(self._on_vision, with_kwargs=True))
        self._handles.append(
            adapter.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True)
        )
        for i, layer in enumerate(adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            self._handles.append(
                adapter.attention(i).register_forward_hook(self._attention_hook(i), with_kwargs=True)
            )

    def _on_model(self, module, args, kwargs):
        """Decide what this forward is: a new prompt (prefill), a decode step, or neither."""
        self._memo = {}
        self.phase = None
        config = self.fastv
        call = self.adapter.model_call(args, kwargs)
        input_ids, cache = call.input_ids, call.cache
        self._positions_given = call.position_ids is not None
        if self.prompt is not None and self.prompt.owns(cache) and self.adapter.cache_length(cache) > 0:
            self.phase = "decode"  # continues as its prefill decided, whatever .fastv says now
            return None
        if not config.use_fast_v:
            self.prompt = None
            return None
        if input_ids is None or (cache is not None and self.adapter.cache_length(cache) > 0):
            self.prompt = None
            return None
        if config.image_start is None and not (input_ids == self.adapter.image_token_id).any():
            self.prompt = None
            return None
        self.adapter.check_attention_implementation()  # set_attn_implementation may have switched it
        self.prompt = self._new_prompt(input_ids, call.attention_mask)
        self.prompt.inputs = kwargs
        self.phase = "prefill"
        return None

    def _after_model(self, module, args, output):
        """Forget the per-forward state, so direct calls of a submodule are never pruned."""
        self.phase, self._memo, self._pixels = None, {}, None

    def _on_vision(self, module, args, kwargs):
        """Remember the pixels being encoded: in generate this runs before the prefill."""
        self._pixels = self.adapter.vision_pixels(args, kwargs)

    def _sample_keys(self, prompt: _Prompt) -> list[int]:
        """Keys of the random control, computed once the image has been encoded."""
        if prompt.keys is None:
            ids = self.fastv.sample_ids  # its length was checked when the prompt began
            if ids is not None:
                prompt.keys = [int(i) for i in ids]
            else:
                prompt.keys = sample_keys(prompt.input_ids, prompt.attention_mask, self._pixels)
        return prompt.keys

    def _select(self, prompt: _Prompt, rows: torch.Tensor, inputs: Mapping[str, torch.Tensor] | None = None,
                method: str | None = None) -> strategies.Selection:
        """Rank ``rows`` ``[B, H, N_max]`` with ``method`` (default: the configured one, with
        its parameters), each element over its own N_b image tokens and its own grid (one
        call for the whole batch when every element has the same N and nothing depends on
        the grid)."""
        config = self.fastv
        method = method or config.method
        params = dict(config.params) if method == config.method else {}
        keys = self._sample_keys(prompt) if method == "random" else None

        def one(r, k, named=None, layout=None):
            return strategies.select(r, method, config.keep, alpha=config.alpha, seed=config.seed,
                                     sample_keys=k, inputs=named, layout=layout, **params)

        by_grid = method in strategies.LAYOUT_METHODS or config.newline == "keep"
        if not prompt.ragged and not by_grid:
            return one(rows, keys, inputs)
        layouts = self.adapter.token_layouts(prompt.inputs or {}, prompt.n_image.tolist()) if by_grid else None
        parts = []
        for b, n in enumerate(prompt.n_image.tolist()):
            r, k = rows[b:b + 1, :, :n], None if keys is None else keys[b:b + 1]
            named = None if inputs is None else {name: probes.take_tokens(v[b:b + 1], name, slice(0, n))
                                                 for name, v in inputs.items()}
            layout, patches = None if layouts is None else layouts[b], None
            if config.newline == "keep" and layout is not None and len(layout.newline):
                idx, layout = layout.patches()  # rank the patch tokens only; newlines are added back
                patches = torch.from_numpy(idx).to(rows.device)
                r = r[..., patches]
                named = None if named is None else {name: probes.take_tokens(v, name, patches)
                                                    for name, v in named.items()}
            sel = one(r, k, named, layout)
            if patches is not None:
                newline = torch.from_numpy(layouts[b].newline).to(rows.device)
                kept = torch.cat([patches[sel.indices[0]], newline]).sort().values[None]
                scores = torch.zeros(1, n, dtype=sel.scores.dtype, device=rows.device)
                sel = replace(sel, indices=kept, scores=scores.index_copy(1, patches, sel.scores))
            parts.append(sel)
        return self._stack(parts)

    @staticmethod
    def _stack(parts: list) -> strategies.Selection:
        """One Selection from per-element ones of different N (scores zero-padded; kept sets
        of different sizes, newlines kept by policy, padded by repeating their first index)."""
        width = max(p.indices.shape[1] for p in parts)
        return strategies.Selection(
            indices=torch.cat([torch.cat([p.indices, p.indices[:, :1].expand(1, width - p.indices.shape[1])], dim=1)
                               for p in parts]),
            scores=torch.nn.utils.rnn.pad_sequence([p.scores[0] for p in parts], batch_first=True),
            max_head=torch.cat([p.max_head for p in parts]),
            head_importance=torch.cat([p.head_importance for p in parts]),
            method=parts[0].method, alpha=parts[0].alpha)

    def _choose_random_at_input(self, prompt: _Prompt) -> None:
        """K = 0: nothing to rank by. ``uniform`` keeps its lattice (as select does at K = 0),
        every other method a per-sample random subset of the image tokens."""
        rows = torch.zeros(prompt.image_pos.shape[0], 1, prompt.image_pos.shape[1])
        method = "uniform" if self.fastv.method == "uniform" else "random"
        prompt.selection = self._select(prompt, rows, method=method)
        prompt.choose(prompt.selection.indices.to(prompt.image_pos.device))

    def _new_prompt(self, input_ids: torch.Tensor, attention_mask=None) -> _Prompt:
        config = self.fastv
        batch, seq_len = input_ids.shape
        if config.image_start is not None:
            image_pos = fixed_image_positions(batch, config.image_start, config.image_tokens, seq_len, input_ids.device)
            n_image = torch.full((batch,), config.image_tokens, device=input_ids.device)
        else:
            image_pos, n_image = padded_image_positions(input_ids, self.adapter.image_token_id)
        config.validate(self.adapter.num_layers, int(n_image.min()))
        given = config.kept
        fan_out = batch
        if given is not None:
            given = torch.as_tensor(given, dtype=torch.long, device=input_ids.device)
            given = given.unsqueeze(0) if given.dim() == 1 else given
            if given.shape[0] not in (1, batch) and batch != 1:
                raise ValueError(f"kept has {given.shape[0]} rows for a batch of {batch}")
            if given.shape[1] != config.keep:
                raise ValueError(f"kept has {given.shape[1]} indices per row but keep is {config.keep}")
            if given.numel() and (given.min() < 0 or (given >= n_image[:, None]).any()):
                raise ValueError(f"kept indices must lie in 0..N-1 (N = {n_image.tolist()} image tokens)")
            fan_out = max(batch, given.shape[0])
            if fan_out != batch and config.agg_layer == 0 and config.mode == "mask":
                raise ValueError("fanning one prompt out to several kept sets needs agg_layer >= 1 in mask mode")
        prompt = _Prompt(seq_len, fan_out, config.agg_layer, config.mode, image_pos, n_image, given=given,
                         query_pos=last_token_positions(attention_mask, batch, seq_len, input_ids.device),
                         input_ids=input_ids, attention_mask=attention_mask)
        if config.sample_ids is not None and len(config.sample_ids) != batch:
            raise ValueError(f"sample_ids has {len(config.sample_ids)} ids for a batch of {batch}")
        prompt.stages = tuple(config.stages)
        if prompt.stages and (prompt.ragged or config.newline == "keep"):
            raise ValueError("a schedule needs one image-token count per batch and newline='prune' "
                             "(batch samples of one N, as capture and eval do)")
        if given is not None:
            prompt.choose(given.sort(dim=1).values)
        return prompt

    def _decide_stage(self, prompt: _Prompt, c: int, module, args, kwargs) -> None:
        """Stage c (1, 2, ...) of the schedule at layer K_c - 1: rank the tokens the previous
        cut kept by this layer's attention in the pruned model, keep stage.keep of them."""
        stage = prompt.stages[c - 1]
        prev_pos = prompt.kept_positions if c == 1 else prompt.later[c - 2].kept_positions
        prev_image = prompt.kept_image if c == 1 else prompt.later[c - 2].kept_image
        batch = prev_pos.shape[0]
        image_pos = prompt.image_pos.expand(batch, -1)
        orig = image_pos.gather(1, prev_image.expand(batch, -1))  # [B, k] sequence positions
        query = prompt.query_pos.expand(batch, -1)
        if prompt.mode == "drop":  # this layer runs on the previous cut's positions
            orig = torch.searchsorted(prev_pos, orig.contiguous())
            query = torch.searchsorted(prev_pos, query.contiguous())
        rows = rows_from_call(self.adapter, module, args, kwargs, query)[:, :, 0, :]
        image_rows = take_positions(rows, orig, dim=2)
        keys = None
        if stage.method == "random":
            keys = self._sample_keys(prompt)
            keys = keys * batch if len(keys) == 1 else keys
        sel = strategies.select(image_rows, stage.method, stage.keep, alpha=stage.alpha, seed=self.fastv.seed + c,
                                sample_keys=keys, **dict(stage.params))
        kept_image = prev_image.expand(batch, -1).gather(1, sel.indices.to(prev_image.device)).sort(dim=1).values
        kept_mask = kept_token_mask(prompt.seq_len, image_pos, kept_image)
        positions = mask_to_positions(kept_mask)
        prompt.later.append(_Cut(stage.agg_layer, kept_image, kept_mask, positions,
                                 torch.searchsorted(prev_pos.contiguous(), positions)))

    def _cut(self, prompt: _Prompt, layer: int) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor, int,
                                                          torch.Tensor]:
        """The cut that governs ``layer``: (memo tag, kept positions, fillers, kept mask, its first
        layer, where its positions sit in what that layer receives)."""
        c = sum(layer >= stage.agg_layer for stage in prompt.stages)
        if c == 0:
            return "", prompt.kept_positions, prompt.fillers, prompt.kept_mask, prompt.agg_layer, \
                prompt.kept_positions
        cut = prompt.later[c - 1]
        return f"s{c}", cut.kept_positions, None, cut.kept_mask, cut.agg_layer, cut.within

    def _attention_hook(self, layer: int):
        def rank_image_tokens(module, args, kwargs, output):
            prompt = self.prompt
            if self.phase == "prefill" and prompt.stages and prompt.kept_mask is not None:
                c = len(prompt.later) + 1  # the next undecided stage
                if c <= len(prompt.stages) and layer == prompt.stages[c - 1].agg_layer - 1:
                    with torch.no_grad():
                        self._decide_stage(prompt, c, module, args, kwargs)
                return None
            if self.phase != "prefill" or prompt.kept_mask is not None or layer != prompt.agg_layer - 1:
                return None
            with torch.no_grad():
                rows = rows_from_call(self.adapter, module, args, kwargs, prompt.query_pos)[:, :, 0, :]
                image_rows = image_attention(rows, prompt.image_pos)
                if prompt.ragged:  # the padding of each row repeats its last token: zero it
                    valid = torch.arange(image_rows.shape[-1], device=rows.device) < prompt.n_image[:, None]
                    image_rows = image_rows * valid[:, None, :]
                prompt.image_rows = image_rows
                needs = strategies.required_inputs(self.fastv.method, **dict(self.fastv.params))
                inputs = None
                if needs:
                    inputs = probes.layer_inputs(self.adapter, module, self.adapter.attention_call(args, kwargs),
                                                 prompt.hidden_in, prompt.image_pos, prompt.n_image,
                                                 prompt.query_pos, prompt.attention_mask, needs)
                prompt.selection = self._select(prompt, image_rows, inputs)
            prompt.choose(prompt.selection.indices.to(prompt.image_pos.device))
            return None

        return rank_image_tokens

    def _memoized(self, key: str, source, compute):
        """Per-forward cache: layers >= K all receive the same mask / RoPE objects."""
        hit = self._memo.get(key)
        if hit is not None and hit[0] is source:
            return hit[1]
        value = compute()
        self._memo[key] = (source, value)
        return value

    def _layer_hook(self, layer: int):
        def prune(module, args, kwargs):
            prompt = self.prompt
            if self.phase == "prefill" and layer == prompt.agg_layer - 1 and prompt.kept_mask is None and any(
                    n in probes.NEEDS_HIDDEN for n in strategies.required_inputs(self.fastv.method,
                                                                                  **dict(self.fastv.params))):
                prompt.hidden_in = self.adapter.layer_call(args, kwargs).hidden_states
            if self.phase is None or layer < prompt.agg_layer:
                return None
            call = self.adapter.layer_call(args, kwargs)
            if self.phase == "prefill" and prompt.cache is None and call.cache is not None:
                prompt.cache = weakref.ref(call.cache)
            if prompt.mode == "drop" and prompt.agg_layer == 0:
                return None  # pruned at the decoder input, see _on_language_model
            if prompt.mode == "mask":
                new = self._mask_layer(layer, prompt, call)
            else:
                new = self._drop_layer(layer, prompt, call)
            return None if new is None else self.adapter.with_layer_call(args, kwargs, new)

        return prune

    def _drop_layer(self, layer, prompt: _Prompt, call):
        tag, kept, fillers, _, first, within = self._cut(prompt, layer)
        mask = call.attention_mask
        if self.phase == "decode":
            if mask is None and fillers is None:
                return None
            # keys in original coordinates: the prompt, then every token generated so far (this
            # layer's cache, not yet updated in this step, holds the kept positions + those)
            kv_len = (mask.shape[-1] if mask is not None else prompt.seq_len + self.adapter.cache_length(prompt.cache(), layer)
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

            return replace(call, attention_mask=self._memoized("mask" + tag, mask, decode_mask))
        if call.position_embeddings is None:
            raise self.adapter.missing("position_embeddings", f"decoder layer {layer}")
        hidden = take_positions(call.hidden_states, within, dim=1) if layer == first else call.hidden_states

        def prefill_mask():
            sliced = slice_mask(mask, kept, kept)
            if fillers is None:
                return sliced
            return mask_fillers(sliced, fillers, kept.shape[1], hidden.dtype, diagonal=True)

        position_ids = call.position_ids
        return replace(
            call, hidden_states=hidden,
            attention_mask=self._memoized("mask" + tag, mask, prefill_mask),
            position_embeddings=self._memoized("rope" + tag, call.position_embeddings[0],
                                               lambda: self.adapter.gather_rope(call.position_embeddings, kept)),
            position_ids=None if position_ids is None else self._memoized(
                "ids" + tag, position_ids, lambda: self.adapter.gather_position_ids(position_ids, kept)),
        )

    def _mask_layer(self, layer, prompt: _Prompt, call):
        mask, hidden = call.attention_mask, call.hidden_states
        q_len = hidden.shape[1]
        if self.phase == "prefill" and layer == prompt.agg_layer and hidden.shape[0] != prompt.batch:
            hidden = hidden.expand(prompt.batch, -1, -1)
        kv_len = prompt.seq_len if self.phase == "prefill" else (
            mask.shape[-1] if mask is not None else self.adapter.cache_length(prompt.cache(), layer) + q_len
        )
        tag, _, _, key_kept, _, _ = self._cut(prompt, layer)
        if kv_len > prompt.seq_len:
            extra = torch.ones(key_kept.shape[0], kv_len - prompt.seq_len, dtype=torch.bool, device=key_kept.device)
            key_kept = torch.cat([key_kept, extra], dim=1)
        new_mask = self._memoized("mask" + tag, mask, lambda: keys_masked_out(mask, key_kept, q_len, hidden.dtype))
        return replace(call, hidden_states=hidden, attention_mask=new_mask)

    def _on_language_model(self, module, args, kwargs):
        """K = 0 in drop mode: prune the decoder's input and give it explicit positions."""
        prompt = self.prompt
        if self.phase == "prefill" and prompt.agg_layer == 0 and prompt.kept_mask is None:
            self._choose_random_at_input(prompt)  # the image is encoded by now
        if self.phase is None or prompt.agg_layer != 0 or prompt.mode != "drop":
            return None
        adapter = self.adapter
        call = adapter.decoder_call(args, kwargs)
        kept, fillers = prompt.kept_positions, prompt.fillers
        embeds, mask2d, position_ids = call.inputs_embeds, call.attention_mask, call.position_ids
        if mask2d is not None and mask2d.dim() != 2:
            raise adapter.missing("a 2D attention mask", "the text decoder at K = 0")
        if self.phase == "prefill":
            if embeds is None:
                raise adapter.missing("inputs_embeds", "the text decoder")
            batch, seq_len = embeds.shape[0], embeds.shape[1]
            if position_ids is None:
                position_ids = adapter.default_position_ids(batch, seq_len, embeds.device)
            if mask2d is None:  # explicit mask: gapped position ids must not look like packed sequences
                mask2d = torch.ones(batch, seq_len, dtype=torch.long, device=embeds.device)
            new_mask = take_positions(mask2d, kept, dim=1)
            if fillers is not None:
                new_mask = new_mask.masked_fill(fillers, 0)
            return adapter.with_decoder_call(args, kwargs, DecoderCall(
                take_positions(embeds, kept, dim=1), None, new_mask,
                adapter.gather_position_ids(position_ids, kept), call.cache))
        q_len = embeds.shape[1] if embeds is not None else call.input_ids.shape[1]
        new_mask = None
        if mask2d is not None:
            prompt_part = take_positions(mask2d[:, : prompt.seq_len], kept, dim=1)
            if fillers is not None:
                prompt_part = prompt_part.masked_fill(fillers, 0)
            new_mask = torch.cat([prompt_part, mask2d[:, prompt.seq_len :]], dim=1)
        elif fillers is not None:
            raise adapter.missing("an attention mask while decoding a batch of different image sizes", "the text decoder")
        new_ids = None
        if not self._positions_given:  # the model counts from its cache, which holds only the kept tokens
            generated = adapter.cache_length(call.cache) - kept.shape[1]
            device = embeds.device if embeds is not None else kept.device
            new_ids = adapter.step_position_ids(prompt.seq_len + generated, q_len, kept.shape[0], mask2d, device)
        return adapter.with_decoder_call(args, kwargs, DecoderCall(None, None, new_mask, new_ids, call.cache))


def apply_fastv(model: nn.Module, config: FastVConfig | Mapping | None = None, **overrides) -> FastVModel:
    """Install FastV on ``model`` (unchanged otherwise); returns the wrapper that owns the hooks."""
    if config is None:
        config = FastVConfig(**overrides)
    elif isinstance(config, Mapping):
        config = FastVConfig.from_dict({**config, **overrides})
    elif overrides:  # apply_fastv(model, cfg, mode="mask"): a copy of cfg with those fields changed
        unknown = sorted(set(overrides) - {f.name for f in fields(FastVConfig)})
        if unknown:
            raise ValueError(f"unknown FastV config key(s) {', '.join(unknown)}")
        config = replace(config, **overrides)
    return FastVModel(model, config)


# ----------------------------------------------------------------------------------------
# Shared-prefix batching (eval): one pass through layers 0..K-1, C kept sets from layer K
# ----------------------------------------------------------------------------------------


@dataclass
class SharedPrefill:
    """The state after :func:`prefill_shared`: C rows ready for greedy decoding.

    logits: ``[C, V]`` next-token logits of every kept set; ``past_key_values``: the cache
    (layers < K expanded to batch C); ``attention_mask``: 2D ``[C, S]``; ``fastv``: the
    wrapper whose hooks must stay installed while decoding (closed by :meth:`close`).
    """

    fastv: FastVModel
    logits: torch.Tensor
    past_key_values: object
    attention_mask: torch.Tensor
    prompt_len: int
    position_state: object = None  # what the adapter needs to place decoded tokens (M-RoPE deltas)

    def close(self) -> None:
        self.fastv.remove()

    def __enter__(self) -> "SharedPrefill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def prefill_shared(
    model: nn.Module, inputs: Mapping, kept_sets: torch.Tensor, agg_layer: int, mode: str = "drop",
    stages: Sequence[Stage] = (),
) -> SharedPrefill:
    """Run one prompt through layers 0..K-1 once, then each of C kept sets from layer K.

    inputs:    the model inputs of ONE sample (batch 1): input_ids, pixel_values, ...
    kept_sets: ``[C, keep]`` image-token indices, one row per configuration.
    The cache of layers < K is expanded to batch C afterwards, so :func:`greedy_decode`
    continues all C rows together.
    """
    kept_sets = torch.as_tensor(kept_sets, dtype=torch.long)
    kept_sets = kept_sets.unsqueeze(0) if kept_sets.dim() == 1 else kept_sets
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"prefill_shared takes one sample (batch 1), got batch {input_ids.shape[0]}")
    n_sets = kept_sets.shape[0]
    config = FastVConfig(agg_layer=agg_layer, keep=int(kept_sets.shape[1]), mode=mode, kept=kept_sets,
                         stages=tuple(stages))
    fastv = apply_fastv(model, config)
    try:
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        adapter = fastv.adapter
        cache = adapter.new_cache()
        position_ids, position_state = adapter.prompt_positions(dict(inputs), attention_mask)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        logits = adapter.next_token_logits(fastv, cache, input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, **extra)
        adapter.repeat_cache(cache, range(agg_layer), n_sets)
    except BaseException:
        fastv.remove()
        raise
    return SharedPrefill(
        fastv=fastv,
        logits=logits.expand(n_sets, -1),
        past_key_values=cache,
        attention_mask=attention_mask.expand(n_sets, -1),
        prompt_len=input_ids.shape[1],
        position_state=position_state,
    )


@torch.no_grad()
def greedy_decode(
    shared: SharedPrefill, max_new_tokens: int, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0
) -> torch.Tensor:
    """Greedy tokens ``[C, T]`` for every row of a :class:`SharedPrefill` (T <= max_new_tokens).

    Rows that emitted an EOS are padded with ``pad_token_id`` afterwards, as ``generate``
    does; decoding stops when every row has finished. Closes nothing: use ``with``.
    """
    eos = torch.tensor([] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), dtype=torch.long)
    logits, mask, cache = shared.logits, shared.attention_mask, shared.past_key_values
    n_rows = logits.shape[0]
    done = torch.zeros(n_rows, dtype=torch.bool, device=logits.device)
    tokens = []
    for step in range(max_new_tokens):
        next_token = logits.argmax(dim=-1)
        next_token = torch.where(done, torch.full_like(next_token, pad_token_id), next_token)
        tokens.append(next_token)
        done = done | torch.isin(next_token, eos.to(next_token.device))
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(n_rows, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        position_ids = shared.fastv.adapter.decode_positions(mask, shared.position_state)
        logits = shared.fastv.adapter.next_token_logits(shared.fastv, cache, input_ids=next_token[:, None],
                                                        attention_mask=mask, position_ids=position_ids)
    return torch.stack(tokens, dim=1) if tokens else torch.zeros(n_rows, 0, dtype=torch.long, device=logits.device)


def shared_greedy_answers(
    model: nn.Module, inputs: Mapping, kept_sets: torch.Tensor, agg_layer: int, max_new_tokens: int,
    eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
) -> torch.Tensor:
    """prefill_shared + greedy_decode in one call; hooks removed afterwards."""
    with prefill_shared(model, inputs, kept_sets, agg_layer) as shared:
        return greedy_decode(shared, max_new_tokens, eos_token_id, pad_token_id)
