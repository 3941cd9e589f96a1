"""Token-selection strategies for FastV-style pruning, as pure functions on tensors.

Everything here works on ``A`` = the attention that the last prompt token paid to each
image token at layer K-1, per head: a float tensor ``[..., H, N]`` (any leading batch
shape). A strategy turns ``A`` (and, for some, named extra inputs, see :data:`INPUTS`)
into a score per image token and keeps the top ``keep``.

Strategies live in a registry (:data:`STRATEGIES`, filled by :func:`register`, one pure
function each). Their kind says how ``keep`` enters:

* ``ranking``: a score per token; the kept sets are the top-k prefixes of one ranking,
  and ``rank(scores)`` *is* that ranking, so ``top_k(rank(scores), k)`` equals the
  selection for every k (the scores of diverse / sink_excluded encode their order);
* ``set``: the kept set depends on ``keep`` and is not prefix-closed (hybrid_uniform);
* ``control``: ignores attention (random, uniform).

Ranking is deterministic: a stable descending sort, so ties go to the lower image-token
index. Each score vector is ranked once (:func:`rank`); every keep count is then a prefix
of that ranking (:func:`top_k`), which is what lets :mod:`fastv_analysis.select` replay
a whole keep grid for the price of one sort.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

ATTENTION_METHODS = ("avg_all_heads", "max_head", "weighted_combination")
"""The methods that rank by the layer K-1 attention."""

CONTROL_METHODS = ("random", "uniform")
"""Controls that ignore attention: the only methods at K = 0, where nothing is ranked."""

METHODS = ATTENTION_METHODS + CONTROL_METHODS
"""The five methods the select/eval stages, the CLI and online pruning replay by default.

Kept at the original five on purpose: ``select.replay`` and ``fastv-analyze select`` /
``demo`` default to this tuple and have no extra inputs to pass, so the new strategies
(which mostly need :data:`INPUTS`) would fail there. :data:`ALL_METHODS` lists them all.
"""

QUERIES = ("last", "text_mean", "all_mean")
"""Which query rows an attention ranking reads (its ``query`` parameter): the last prompt
token (``attention`` itself, FastV's implementation), the mean over the instruction's text
tokens, or the mean over all query tokens (the FastV paper's formulation)."""

QUERY_INPUTS = {"text_mean": "attention_text_mean", "all_mean": "attention_all_mean"}
"""The named input holding the rows of each non-``last`` query."""

INPUTS = {
    "attention_no_rope": "[..., H, N] last-token rows at layer K-1 recomputed without RoPE",
    "attention_text_mean": "[..., H, N] rows averaged over the instruction (text) query tokens",
    "attention_all_mean": "[..., H, N] rows averaged over all query tokens",
    "hidden_norm": "[..., N] L2 norm of the image tokens' hidden states entering layer K-1",
    "sketch": "[..., N, D] seeded random projection of the image tokens' hidden states",
    "embeddings": "[..., N, D] the image tokens as they enter the LLM (post-projector)",
    "dart_image": "[..., N, 2 + D] per image token: prompt position, L1 norm of its layer K-1 key after RoPE, "
                  "final-normed layer K-1 output",
    "dart_text": "[..., T, 1 + D] DART's text pivots (largest key L1 after the image): prompt position, "
                 "final-normed layer K-1 output",
    "instruction": "[..., D] mean of the instruction tokens' L2-normalised LLM-input embeddings (CDPruner's relevance)",
    "attention_raters": "[..., H, N] rows at layer K-1 averaged over SparseVLM's text raters (chosen at layer 0)",
    "hidden_out": "[..., N, D] the image tokens' residual stream entering layer K (layer K-1's output)",
    "vision_attention": "[..., N] per image token, the vision tower's attention at the layer feeding the LLM: "
                        "head-mean CLS row (CLIP), else mean attention received, averaged over merged patches",
    "vision_keys": "[..., N, d] that attention layer's head-averaged keys (averaged over merged patches)",
    "vision_features": "[..., N, D] the features VisPruner de-duplicates: the vision tower's patch output at "
                       "the feature layer (CLIP, pre-projector), else the LLM-input embeddings",
}
"""Named per-sample inputs a strategy may read beyond ``attention`` (same batch shape)."""

KINDS = ("ranking", "set", "control")

WHERE = ("llm", "input", "vision")
"""Where a strategy's criterion is read: ``llm`` at LLM layer K-1 (FastV, DART, ...),
``input`` on the image tokens as they enter the LLM (DivPrune, CDPruner, pooling),
``vision`` inside the vision tower (VisionZip, VisPruner). ``input`` and ``vision``
strategies need no layer-K attention, so they also run at K = 0 (before the LLM)."""

POSITIONS = ("original", "compact")
"""Positions policy of a reduction: ``original`` (FastV's: a kept or merged token keeps the
position of its anchor token, text after the image keeps its positions) or ``compact`` (the
reduced sequence is re-numbered, as the pre-LLM methods' released code does)."""


@dataclass(frozen=True)
class Strategy:
    """A registered strategy.

    name:   the method name passed to :func:`select`.
    kind:   ``ranking`` | ``set`` | ``control`` (see the module docstring).
    params: declared parameters with their defaults (``alpha`` comes from select's
            ``alpha`` argument, the others are keywords of :func:`select`).
    needs:  named inputs (:data:`INPUTS`) it always reads beyond ``attention``; a
            ``query`` or ``base`` parameter may add more, see :func:`required_inputs`.
    doc:    one line: why the strategy exists.
    where:  :data:`WHERE` its criterion is read.
    positions: the authors' positions policy (:data:`POSITIONS`), the default of eval.
    merges: True when its results carry a :class:`Merge` plan (kept tokens are weighted
            means of groups), False for a pure drop.
    fn:     the pure function ``fn(ctx, keep, **params) -> _Result`` (scores, and the
            kept indices for a set or uniform). A ranking may treat ``keep`` as a depth:
            its scores need only rank the first ``keep`` tokens right (None: all N).
    """

    name: str
    kind: str
    params: Mapping[str, object] = field(hash=False)
    needs: tuple[str, ...]
    doc: str
    fn: Callable = field(compare=False, repr=False)
    where: str = "llm"
    positions: str = "original"
    merges: bool = False


STRATEGIES: dict[str, Strategy] = {}
"""Every strategy by name, in registration order."""


def register(name: str, kind: str, *, doc: str, params: Mapping[str, object] | None = None,
             needs: Sequence[str] = (), where: str = "llm", positions: str = "original", merges: bool = False):
    """Decorator adding ``fn`` to :data:`STRATEGIES` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if where not in WHERE or positions not in POSITIONS:
        raise ValueError(f"{name}: where must be one of {WHERE} and positions one of {POSITIONS}")
    unknown = [n for n in needs if n not in INPUTS]
    if unknown:
        raise ValueError(f"{name}: unknown input {unknown[0]!r}: expected one of {', '.join(INPUTS)}")

    def add(fn: Callable) -> Callable:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = Strategy(name, kind, MappingProxyType(dict(params or {})), tuple(needs), doc, fn,
                                    where, positions, merges)
        return fn

    return add


def strategy(name: str) -> Strategy:
    """The registered :class:`Strategy` called ``name``; ValueError listing the valid names."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(STRATEGIES)}") from None


@dataclass(frozen=True)
class Merge:
    """How a merge reduction builds its ``keep`` tokens from the N image tokens.

    Slot j of the reduced image span sits at the position of its anchor token
    ``indices[..., j]`` (the Selection's kept indices, ascending) and holds
    ``sum(weight[t] * x[t] for t with assign[t] == j)``; a token with ``assign == -1``
    contributes to no slot (dropped). A pure drop is ``assign[indices[j]] = j``, weight 1.

    assign: LongTensor ``[..., N]``, each image token's slot in ``0..keep-1`` or -1.
    weight: float ``[..., N]``, each token's weight in its slot (0 where assign is -1).
    """

    assign: torch.Tensor
    weight: torch.Tensor


def merge_tokens(x: torch.Tensor, indices: torch.Tensor, merge: Merge | None) -> torch.Tensor:
    """``[..., keep, D]`` the reduced image tokens of ``x`` ``[..., N, D]``: the kept rows
    (``merge`` None: a drop) or each slot's weighted sum (:class:`Merge`)."""
    if merge is None:
        return x.gather(-2, indices[..., None].expand(*indices.shape, x.shape[-1]))
    keep = indices.shape[-1]
    into = merge.assign.clamp(min=0) + keep * (merge.assign < 0)  # dropped tokens go to a spare slot
    w = (merge.weight * (merge.assign >= 0)).to(x.dtype)[..., None]
    out = torch.zeros(*x.shape[:-2], keep + 1, x.shape[-1], dtype=x.dtype, device=x.device)
    out.scatter_add_(-2, into[..., None].expand(*into.shape, x.shape[-1]), w * x)
    return out[..., :keep, :]


@dataclass(frozen=True)
class Selection:
    """What a strategy chose, with the metadata the reference implementation reported.

    indices:         LongTensor ``[..., keep]``, kept image-token indices, ascending.
    scores:          ``[..., N]``, the score vector that was ranked (hybrid_uniform: its
                     base ranking's scores; uniform: 1 on the lattice, 0 elsewhere).
    max_head:        LongTensor ``[...]``, argmax over heads of the summed image attention
                     of ``attention`` (reported for every method and query, so head
                     statistics never depend on them).
    head_importance: ``[..., H]``, summed attention each head of ``attention`` paid to the image.
    method, alpha:   the strategy; ``alpha`` is None except for weighted_combination (and a
                     strategy whose ``base`` is weighted_combination).
    sample_alpha:    ``[...]`` float64, the per-sample alpha of dynamic_alpha, else None.
    params:          the strategy's resolved parameters (defaults filled in), alpha excluded.
    merge:           a merge strategy's :class:`Merge` plan (slots anchored at ``indices``),
                     None for a drop.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    max_head: torch.Tensor
    head_importance: torch.Tensor
    method: str
    alpha: float | None
    sample_alpha: torch.Tensor | None = None
    params: Mapping[str, object] | None = field(default=None, compare=False)
    merge: Merge | None = None

    def metadata(self) -> dict:
        """The reference implementation's ``last_selection_metadata`` dict."""
        return {
            "method": self.method,
            "alpha": self.alpha,
            "max_head_idx": self.max_head,
            "head_importance": self.head_importance,
            "kept_indices": self.indices,
        }


def validate(attention: torch.Tensor, method: str, keep: int | None = None, alpha: float = 0.5) -> None:
    """Raise a one-line ValueError naming the bad argument; shared by select and replay."""
    strategy(method)
    if not isinstance(attention, torch.Tensor) or attention.dim() < 2:
        shape = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise ValueError(f"attention must be a tensor of shape [..., H, N], got {shape}")
    if not attention.is_floating_point():
        raise ValueError(f"attention must be floating point, got {attention.dtype}")
    if attention.shape[-2] < 1:
        raise ValueError("attention has no heads (H = 0)")
    if not _all_finite(attention):
        raise ValueError("attention contains NaN or infinite values")
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if keep is not None:
        _check_keep(keep, attention.shape[-1])


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``. A NaN or inf element makes the sum NaN or inf, so a finite
    sum proves it in one cheap reduction; only a non-finite sum (possibly overflow of
    finite values) pays for the elementwise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _check_keep(keep: int, n: int) -> None:
    if not (isinstance(keep, int) and 0 <= keep <= n):
        raise ValueError(f"keep must be an integer in 0..{n} (the number of image tokens), got {keep!r}")


def head_importance(attention: torch.Tensor) -> torch.Tensor:
    """``[..., H]``: total attention each head paid to the image tokens."""
    return attention.sum(dim=-1)


def max_head_index(importance: torch.Tensor) -> torch.Tensor:
    """``[...]``: the head with the largest importance; ties go to the lower head index."""
    return importance.argmax(dim=-1)


def _gather_head(attention: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    index = head[..., None, None].expand(*head.shape, 1, attention.shape[-1])
    return attention.gather(-2, index).squeeze(-2)


def attention_scores(attention: torch.Tensor, method: str, alpha: float = 0.5,
                     heads: dict | None = None) -> torch.Tensor:
    """``[..., N]`` score per image token for one of the attention-based methods.

    weighted_combination = alpha * A[h*] + (1 - alpha) * mean of the other heads. At
    alpha = 1/H that is exactly the mean over all heads; a float alpha cannot hold 1/H
    exactly, so alpha within 1e-9 of 1/H is scored as the mean itself and ranks
    bit-identically to avg_all_heads. With H = 1 the other-heads term is zero.
    ``heads``: a dict this function fills with the per-attention pieces (A[h*], the head
    sum), so a replay over many alphas computes them once.
    """
    n_heads = attention.shape[-2]
    if method == "avg_all_heads":
        return attention.mean(dim=-2)
    heads = {} if heads is None else heads
    if "top" not in heads:
        heads["top"] = _gather_head(attention, max_head_index(head_importance(attention)))
    top = heads["top"]
    if method == "max_head":
        return top
    if method != "weighted_combination":
        raise ValueError(f"{method!r} is not an attention-based method")
    if math.isclose(alpha * n_heads, 1.0, rel_tol=0.0, abs_tol=1e-9):
        return attention.mean(dim=-2)
    if n_heads == 1:
        return alpha * top
    if "others" not in heads:
        heads["others"] = (attention.sum(dim=-2) - top) / (n_heads - 1)
    return alpha * top + (1.0 - alpha) * heads["others"]


def random_keys(seed: int, sample_keys: Sequence[int], n_tokens: int) -> torch.Tensor:
    """``[S, N]`` float64 random ranking keys, one independent stream per (seed, sample key).

    The random control must be drawn per sample: one subset reused for every sample
    measures that subset, not random selection. Keying by the sample (not its batch
    position or chunk) makes the draw identical online (:mod:`fastv_analysis.pruning`),
    in the select stage and in any batch, so all of them keep the same random set.
    """
    keys = [int(k) for k in sample_keys]
    if any(k < 0 for k in keys) or int(seed) < 0:
        raise ValueError("seed and sample keys of the random control must be non-negative integers")
    if not keys:
        return torch.zeros(0, n_tokens, dtype=torch.float64)
    return torch.from_numpy(np.stack([np.random.default_rng([int(seed), k]).random(n_tokens) for k in keys]))


def uniform_indices(n_tokens: int, keep: int, layout=None) -> torch.Tensor:
    """``[keep]`` image-token indices spread evenly over the image grid (ascending).

    A lattice of cell centres on the sample's spatial grid (``layout``, a
    :class:`~fastv_analysis.layout.TokenLayout`; default: the square grid of N, 576 =
    24 x 24, or an even stride over the token order when N is not a square), see
    :func:`fastv_analysis.layout.uniform_tokens`. The spatial baseline that attention
    ranking is compared with.
    """
    from .layout import TokenLayout, uniform_tokens

    layout = layout if layout is not None else TokenLayout.for_tokens(n_tokens)
    return torch.from_numpy(uniform_tokens(layout, keep)).long()


def rank(scores: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` image-token indices from best to worst; ties go to the lower index.

    On the CPU, float32 scores without NaN are ranked by :func:`_rank_keys` (the same order
    as the stable descending sort, ~10x faster at N = 2,880); anything else by that sort."""
    if scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape[-1] < 1 << 31 \
            and not scores.requires_grad:
        values = scores.numpy()
        if not np.isnan(values).any():
            return torch.from_numpy(_rank_keys(values))
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _rank_keys(values: np.ndarray) -> np.ndarray:
    """:func:`rank` of float32 ``values`` without NaN: each score's bits made an int32 that
    orders as the floats do (-0.0 read as +0.0, which compares equal to it), reversed, and the
    index in the low 32 bits of one int64 key: distinct keys whose plain sort (numpy's SIMD
    sort) is the score-descending, index-ascending order."""
    bits = (values + np.float32(0.0)).view(np.int32)  # -0.0 + 0.0 = +0.0
    ordered = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # negative floats: the other bits flipped
    keys = ((~ordered).astype(np.int64) << 32) | np.arange(values.shape[-1], dtype=np.int64)
    return np.sort(keys, axis=-1) & np.int64(0xFFFFFFFF)


def top_k(order: torch.Tensor, keep: int) -> torch.Tensor:
    """The first ``keep`` entries of a ranking, returned ascending (``[..., keep]``)."""
    return order[..., :keep].sort(dim=-1).values


def method_scores(
    attention: torch.Tensor,
    method: str,
    alpha: float = 0.5,
    seed: int = 0,
    sample_keys: Sequence[int] | None = None,
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    **params,
) -> torch.Tensor:
    """Score vector ``[..., N]`` of a ranking strategy (a set or ``uniform`` has none).

    ``random`` draws :func:`random_keys` for ``sample_keys`` (one per leading element, by
    default their flat positions 0..S-1, as :func:`fastv_analysis.select.replay` does
    without sample ids); its scores are float64 keys, never rounded to attention's dtype.
    ``inputs`` and ``params`` as in :func:`select`; ``rank`` of the result is the
    strategy's ranking, so ``top_k(rank(scores), keep)`` is :func:`select`'s kept set.
    """
    spec = strategy(method)
    if spec.kind == "set" or method == "uniform":
        hint = "uniform_indices" if method == "uniform" else "select"
        raise ValueError(f"{method!r} has no keep-independent score; use {hint}")
    resolved = _resolve(spec, params)
    _check_inputs(spec, resolved, attention, inputs)
    ctx = _Ctx(attention, inputs or {}, float(alpha), seed, sample_keys)
    return spec.fn(ctx, None, **resolved).scores


def required_inputs(method: str, **params) -> tuple[str, ...]:
    """Names of the :data:`INPUTS` that ``method`` with ``params`` reads, in order."""
    spec = strategy(method)
    resolved = _resolve(spec, params)
    return _required(spec, resolved)


def select(
    attention: torch.Tensor,
    method: str = "avg_all_heads",
    keep: int = 288,
    alpha: float = 0.5,
    *,
    seed: int = 0,
    sample_keys: Sequence[int] | None = None,
    inputs: Mapping[str, torch.Tensor] | None = None,
    layout=None,
    **params,
) -> Selection:
    """Choose ``keep`` of the N image tokens for every leading batch element.

    attention: ``[..., H, N]`` last-prompt-token attention at layer K-1, per head.
    method:    any name in :data:`STRATEGIES`: avg_all_heads (original FastV) | max_head |
               weighted_combination | random (per sample: ``seed`` and ``sample_keys``,
               see :func:`random_keys`) | uniform (even spread over the grid) |
               dynamic_alpha | no_rope | sink_excluded | diverse | hybrid_uniform.
    keep:      number of image tokens to keep, 0..N.
    alpha:     weight of the max head in weighted_combination, in [0, 1].
    inputs:    named extra tensors with ``attention``'s leading batch shape (:data:`INPUTS`);
               a strategy missing one it needs raises a ValueError naming it.
    params:    the strategy's declared parameters (``Strategy.params``), e.g.
               ``query="text_mean"``, ``base="max_head"``, ``sink_ratio=3.0``.
    layout:    the samples' :class:`~fastv_analysis.layout.TokenLayout`, where uniform and
               hybrid_uniform lay their lattice (default: the square grid of N).
    """
    validate(attention, method, keep, alpha)
    return _select_many(attention, method, [keep], alpha, seed, sample_keys, inputs, params, layout)[keep]


def select_keeps(
    attention: torch.Tensor,
    method: str,
    keeps: Sequence[int],
    alpha: float = 0.5,
    *,
    seed: int = 0,
    sample_keys: Sequence[int] | None = None,
    inputs: Mapping[str, torch.Tensor] | None = None,
    layout=None,
    **params,
) -> dict[int, Selection]:
    """:func:`select` for several keep counts at once: ``{keep: Selection}``.

    Rankings and random are scored and ranked once and every keep is a prefix (diverse
    greedily picks only ``max(keeps)`` tokens); uniform and set strategies run per keep.
    The indices equal :func:`select`'s for every keep.
    """
    keeps = list(dict.fromkeys(keeps))
    validate(attention, method, None, alpha)
    for k in keeps:
        _check_keep(k, attention.shape[-1])
    return _select_many(attention, method, keeps, alpha, seed, sample_keys, inputs, params, layout)


def _select_many(attention, method, keeps, alpha, seed, sample_keys, inputs, params, layout=None
                 ) -> dict[int, Selection]:
    spec = STRATEGIES[method]
    resolved = _resolve(spec, params)
    _check_inputs(spec, resolved, attention, inputs)
    importance = head_importance(attention)
    top_head = max_head_index(importance)
    ctx = _Ctx(attention, inputs or {}, float(alpha), seed, sample_keys, layout)
    uses_alpha = method == "weighted_combination" or resolved.get("base") == "weighted_combination"

    def selection(out: _Result, indices: torch.Tensor) -> Selection:
        return Selection(indices=indices, scores=out.scores.to(attention.device), max_head=top_head,
                         head_importance=importance, method=method, alpha=float(alpha) if uses_alpha else None,
                         sample_alpha=out.sample_alpha, params=MappingProxyType(resolved), merge=out.merge)

    if spec.kind == "set" or method == "uniform":
        selections = {}
        for k in keeps:
            out = spec.fn(ctx, k, **resolved)
            selections[k] = selection(out, out.indices)
        return selections
    out = spec.fn(ctx, max(keeps, default=0), **resolved)
    order = rank(out.scores.to(attention.device))
    return {k: selection(out, top_k(order, k)) for k in keeps}


# ----------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class _Ctx:
    attention: torch.Tensor
    inputs: Mapping[str, torch.Tensor]
    alpha: float
    seed: int
    sample_keys: Sequence[int] | None
    layout: object = None  # TokenLayout shared by the batch (uniform lattices), None: square grid of N
    cache: dict = field(default_factory=dict)  # per call: a set strategy's base ranking, shared by its keeps


@dataclass(frozen=True)
class _Result:
    scores: torch.Tensor
    indices: torch.Tensor | None = None  # None: top_k(rank(scores), keep)
    sample_alpha: torch.Tensor | None = None
    merge: Merge | None = None  # a merge strategy's plan (its kind is "set": indices given)


BASES = ATTENTION_METHODS + ("dynamic_alpha", "no_rope")
"""The attention rankings a ``base`` parameter may name."""


def _resolve(spec: Strategy, params: Mapping[str, object]) -> dict:
    """Declared parameters with defaults filled in (alpha excluded: select's argument)."""
    declared = [p for p in spec.params if p != "alpha"]
    for name in params:
        if name not in declared:
            expected = ", ".join(declared) if declared else "none"
            raise ValueError(f"{spec.name} has no parameter {name!r} (declared: {expected})")
    out = {p: params.get(p, spec.params[p]) for p in declared}
    if "query" in out and out["query"] not in QUERIES:
        raise ValueError(f"{spec.name}: query must be one of {', '.join(QUERIES)}, got {out['query']!r}")
    if "base" in out:
        if out["base"] not in BASES:
            raise ValueError(f"{spec.name}: base must be one of {', '.join(BASES)}, got {out['base']!r}")
        if out["base"] == "no_rope" and out.get("query", "last") != "last":
            raise ValueError(f"{spec.name}: base no_rope has last-token rows only, so query must be 'last'")
    if "sink_ratio" in out:
        r = out["sink_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
            raise ValueError(f"{spec.name}: sink_ratio must be a positive finite number, got {r!r}")
    if "uniform_share" in out:
        u = out["uniform_share"]
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 <= float(u) <= 1.0:
            raise ValueError(f"{spec.name}: uniform_share must be in [0, 1], got {u!r}")
    return out


def _required(spec: Strategy, resolved: Mapping[str, object]) -> tuple[str, ...]:
    names = list(spec.needs)
    if resolved.get("base") == "no_rope":
        names.append("attention_no_rope")
    if resolved.get("query", "last") != "last":
        names.append(QUERY_INPUTS[resolved["query"]])
    return tuple(dict.fromkeys(names))


def _check_inputs(spec: Strategy, resolved: Mapping[str, object], attention: torch.Tensor,
                  inputs: Mapping[str, torch.Tensor] | None) -> None:
    """One-line ValueError for a missing, unknown or misshapen named input."""
    inputs = inputs or {}
    for name in inputs:
        if name not in INPUTS:
            raise ValueError(f"unknown input {name!r}: expected one of {', '.join(INPUTS)}")
    batch, (n_heads, n_tokens) = tuple(attention.shape[:-2]), tuple(attention.shape[-2:])
    for name in _required(spec, resolved):
        if name not in inputs or inputs[name] is None:
            raise ValueError(f"{spec.name} needs input {name!r} ({INPUTS[name]}); pass inputs={{{name!r}: ...}}")
        x = inputs[name]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"input {name!r} must be a floating-point tensor")
        if name in ("hidden_norm", "vision_attention"):
            ok = tuple(x.shape) == batch + (n_tokens,)
            want = f"{batch + (n_tokens,)}"
        elif name == "instruction":
            ok = x.dim() == len(batch) + 1 and tuple(x.shape[:-1]) == batch
            want = f"{batch + ('D',)}"
        elif name in ("sketch", "embeddings", "dart_image", "hidden_out", "vision_keys",
                      "vision_features"):
            width = 3 if name == "dart_image" else 1
            ok = x.dim() == len(batch) + 2 and tuple(x.shape[:-1]) == batch + (n_tokens,) and x.shape[-1] >= width
            want = f"{batch + (n_tokens, 'D')}"
        elif name == "dart_text":
            ok = x.dim() == len(batch) + 2 and tuple(x.shape[:-2]) == batch and x.shape[-1] >= 2
            want = f"{batch + ('T', 'D')}"
        else:
            ok = tuple(x.shape) == batch + (n_heads, n_tokens)
            want = f"{batch + (n_heads, n_tokens)}"
        if not ok:
            raise ValueError(f"input {name!r} must have shape {want} to match attention, got {tuple(x.shape)}")
        if not _all_finite(x):
            raise ValueError(f"input {name!r} contains NaN or infinite values")


def _rows(ctx: _Ctx, query: str) -> torch.Tensor:
    """The attention rows ``[..., H, N]`` a ``query`` reads."""
    return ctx.attention if query == "last" else ctx.inputs[QUERY_INPUTS[query]]


def _positional(order: torch.Tensor, dtype: torch.dtype, n: int | None = None) -> torch.Tensor:
    """``[..., n]`` scores whose stable descending sort starts with ``order`` ``[..., d]``:
    n for its first token, n - 1 for the second, ...; tokens not in ``order`` score 0.

    Kept at float32 or wider: bfloat16 cannot hold every integer up to N = 576."""
    dtype = torch.promote_types(dtype, torch.float32)
    depth = order.shape[-1]
    n = depth if n is None else n
    pos = torch.arange(n, n - depth, -1, dtype=dtype, device=order.device).expand(order.shape)
    out = torch.zeros(*order.shape[:-1], n, dtype=dtype, device=order.device)
    return out.scatter_(-1, order, pos)


def _base_scores(ctx: _Ctx, base: str, query: str) -> torch.Tensor:
    """``[..., N]`` scores of an attention ranking used as another strategy's base."""
    if base in ATTENTION_METHODS:
        return attention_scores(_rows(ctx, query), base, ctx.alpha)
    if base == "dynamic_alpha":
        return dynamic_alpha_scores(_rows(ctx, query))[0]
    return ctx.inputs["attention_no_rope"].mean(dim=-2)  # base == "no_rope"


# ----------------------------------------------------------------------------- the original five


def _attention_ranking(method: str) -> Callable:
    def ranking(ctx: _Ctx, keep: int | None, *, query: str) -> _Result:
        return _Result(attention_scores(_rows(ctx, query), method, ctx.alpha))

    ranking.__name__ = method
    ranking.__doc__ = f"{method}: see :func:`attention_scores`; ``query`` picks the rows it reads."
    return ranking


register("avg_all_heads", "ranking", params={"query": "last"},
         doc="Original FastV: mean attention over all heads.")(_attention_ranking("avg_all_heads"))
register("max_head", "ranking", params={"query": "last"},
         doc="Does the single head that attends most to the image rank better than the mean?")(
    _attention_ranking("max_head"))
register("weighted_combination", "ranking", params={"alpha": 0.5, "query": "last"},
         doc="Interpolates max_head (alpha = 1) and avg_all_heads (alpha = 1/H).")(
    _attention_ranking("weighted_combination"))


@register("random", "control", doc="Control: what any ranking must beat; drawn per sample.")
def _random(ctx: _Ctx, keep: int | None) -> _Result:
    """Random ranking keys per sample (:func:`random_keys`), float64."""
    attention = ctx.attention
    batch_shape, n_tokens = attention.shape[:-2], attention.shape[-1]
    count = math.prod(batch_shape)
    keys = range(count) if ctx.sample_keys is None else list(ctx.sample_keys)
    if len(keys) != count:
        raise ValueError(f"random needs one sample key per element: got {len(keys)} for {count}")
    return _Result(random_keys(ctx.seed, keys, n_tokens).reshape(*batch_shape, n_tokens))


@register("uniform", "control", doc="Control: the spatial baseline, an even lattice over the image grid.")
def _uniform(ctx: _Ctx, keep: int | None) -> _Result:
    """:func:`uniform_indices` for every sample; scores are 1 on the lattice, 0 elsewhere."""
    if keep is None:
        raise ValueError("'uniform' has no keep-independent score; use uniform_indices")
    attention = ctx.attention
    batch_shape, n_tokens = attention.shape[:-2], attention.shape[-1]
    lattice = uniform_indices(n_tokens, keep, ctx.layout).to(attention.device)
    scores = torch.zeros(batch_shape + (n_tokens,), dtype=attention.dtype, device=attention.device)
    scores[..., lattice] = 1.0
    return _Result(scores, indices=lattice.expand(*batch_shape, keep).clone())


# ----------------------------------------------------------------------------- new strategies


def dynamic_alpha_scores(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [..., N], alpha [...] float64)`` of dynamic_alpha on rows ``[..., H, N]``.

    alpha = importance[h*] / sum_h importance[h], the max head's share of the image
    attention (float64; in [1/H, 1] for non-negative attention; 1/H when it is all zero).
    scores = alpha * A[h*] + (1 - alpha) * mean of the other heads, in ``rows``' dtype.
    Where alpha is within 1e-9 of 1/H (all heads equally important) the score is the head
    mean itself, bit-identical to avg_all_heads; alpha = 1 (one head holds all the image
    attention, so the others are 0) gives exactly A[h*], i.e. max_head.
    """
    n_heads = rows.shape[-2]
    importance = head_importance(rows)
    h = max_head_index(importance)
    imp = importance.double()
    total = imp.sum(dim=-1)
    top_imp = imp.gather(-1, h[..., None]).squeeze(-1)
    alpha = torch.where(total > 0, top_imp / torch.where(total > 0, total, 1.0), 1.0 / n_heads)
    top = _gather_head(rows, h)
    mean = rows.mean(dim=-2)
    if n_heads == 1:
        return top.clone(), alpha
    a = alpha.to(rows.dtype)[..., None]
    others = (rows.sum(dim=-2) - top) / (n_heads - 1)
    scores = a * top + (1.0 - a) * others
    is_mean = ((alpha * n_heads) - 1.0).abs() <= 1e-9
    return torch.where(is_mean[..., None], mean, scores), alpha


@register("dynamic_alpha", "ranking", params={"query": "last"},
          doc="weighted_combination without a tuned alpha: each sample weights its max head by that head's share.")
def _dynamic_alpha(ctx: _Ctx, keep: int | None, *, query: str) -> _Result:
    """weighted_combination with a per-sample alpha = importance[h*] / sum_h importance[h]
    (see :func:`dynamic_alpha_scores`); equal heads -> avg_all_heads, one dominant head ->
    max_head. The per-sample alpha is reported as ``Selection.sample_alpha``."""
    scores, alpha = dynamic_alpha_scores(_rows(ctx, query))
    return _Result(scores, sample_alpha=alpha)


@register("no_rope", "ranking", needs=("attention_no_rope",),
          doc="FEATHER's diagnosis: RoPE's long-term decay biases the last token towards late image tokens.")
def _no_rope(ctx: _Ctx, keep: int | None) -> _Result:
    """avg_all_heads of ``inputs["attention_no_rope"]``: the layer K-1 last-token rows
    recomputed with the rotary embedding left out, so position no longer decays the score."""
    return _Result(ctx.inputs["attention_no_rope"].mean(dim=-2))


def sink_mask(hidden_norm: torch.Tensor, sink_ratio: float = 5.0) -> torch.Tensor:
    """``[..., N]`` bool: image tokens whose hidden-state norm exceeds ``sink_ratio`` x the
    median norm of that sample's image tokens (the median of an even count is the mean of
    the two middle values). Attention sinks carry huge residual norms and soak up
    attention without carrying content."""
    n = hidden_norm.shape[-1]
    ordered = hidden_norm.sort(dim=-1).values
    median = (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2
    return hidden_norm > sink_ratio * median[..., None]


@register("sink_excluded", "ranking", params={"base": "avg_all_heads", "sink_ratio": 5.0, "query": "last"},
          needs=("hidden_norm",),
          doc="Attention sinks (huge-norm tokens) win attention rankings without carrying content.")
def _sink_excluded(ctx: _Ctx, keep: int | None, *, base: str, sink_ratio: float, query: str) -> _Result:
    """The ``base`` ranking with every sink (:func:`sink_mask` of ``inputs["hidden_norm"]``)
    moved after every non-sink; sinks keep their base order among themselves, so a sink is
    only kept once ``keep`` exceeds the number of non-sinks. Scores are positional (N for
    the first token of the ranking ... 1 for the last), so ``rank(scores)`` is the ranking."""
    base_scores = _base_scores(ctx, base, query)
    order = rank(base_scores)
    sinks = sink_mask(ctx.inputs["hidden_norm"], float(sink_ratio)).to(order.device).gather(-1, order)
    order = order.gather(-1, torch.sort(sinks.to(torch.uint8), dim=-1, stable=True).indices)
    return _Result(_positional(order, base_scores.dtype))


DIVERSE_CHUNK_TOKENS = 16384
"""diverse processes samples in chunks of about this many image tokens (28 samples at
N = 576). Each pick runs a few small ops on a ``[chunk, N]`` tensor, on one thread (the
Gram matrix before them uses all of torch's threads): thousands of tiny parallel regions
stall on a descheduled thread when another process shares the cores (4-20 s instead of
~1 s), and the pick's maximum uses ``torch.max`` (first maximum, like argmax, half its
time here). Measured for 1,000 x 576 at depth 288 on the 2-core host: 0.54 s idle, 1.07 s
beside a busy process (argmax with the pool's threads: 0.70 s / 1.11 s)."""


def diverse_order(base_scores: torch.Tensor, sketch: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """``[..., depth]`` the first ``depth`` (default N) picks of greedy attention-weighted
    max-min diversity (DART / DivPrune style), in pick order.

    First the argmax of ``base_scores`` s; then repeatedly the remaining token i maximising
    ``s[i] * (1 - max_{j chosen} cos(sketch[i], sketch[j]))`` (evaluated as
    ``s[i] - s[i] * maxcos[i]``); ties go to the lower index; a zero sketch row has cosine
    0 with everything. The first ``d`` picks do not depend on ``depth``. Vectorised over
    the batch with one Gram matrix of cosines per sample (float32 or wider); the Python
    loop runs over the picks only.
    """
    batch_shape, n = base_scores.shape[:-1], base_scores.shape[-1]
    depth = n if depth is None else depth
    dtype = torch.promote_types(torch.promote_types(base_scores.dtype, sketch.dtype), torch.float32)
    scores = base_scores.reshape(-1, n).to(dtype)
    unit = torch.nn.functional.normalize(sketch.reshape(-1, n, sketch.shape[-1]).to(dtype), dim=-1)
    count, device = scores.shape[0], scores.device
    order = torch.empty(count, depth, dtype=torch.long, device=device)
    if depth == 0 or count == 0:
        return order.reshape(*batch_shape, depth)
    chunk = max(1, min(count, DIVERSE_CHUNK_TOKENS // max(1, n)))
    gram_buffer = torch.empty(chunk, n, n, dtype=dtype, device=device)  # reused: no page faults per chunk
    for start in range(0, count, chunk):
        s, u = scores[start : start + chunk], unit[start : start + chunk]
        b = s.shape[0]
        gram = torch.bmm(u, u.transpose(1, 2), out=gram_buffer[:b]).view(b * n, n)  # row b*n + j: cos(j, .)
        offset = torch.arange(b, device=device) * n
        open_s = s.clone()  # s, with -inf at chosen tokens so they never win again
        flat = open_s.view(-1)
        # every per-pick tensor is preallocated: fresh large buffers each pick cost page faults
        gain, row = torch.empty_like(s), torch.empty_like(s)
        at = torch.empty(b, dtype=torch.long, device=device)
        picks = order[start : start + b]
        pick = torch.max(s, dim=-1).indices  # first maximum: ties to the lower index
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see DIVERSE_CHUNK_TOKENS: the picks' small ops run best on one thread
        try:
            _greedy_picks(depth, s, open_s, flat, gain, row, gram, offset, picks, pick, at)
        finally:
            torch.set_num_threads(threads)
    return order.reshape(*batch_shape, depth)


def _greedy_picks(depth, s, open_s, flat, gain, row, gram, offset, picks, pick, at) -> None:
    """The pick loop of :func:`diverse_order` for one chunk (buffers preallocated by it)."""
    maxcos, chosen = None, []
    for p in range(depth):
        if p:
            torch.addcmul(open_s, s, maxcos, value=-1.0, out=gain)  # s - s * maxcos, -inf if chosen
            pick = torch.max(gain, dim=-1).indices  # first maximum; max runs ~2x faster than argmax here
        chosen.append(pick)
        torch.add(offset, pick, out=at)
        flat[at] = -math.inf
        if p == 0:
            maxcos = gram.index_select(0, at)
        elif p < depth - 1:
            torch.maximum(maxcos, torch.index_select(gram, 0, at, out=row), out=maxcos)
    torch.stack(chosen, dim=1, out=picks)


@register("diverse", "ranking", params={"base": "avg_all_heads", "query": "last"}, needs=("sketch",),
          doc="Top-attention tokens are redundant; max-min diversity covers more of the image (DART, DivPrune).")
def _diverse(ctx: _Ctx, keep: int | None, *, base: str, query: str) -> _Result:
    """:func:`diverse_order` of the ``base`` scores on ``inputs["sketch"]``; the greedy
    order is the ranking (keeps are its prefixes). Scores are positional: N for the first
    pick, N - 1 for the second, ...; only the first ``keep`` picks are made when a keep is
    given (:func:`select`), the tokens never picked score 0, so ``rank(scores)`` reproduces
    the greedy order wherever it was computed (:func:`method_scores`: all N)."""
    base_scores = _base_scores(ctx, base, query)
    order = diverse_order(base_scores, ctx.inputs["sketch"].to(base_scores.device), keep)
    return _Result(_positional(order, base_scores.dtype, base_scores.shape[-1]))


def uniform_count(keep: int, uniform_share: float) -> int:
    """floor(uniform_share * keep) with a 1e-9 guard against float error (0.29 x 100 = 29)."""
    return min(keep, math.floor(float(uniform_share) * keep + 1e-9))


@register("hybrid_uniform", "set", params={"base": "avg_all_heads", "uniform_share": 0.5, "query": "last"},
          doc="FEATHER: a uniform lattice guarantees coverage that attention ranking alone loses.")
def _hybrid_uniform(ctx: _Ctx, keep: int | None, *, base: str, uniform_share: float, query: str) -> _Result:
    """FEATHER-style: ``u = floor(uniform_share * keep)`` tokens from ``uniform_indices(N, u)``,
    the other ``keep - u`` the top of the ``base`` ranking among the tokens not in that
    lattice. Scores are the base scores (what was ranked); the set is not prefix-closed."""
    if keep is None:
        raise ValueError("'hybrid_uniform' has no keep-independent score; use select")
    if ("base", base, query) not in ctx.cache:
        base_scores = _base_scores(ctx, base, query)
        ctx.cache["base", base, query] = base_scores, rank(base_scores)
    base_scores, order = ctx.cache["base", base, query]
    n = base_scores.shape[-1]
    u = uniform_count(keep, uniform_share)
    lattice = uniform_indices(n, u, ctx.layout).to(base_scores.device)
    outside = torch.ones(n, dtype=torch.bool, device=order.device)
    outside[lattice] = False
    # every row holds the same u lattice tokens, so the rest of each ranking has N - u entries
    rest = order[outside[order]].view(*order.shape[:-1], n - u)[..., : keep - u]
    picked = torch.cat([lattice.expand(*order.shape[:-1], u), rest], dim=-1)
    return _Result(base_scores, indices=picked.sort(dim=-1).values)


# ----------------------------------------------------------------------------- the field's methods

from .methods import MODULES as METHOD_MODULES  # noqa: E402

for _module in METHOD_MODULES:  # one module per method, each registers itself (DivPrune, DART, ...)
    importlib.import_module(f"{__package__}.methods.{_module}")


ALL_METHODS = tuple(STRATEGIES)
"""Every registered strategy, in registration order: the original five first, then
dynamic_alpha, no_rope, sink_excluded, diverse, hybrid_uniform, then the field's methods
(:data:`fastv_analysis.methods.MODULES`' order)."""

RANK_SCORED = ("sink_excluded", "diverse", "divprune", "cdpruner")
"""Rankings whose scores are positions in the ranking, not attention: no tie margin."""

LAYOUT_METHODS = ("uniform", "hybrid_uniform", "pooling")
"""Strategies that lay a lattice on the sample's grid (they take ``layout``)."""
