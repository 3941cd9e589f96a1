"""What to prune: :class:`FastVConfig` and the later :class:`Stage` s of a schedule, validated in
one line each; the reference implementation's key names (:data:`ALIASES`)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch

from .. import strategies
from ..layout import NEWLINE_POLICIES

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


PDROP_LAYERS = (8, 16, 24)
PDROP_LAMBDA = 0.5
"""PyramidDrop's defaults for LLaVA-1.5-7B (Cooperx521/PyramidDrop@6444f30, README and
scripts/v1_5/pdrop_eval: ``--layer_list '[8,16,24]' --image_token_ratio_list
"[0.5,0.25,0.125]"``): from layer 8, 16, 24 on keep 50 %, 25 %, 12.5 % of the N image tokens
(``int(N * ratio)``), each cut ranking what the previous kept by the last instruction token's
head-mean attention. One difference: the authors rank a cut at layer K with layer K's own
q/k projections applied to layer K-1's output; a :class:`Stage` ranks with layer K-1's attention."""

SPARSEVLM_LAYERS = (3, 7, 16)
SPARSEVLM_KEEPS = (300, 200, 110)
"""SparseVLM v1.0's progressive schedule for "192" on LLaVA-1.5 (Gumpest/SparseVLMs@26a5f48,
score.py: layers 2, 6, 15 keep 300, 200, 110; each reads its own attention and prunes its
output, so K = 3, 7, 16): the first cut is the ``sparsevlm`` strategy (select ``--agg-layers 3
--keep 300``); the later stages run online only and, as every :class:`Stage`, rank by the last
token's head-mean attention, not by the raters, and recycle nothing."""

SCHEDULE_PRESETS = {"pdrop": PDROP_LAYERS, "sparsevlm": SPARSEVLM_LAYERS}
"""Named schedules ``eval --then`` accepts: the stages after the first cut."""


def pyramid_drop(n_image: int, layers: Sequence[int] = PDROP_LAYERS, lam: float = PDROP_LAMBDA,
                 method: str = "avg_all_heads") -> dict:
    """FastVConfig keywords of PyramidDrop for ``n_image`` tokens: the first cut at ``layers[0]``
    keeping ``int(n_image * lam)``, then one :class:`Stage` per later layer keeping
    ``int(n_image * lam ** (i + 1))``; ``apply_fastv(model, **pyramid_drop(576))``."""
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1:
        raise ValueError(f"PyramidDrop layers must be increasing and >= 1, got {list(layers)!r}")
    if not 0.0 < float(lam) <= 1.0:
        raise ValueError(f"PyramidDrop lambda must be in (0, 1], got {lam!r}")
    keeps = [int(n_image * float(lam) ** (i + 1)) for i in range(len(layers))]
    return {"agg_layer": int(layers[0]), "keep": keeps[0], "method": method,
            "stages": tuple(Stage(int(k), kp, method) for k, kp in zip(layers[1:], keeps[1:]))}


def preset_stages(name: str, lam: float = PDROP_LAMBDA) -> list[tuple[int, float, str]]:
    """``eval --then NAME``: the preset's stages after the first cut as ``(K, fraction of the
    previous cut, method)``; pdrop: ``[(16, 0.5, ...), (24, 0.5, ...)]``, after a first cut at
    K = 8 keeping half (select ``--agg-layers 8 --keep-ratio 0.5``)."""
    if name not in SCHEDULE_PRESETS:
        raise ValueError(f"unknown schedule preset {name!r}: expected one of {', '.join(SCHEDULE_PRESETS)}")
    if name == "sparsevlm":  # (7, 200 / 300), (16, 110 / 200)
        return [(k, SPARSEVLM_KEEPS[i + 1] / SPARSEVLM_KEEPS[i], "avg_all_heads")
                for i, k in enumerate(SPARSEVLM_LAYERS[1:])]
    return [(int(k), float(lam), "avg_all_heads") for k in SCHEDULE_PRESETS[name][1:]]


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
    merge:        with ``kept``: the :class:`~fastv_analysis.strategies.Merge` plan of those
                  slots (``assign``/``weight`` ``[B, N]`` or ``[N]``), replaying a merge
                  strategy; None = a drop.
    positions:    positions policy from the cut on (:data:`fastv_analysis.strategies.POSITIONS`):
                  "original" (kept tokens and merged slots keep their anchor token's
                  position) or "compact" (the reduced sequence re-numbered, see
                  :mod:`fastv_analysis.pruning.compact`). Drop mode only.

    A merging strategy (``Strategy.merges``) or a given ``merge`` needs ``mode="drop"``; at
    ``agg_layer=0`` a strategy read before the LLM (``where`` "input" / "vision") ranks the
    decoder's input, any other strategy keeps a random subset there.
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
    merge: strategies.Merge | None = field(default=None, repr=False)
    positions: str = "original"

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
        self._validate_stages(num_layers)
        self._validate_reduction()
        for name in ("image_start", "image_tokens"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")

    @property
    def merges(self) -> bool:
        """Whether the first cut merges tokens: a given merge plan, or a merging strategy ranking."""
        if self.kept is not None:
            return self.merge is not None
        return strategies.strategy(self.method).merges

    def _validate_reduction(self) -> None:
        """The positions policy and merges: drop mode only; a merge plan only with kept sets."""
        if self.positions not in strategies.POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(strategies.POSITIONS)}, got {self.positions!r}")
        if self.merge is not None and self.kept is None:
            raise ValueError("merge (a merge plan) is given with kept (its slots' anchor tokens), not alone")
        if self.merges and self.mode == "mask":
            raise ValueError(f"mode='mask' cannot represent a merge (method {self.method!r} merges tokens into "
                             "slots); use mode='drop'")
        if self.positions == "compact" and self.mode == "mask":
            raise ValueError("positions='compact' re-numbers the reduced sequence, which mode='mask' keeps whole; "
                             "use mode='drop'")
        if self.merges and self.stages:
            raise ValueError("a merge reduction cannot be followed by a schedule's later stages")

    def _validate_stages(self, num_layers: int | None) -> None:
        """Each later cut lies after the previous one, keeps at most what it kept, and ranks by
        attention alone."""
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
