"""The select stage: replay every strategy over alpha and keep grids on cached attention.

The core is :func:`replay` on stacked tensors ``[S, H, N]``: each score vector is computed
and ranked once, and every keep count is a prefix of that ranking. :func:`overlap` and
:func:`heads` add the pairwise and per-head statistics; :func:`run_select` streams a run
directory through them chunk by chunk and writes ``RUN/select/``.
"""

from __future__ import annotations

import hashlib
import math
import itertools
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from . import stats, strategies
from .layout import NEWLINE_POLICIES, TokenLayout, uniform_tokens
from .probes import take_tokens
from .store import atomic_write_json, atomic_write_parquet, open_run

DEFAULT_METHODS = strategies.METHODS
CONTROLS = strategies.CONTROL_METHODS

SINK_RATIO = strategies.strategy("sink_excluded").params["sink_ratio"]
"""Sinks in the head statistics are what sink_excluded removes by default."""

TIE_RTOL = {"float32": 1e-6, "float16": 2.0**-10, "bfloat16": 2.0**-7}
"""Relative score gap below which a kept set's boundary is a near-tie, by storage dtype.

float16/bfloat16 round each stored value by up to half a unit in the last place, so two
scores closer than one unit can swap order; float32 rows match the model's own to ~1e-6
(recomputed vs SDPA). A near-tie means the kept set may differ from online FastV's.
"""


@dataclass(frozen=True)
class ScoreConfig:
    """One selection rule: a strategy, its alpha (weighted_combination) and the query rows it
    ranks by (``last``: FastV's last prompt token; ``text_mean`` / ``all_mean``)."""

    method: str
    alpha: float | None = None
    query: str = "last"

    @property
    def label(self) -> str:
        label = self.method if self.alpha is None else f"{self.method}(alpha={self.alpha:g})"
        return label if self.query == "last" else f"{label}@{self.query}"

    @property
    def params(self) -> dict:
        return {} if self.query == "last" else {"query": self.query}

    def inputs(self) -> tuple[str, ...]:
        """The named inputs (:data:`fastv_analysis.strategies.INPUTS`) it reads."""
        return strategies.required_inputs(self.method, **self.params)


def score_configs(methods: Sequence[str], alphas: Sequence[float], queries: Sequence[str] = ("last",)
                  ) -> list[ScoreConfig]:
    """Expand methods x alphas x queries; alpha only varies weighted_combination, the query
    only the strategies that declare one (the controls and no_rope rank no query rows)."""
    out = []
    bad_q = [q for q in queries if q not in strategies.QUERIES]
    if bad_q:
        raise ValueError(f"unknown query {bad_q[0]!r}: expected one of {', '.join(strategies.QUERIES)}")
    for m in methods:
        if m not in strategies.STRATEGIES:
            raise ValueError(f"unknown method {m!r}: expected one of {', '.join(strategies.STRATEGIES)}")
        alpha_grid = [None]
        if m == "weighted_combination":
            if not alphas:
                raise ValueError("weighted_combination needs at least one alpha")
            bad = [a for a in alphas if not 0.0 <= float(a) <= 1.0]
            if bad:
                raise ValueError(f"alpha {bad[0]:g} is outside [0, 1]")
            alpha_grid = [float(a) for a in alphas]
        query_grid = queries if "query" in strategies.strategy(m).params else ["last"]
        out.extend(ScoreConfig(m, a, q) for q in query_grid for a in alpha_grid)
    return list(dict.fromkeys(out))


def selection_ids(kept: np.ndarray, merge: strategies.Merge | None = None) -> list[str]:
    """Stable short hash of each kept set (rows of ``[S, k]``), equal sets -> equal ids; a merge
    plan's assignment and weights enter its hash, so a merge never shares a drop's id."""
    data = np.ascontiguousarray(kept, dtype="<i4")
    if merge is None:
        return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in data] if data.shape[1] else [
            "empty"
        ] * data.shape[0]
    assign = np.ascontiguousarray(merge.assign.reshape(data.shape[0], -1).numpy(), dtype="<i4")
    weight = np.ascontiguousarray(merge.weight.reshape(data.shape[0], -1).float().numpy(), dtype="<f4")
    return [hashlib.blake2b(b"merge" + k.tobytes() + a.tobytes() + w.tobytes(), digest_size=8).hexdigest()
            for k, a, w in zip(data, assign, weight)]


MERGE_COLUMNS = {"merge_assign": pl.List(pl.Int32), "merge_weight": pl.List(pl.Float32)}
"""selections.parquet's merge plan of a merge strategy's row (null for a drop): each image
token's slot (-1: dropped) and its weight in the slot, float32; :func:`row_merge` reads it back."""


def merge_columns(merge: strategies.Merge | None, n_samples: int) -> dict:
    """The :data:`MERGE_COLUMNS` of ``n_samples`` rows of one keep."""
    if merge is None:
        return {name: pl.Series(name, [None] * n_samples, dtype=dtype) for name, dtype in MERGE_COLUMNS.items()}
    assign = merge.assign.reshape(n_samples, -1).numpy().astype(np.int32)
    weight = merge.weight.reshape(n_samples, -1).float().numpy()
    return {"merge_assign": pl.Series("merge_assign", assign).cast(MERGE_COLUMNS["merge_assign"]),
            "merge_weight": pl.Series("merge_weight", weight).cast(MERGE_COLUMNS["merge_weight"])}


def row_merge(row: dict) -> strategies.Merge | None:
    """The merge plan of one selections row (``[N]`` tensors), None for a drop (or a run
    selected before merges were stored)."""
    if row.get("merge_assign") is None:
        return None
    return strategies.Merge(torch.tensor(row["merge_assign"], dtype=torch.long),
                            torch.tensor(row["merge_weight"], dtype=torch.float32))


def config_scores(attention: torch.Tensor, cfg: ScoreConfig, sample_ids: Sequence[int], seed: int,
                  heads: dict | None = None) -> np.ndarray | None:
    """``[S, N]`` score vector of one of the original five methods on the last-token rows,
    None for uniform (a set, not a ranking)."""
    if cfg.method == "uniform":
        return None
    if cfg.method == "random":
        return strategies.random_keys(seed, sample_ids, attention.shape[-1]).numpy()
    return strategies.attention_scores(attention, cfg.method, cfg.alpha if cfg.alpha is not None else 0.5,
                                       heads).numpy()


def _registry_sets(attention, cfg: ScoreConfig, keeps, sample_ids, seed, tie_rtol, inputs, layout=None, merges=None):
    """kept_sets for the strategies beyond the original five, through the registry: a ranking
    of attention scores is scored and sorted once (every keep a prefix, the tie margin from
    the same order), the others (rank-scored, sets) through ``select_keeps``; a merge
    strategy's plan of each keep goes into ``merges[keep]``."""
    n_samples, n_heads, _ = attention.shape
    alpha = 0.5 if cfg.alpha is None else cfg.alpha
    keys = [int(i) for i in sample_ids]
    spec = strategies.strategy(cfg.method)
    if spec.kind != "ranking" or cfg.method in strategies.RANK_SCORED:
        by_keep = strategies.select_keeps(attention, cfg.method, list(keeps), alpha, seed=seed, sample_keys=keys,
                                          inputs=inputs, layout=layout, **cfg.params)
        for keep in keeps:
            if merges is not None and by_keep[keep].merge is not None:
                merges[keep] = by_keep[keep].merge
            yield keep, by_keep[keep].indices.numpy(), None, np.full(n_samples, np.nan), \
                pl.Series("near_tie", [None] * n_samples, dtype=pl.Boolean)
        return
    ranked = strategies.method_scores(attention, cfg.method, alpha, seed, keys, inputs=inputs, **cfg.params)
    scores, order = ranked.double().numpy(), strategies.rank(ranked).numpy()
    head_tie = np.zeros(n_samples, dtype=bool)
    if cfg.method == "dynamic_alpha" and n_heads > 1:  # h* decides its alpha and its head: a flip moves both
        head_tie = head_tie_flags(attention, tie_rtol)
    for keep in keeps:
        margin, near = boundary_gap(scores, order, keep, tie_rtol)
        yield keep, np.sort(order[:, :keep], axis=1), scores, margin, near | head_tie


def head_tie_flags(attention: torch.Tensor, tie_rtol: float) -> np.ndarray:
    """``[S]``: the two largest head sums are within ``tie_rtol``, so which head is h* may
    flip at the stored precision (and with it every set that uses h*)."""
    top2 = np.sort(strategies.head_importance(attention).numpy(), axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) <= tie_rtol * np.abs(top2[:, 1])


def boundary_gap(scores: np.ndarray, order: np.ndarray, keep: int, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """``[S]`` tie margin and near-tie flag of the top-``keep`` sets of a ranking.

    margin = score of the last kept token - score of the first dropped one (NaN at keep 0
    or N): how far the kept set is from swapping a token at its boundary; a near-tie is a
    margin within ``rtol`` of the boundary score. (:func:`kept_sets` also flags max_head /
    weighted_combination rows whose two largest head sums are that close: h* may flip.)
    """
    n_samples, n_tokens = scores.shape
    if not 0 < keep < n_tokens:
        nan = np.full(n_samples, np.nan)
        return nan, np.zeros(n_samples, dtype=bool)
    rows = np.arange(n_samples)
    last = scores[rows, order[:, keep - 1]]
    margin = last - scores[rows, order[:, keep]]
    return margin, margin <= rtol * np.abs(last)


def kept_sets(attention: torch.Tensor, cfg: ScoreConfig, keeps: Sequence[int], sample_ids: Sequence[int], seed: int,
              tie_rtol: float = TIE_RTOL["float32"], layout: TokenLayout | None = None,
              inputs: dict | None = None, heads: dict | None = None, merges: dict | None = None):
    """Yield ``(keep, kept [S, keep], scores or None, tie margin [S], near-tie [S])`` for one
    configuration, ranking once. Margin and flag are NaN / null for the controls (their
    ranking does not come from the stored attention) and for the strategies whose scores
    are ranks (sink_excluded, diverse) or that choose a set per keep (hybrid_uniform).
    ``merges``: a dict receiving a merge strategy's :class:`~fastv_analysis.strategies.Merge`
    per keep (set before that keep is yielded)."""
    n_samples, n_heads, n_tokens = attention.shape
    if cfg.method not in strategies.METHODS or cfg.query != "last":  # through the registry, with inputs
        yield from _registry_sets(attention, cfg, keeps, sample_ids, seed, tie_rtol, inputs, layout, merges)
        return
    heads = {} if heads is None else heads  # per-attention pieces shared by a replay's configurations
    scores = config_scores(attention, cfg, sample_ids, seed, heads)
    order = None if scores is None else strategies.rank(torch.from_numpy(scores)).numpy()
    head_tie = np.zeros(n_samples, dtype=bool)
    uses_max_head = cfg.method == "max_head" or (
        cfg.method == "weighted_combination" and not math.isclose(cfg.alpha * n_heads, 1.0, abs_tol=1e-9))
    if uses_max_head and n_heads > 1:  # which head is h* can flip too: then the whole set changes
        if "head_tie" not in heads:
            heads["head_tie"] = head_tie_flags(attention, tie_rtol)
        head_tie = heads["head_tie"]
    for keep in keeps:
        if order is None:
            lattice = uniform_tokens(layout or TokenLayout.for_tokens(n_tokens), keep)
            kept = np.broadcast_to(lattice, (n_samples, keep))
        else:
            kept = np.sort(order[:, :keep], axis=1)
        if cfg.method in CONTROLS:
            margin, near = np.full(n_samples, np.nan), pl.Series("near_tie", [None] * n_samples, dtype=pl.Boolean)
        else:
            margin, near = boundary_gap(scores, order, keep, tie_rtol)
            near = near | head_tie
        yield keep, kept, scores, margin, near


def _checked(attention: torch.Tensor, keeps: Sequence[int], sample_ids: Sequence[int] | None):
    """Validated float32 attention ``[S, H, N]``, keep counts and sample ids (default 0..S-1)."""
    if attention.dim() != 3:
        raise ValueError(f"attention must be [S, H, N], got shape {tuple(attention.shape)}")
    attention = attention.float()
    strategies.validate(attention, "avg_all_heads")
    keeps = [int(k) for k in keeps]
    for k in keeps:
        if not 0 <= k <= attention.shape[-1]:
            raise ValueError(f"keep {k} is outside 0..{attention.shape[-1]} (image tokens per sample)")
    ids = np.arange(attention.shape[0]) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
    return attention, keeps, ids


def _with_layer(frame: pl.DataFrame, agg_layer: int | None) -> pl.DataFrame:
    if agg_layer is None or not len(frame.columns):
        return frame
    return frame.insert_column(1, pl.lit(int(agg_layer), dtype=pl.Int64).alias("agg_layer"))


def replay(
    attention: torch.Tensor,
    methods: Sequence[str] = DEFAULT_METHODS,
    alphas: Sequence[float] = (0.5,),
    keeps: Sequence[int] = (288, 192, 128, 64),
    seed: int = 0,
    *,
    sample_ids: Sequence[int] | None = None,
    agg_layer: int | None = None,
    tie_rtol: float = TIE_RTOL["float32"],
    objects: tuple[np.ndarray, np.ndarray] | None = None,
    layout: TokenLayout | None = None,
    queries: Sequence[str] = ("last",),
    inputs: dict | None = None,
) -> pl.DataFrame:
    """Selections of every method x alpha x keep for stacked attention ``[S, H, N]``.

    One row per (sample, configuration, keep): ``kept`` (ascending image-token indices),
    ``keep_ratio``, ``max_head``, ``selection_id`` (hash of the kept set), the spatial
    statistics of the kept set, ``tie_margin`` (score gap at the keep boundary, see
    :func:`boundary_gap`) and ``near_tie`` (margin <= ``tie_rtol`` x the boundary score:
    the ranking there is not reliable at the stored precision). ``sample_id`` is the position
    in ``attention`` unless ``sample_ids`` names the samples (then random selections
    depend on the id, not the position, so chunked replays agree with whole ones).
    At ``agg_layer`` 0 only the controls exist and ``max_head`` is null. ``objects``
    (``membership [S, N, M]``, ``valid [S, M]``, see :func:`stats.object_coverage`) adds
    ``object_token_share`` and ``objects_touched``; without it they are NaN. ``layout``:
    the :class:`~fastv_analysis.layout.TokenLayout` the samples share (default: a square
    grid of N); ``uniform``, ``pooling`` and the spatial statistics are defined on it. A merge
    strategy's rows carry its plan in :data:`MERGE_COLUMNS` (null for a drop), ``kept`` being
    its slots' anchor tokens.
    """
    attention, keeps, ids = _checked(attention, keeps, sample_ids)
    n_samples, _, n_tokens = attention.shape
    layout = layout or TokenLayout.for_tokens(n_tokens)
    max_head = strategies.max_head_index(strategies.head_importance(attention)).numpy()
    if agg_layer == 0:
        max_head = pl.Series("max_head", [None] * n_samples, dtype=pl.Int64)
    frames = []
    heads_memo: dict = {}
    for cfg in score_configs(methods, alphas, queries):
        merges: dict = {}
        for keep, kept, _, margin, near in kept_sets(attention, cfg, keeps, ids, seed, tie_rtol, layout, inputs,
                                                     heads_memo, merges):
            plan = merge_columns(merges.get(keep), n_samples)
            frame = {
                "sample_id": ids,
                "method": [cfg.method] * n_samples,
                "alpha": [cfg.alpha] * n_samples,
                "config": [cfg.label] * n_samples,
                "keep": np.full(n_samples, keep),
                "keep_ratio": np.full(n_samples, keep / n_tokens),
                "kept": pl.Series("kept", kept.astype(np.int32)).cast(pl.List(pl.Int32)) if keep else
                pl.Series("kept", [[]] * n_samples, dtype=pl.List(pl.Int32)),
                "max_head": max_head,
                "selection_id": selection_ids(kept, merges.get(keep)),
                **plan,
                **stats.spatial_stats(kept, layout),
                **(stats.object_coverage(kept, *objects) if objects is not None else
                   {"object_token_share": np.full(n_samples, np.nan), "objects_touched": np.full(n_samples, np.nan)}),
                "tie_margin": np.asarray(margin, dtype=np.float64),
                "near_tie": near,
            }
            frames.append(pl.DataFrame(frame, schema_overrides={"alpha": pl.Float64}))
    return _with_layer(pl.concat(frames) if frames else pl.DataFrame(), agg_layer)


def overlap(
    attention: torch.Tensor,
    methods: Sequence[str] = DEFAULT_METHODS,
    alphas: Sequence[float] = (0.5,),
    keeps: Sequence[int] = (288, 192, 128, 64),
    seed: int = 0,
    *,
    sample_ids: Sequence[int] | None = None,
    agg_layer: int | None = None,
    layout: TokenLayout | None = None,
    queries: Sequence[str] = ("last",),
    inputs: dict | None = None,
) -> pl.DataFrame:
    """Pairwise agreement of configurations per sample and keep.

    Intersection size and Jaccard of the kept sets; Kendall's tau and Spearman's rho of
    the two score vectors (keep-independent, so computed once per pair; null where one
    side is ``uniform``, which has a set but no ranking).
    """
    attention, keeps, ids = _checked(attention, keeps, sample_ids)
    n_samples, _, n_tokens = attention.shape
    configs = score_configs(methods, alphas, queries)
    heads_memo: dict = {}
    masks: dict[tuple[ScoreConfig, int], np.ndarray] = {}
    scores: dict[ScoreConfig, np.ndarray | None] = {}
    for cfg in configs:
        for keep, kept, sc, _, _ in kept_sets(attention, cfg, keeps, ids, seed, layout=layout, inputs=inputs,
                                              heads=heads_memo):
            masks[cfg, keep] = stats.kept_mask(kept, n_tokens)
            scores[cfg] = sc
    frames = []
    nan = np.full(n_samples, np.nan)
    for a, b in itertools.combinations(configs, 2):
        if scores[a] is None or scores[b] is None:
            tau, rho = nan, nan
        else:
            tau, rho = stats.kendall_rows(scores[a], scores[b]), stats.spearman_rows(scores[a], scores[b])
        for keep in keeps:
            inter, jac = stats.set_overlap(masks[a, keep], masks[b, keep])
            frames.append(
                pl.DataFrame(
                    {
                        "sample_id": ids,
                        "keep": np.full(n_samples, keep),
                        "config_a": [a.label] * n_samples,
                        "config_b": [b.label] * n_samples,
                        "intersection": inter,
                        "jaccard": jac,
                        "kendall_tau": tau,
                        "spearman": rho,
                    }
                )
            )
    return _with_layer(pl.concat(frames) if frames else pl.DataFrame(), agg_layer)


def heads(attention: torch.Tensor, *, sample_ids: Sequence[int] | None = None, agg_layer: int | None = None,
          hidden_norm: torch.Tensor | None = None) -> pl.DataFrame:
    """Per-sample head statistics (see :func:`fastv_analysis.stats.head_stats`); with the
    image tokens' hidden-state norms ``[S, N]`` also the attention sinks (tokens over
    :data:`SINK_RATIO` x the sample's median norm, :func:`strategies.sink_mask`):
    ``sink_count`` and ``sink_mass``, the share of the head-mean last-token image attention
    they take."""
    attention, _, ids = _checked(attention, [], sample_ids)
    out = pl.DataFrame({"sample_id": ids, **stats.head_stats(strategies.head_importance(attention).numpy())})
    if hidden_norm is not None:
        sinks = strategies.sink_mask(hidden_norm.float(), SINK_RATIO)
        mean = attention.mean(dim=1)
        mass = (mean * sinks).sum(dim=-1) / mean.sum(dim=-1).clamp(min=1e-30)
        out = out.with_columns(pl.Series("sink_count", sinks.sum(dim=-1).numpy().astype(np.int64)),
                               pl.Series("sink_mass", mass.double().numpy()))
    return _with_layer(out, agg_layer)


def summarize_overlap(overlap_frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Mean and 95% t interval over samples of each pair's agreement, per layer and keep (a
    ``--keep-ratio``'s rows per ratio, with ``keep`` null: each sample kept its own count).

    Lazy aggregation (mean, std, count per group), so a run's whole overlap table never
    has to sit in memory; NaN correlations (constant or ``uniform`` scores) are left out.
    """
    from scipy.stats import t as student_t

    lazy = overlap_frame.lazy()
    names = lazy.collect_schema().names()
    if "ratio" in names:  # a ratio's rows keep each sample's own count: one group per ratio, keep null
        lazy = lazy.with_columns(pl.when(pl.col("ratio").is_null()).then(pl.col("keep")).alias("keep"))
    keys = [c for c in ("agg_layer", "keep", "ratio", "config_a", "config_b") if c in names]
    cols = ("intersection", "jaccard", "kendall_tau", "spearman")
    aggs = [pl.len().alias("n")]
    for c in cols:
        v = pl.col(c).cast(pl.Float64).fill_nan(None)
        aggs += [v.mean().alias(f"{c}_mean"), v.std().alias(f"_{c}_std"), v.count().alias(f"_{c}_n")]
    out = lazy.group_by(keys, maintain_order=True).agg(aggs).collect(engine="streaming")
    for c in cols:
        n = out[f"_{c}_n"].to_numpy().astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            half = student_t.ppf(0.975, np.maximum(n - 1, 1)) * out[f"_{c}_std"].fill_null(0.0).to_numpy() / np.sqrt(n)
        half = np.where(n >= 2, half, 0.0)
        mean = out[f"{c}_mean"].to_numpy().astype(float)
        out = out.with_columns(pl.Series(f"{c}_lo", mean - half), pl.Series(f"{c}_hi", mean + half))
    return out.drop([f"_{c}_{x}" for c in cols for x in ("std", "n")])


def object_memberships(run, sample_ids: Sequence[int], n_tokens: int, geometry) -> tuple[np.ndarray, np.ndarray] | None:
    """``(membership [S, N, M], valid [S, M])`` of the samples' ground-truth objects (see
    :func:`stats.object_membership`), token boxes mapped through the processor's resize and
    crop (:mod:`fastv_analysis.grid`); None when the run has no objects."""
    if geometry is None:
        return None
    from .grid import token_boxes, token_grid_for

    rows = run.samples.filter(pl.col("sample_id").is_in(list(sample_ids)))
    by_id = {r["sample_id"]: r for r in rows.select("sample_id", "objects", "image_width", "image_height")
             .iter_rows(named=True)}
    boxes = [by_id[int(i)]["objects"] or [] for i in sample_ids]
    m = max((len(b) for b in boxes), default=0)
    membership = np.zeros((len(sample_ids), n_tokens, m), dtype=bool)
    valid = np.zeros((len(sample_ids), m), dtype=bool)
    for s, sid in enumerate(sample_ids):
        row = by_id[int(sid)]
        if not boxes[s]:
            continue
        w, h = row["image_width"], row["image_height"]
        tokens = token_boxes(np.arange(n_tokens), w, h, geometry, token_grid_for(n_tokens, geometry, w, h))
        membership[s, :, : len(boxes[s])] = stats.object_membership(tokens, np.asarray(boxes[s]))
        valid[s, : len(boxes[s])] = True
    return membership, valid


EMPTY_SCHEMAS = {
    "heads": {"sample_id": pl.Int64, "agg_layer": pl.Int64, "max_head": pl.Int64, "max_head_share": pl.Float64,
              "head_entropy": pl.Float64, "head_gini": pl.Float64},
    "overlap": {"sample_id": pl.Int64, "agg_layer": pl.Int64, "keep": pl.Int64, "config_a": pl.Utf8, "config_b": pl.Utf8,
                "intersection": pl.Int64, "jaccard": pl.Float64, "kendall_tau": pl.Float64, "spearman": pl.Float64,
                "ratio": pl.Float64},
}
"""Tables a select can legitimately leave empty, with the columns readers expect."""


def sample_layouts(samples: pl.DataFrame) -> dict[int, TokenLayout]:
    """sample_id -> its :class:`~fastv_analysis.layout.TokenLayout` (runs captured before
    layouts were recorded: a square grid of N, as they were analysed then)."""
    if "token_cells" not in samples.columns:
        return {int(sid): TokenLayout.for_tokens(int(n))
                for sid, n in samples.select("sample_id", "n_image_tokens").iter_rows()}
    return {int(r["sample_id"]): TokenLayout.from_row(r)
            for r in samples.select("sample_id", "grid_rows", "grid_cols", "token_cells").iter_rows(named=True)}


def with_kept_tokens(selections: pl.DataFrame, patches: np.ndarray, always: np.ndarray) -> pl.DataFrame:
    """Kept sets chosen among ``patches`` (indices into them) as image-token indices, plus
    the tokens kept by policy (``always``: the newline tokens), with their selection ids."""
    kept = [np.sort(np.concatenate([patches[np.asarray(k, dtype=np.int64)], always])).astype(np.int32)
            for k in selections["kept"].to_list()]
    ids = [selection_ids(k[None])[0] for k in kept]
    return selections.with_columns(pl.Series("kept", [k.tolist() for k in kept], dtype=pl.List(pl.Int32)),
                                   pl.Series("selection_id", ids, dtype=selections.schema["selection_id"]))


def _layer_chunks(run, layer: int, chunk_size: int):
    """``(sample_ids, [S, H, N], N, layout)`` chunks of a layer, samples of one layout per
    chunk (anyres tiles and dynamic resolution give each image its own N and grid); K = 0
    has no attention (a placeholder ``[S, 1, N]`` of zeros: only the controls, which ignore
    it, are replayed there)."""
    groups: dict[tuple, list[int]] = {}
    layouts = sample_layouts(run.samples)
    for sid in run.samples["sample_id"].to_list():
        groups.setdefault(layouts[int(sid)].key(), []).append(int(sid))
    for ids in groups.values():
        layout = layouts[ids[0]]
        n = layout.n_tokens
        for i in range(0, len(ids), chunk_size):
            chunk = ids[i : i + chunk_size]
            yield chunk, (run.stack(layer, chunk) if layer > 0 else torch.zeros(len(chunk), 1, n)), n, layout


def _near_tie_summary(path: Path) -> dict:
    """Per configuration label: share of (sample, keep) rows whose boundary is a near-tie."""
    frame = (pl.scan_parquet(path).filter(pl.col("near_tie").is_not_null())
             .group_by("agg_layer", "config").agg(pl.col("near_tie").mean()).sort("agg_layer", "config").collect())
    return {f"K={r['agg_layer']} {r['config']}": round(float(r["near_tie"]), 6) for r in frame.iter_rows(named=True)}


def ratio_keep(ratio: float, n_tokens: int) -> int:
    """R = ratio x N rounded half up, in exact decimal arithmetic (``0.25`` of 58 is 14.5 -> 15;
    ``0.35`` of 10 is 3.5 -> 4, which float ``0.35 * 10`` = 3.4999... would round down)."""
    from fractions import Fraction

    return math.floor(Fraction(repr(float(ratio))) * int(n_tokens) + Fraction(1, 2))


def ratio_label(config: str, ratio: float) -> str:
    """How a ``--keep-ratio`` configuration is named: ``avg_all_heads ratio 0.25`` (its kept
    count is each sample's own, so the label, not ``keep``, tells the configurations apart)."""
    return f"{config} ratio {float(ratio):g}"


def resolve_keeps(keeps: Sequence[int], keep_ratios: Sequence[float], n_tokens: int) -> list[int]:
    """Keep counts, deduplicated, descending: explicit counts (which must fit ``n_tokens``, the
    fewest image tokens of any sample) and the counts of ``keep_ratios`` for a sample of
    ``n_tokens`` image tokens (:func:`ratio_keep`)."""
    for r in keep_ratios:
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"keep ratio {r:g} is outside [0, 1]")
    for k in keeps:
        if not 0 <= int(k) <= n_tokens:
            raise ValueError(f"keep {k} is outside 0..{n_tokens} (image tokens of the run's smallest sample)")
    return sorted({int(k) for k in keeps} | {ratio_keep(r, n_tokens) for r in keep_ratios}, reverse=True)


def with_ratios(frame: pl.DataFrame, keeps: Sequence[int], keep_ratios: Sequence[float], n_tokens: int,
                label_columns: Sequence[str]) -> pl.DataFrame:
    """Rows of a replay over ``resolve_keeps`` split into the ``--keep`` counts' rows (``ratio``
    null) and, for each ratio, a copy of the rows at its count for these samples' ``n_tokens``,
    with ``ratio`` set and the ratio in the ``label_columns`` (:func:`ratio_label`)."""
    if not frame.width:
        return frame
    parts = [frame.filter(pl.col("keep").is_in([int(k) for k in keeps]))
             .with_columns(pl.lit(None, dtype=pl.Float64).alias("ratio"))]
    for r in keep_ratios:
        part = frame.filter(pl.col("keep") == ratio_keep(r, n_tokens))
        parts.append(part.with_columns(pl.lit(float(r)).alias("ratio"),
                                       *(pl.col(c) + ratio_label("", r) for c in label_columns)))
    return pl.concat(parts)


@dataclass
class _SelectPlan:
    """What one select run does, validated before anything is written."""

    layers: list[int]
    methods: list[str]
    alphas: list[float]
    configs: list[ScoreConfig]
    keeps: list[int]
    keep_ratios: list[float]
    queries: list[str]
    needs: list[str]
    newline: str
    seed: int
    tie_rtol: float


def _plan(run, methods, alphas, keeps, keep_ratios, agg_layers, seed, newline, queries) -> _SelectPlan:
    """The validated plan: layers, configurations, keep counts (which must fit the smallest
    sample) and ratios (each sample's own N), the stored inputs the strategies read."""
    layers = list(agg_layers) if agg_layers else run.agg_layers
    for k in layers:
        run.check_layer(k)
    configs = score_configs(methods, alphas, queries)  # validate before touching the disk
    if run.samples.height == 0:
        raise ValueError(f"{run.root} has no captured samples")
    if newline not in NEWLINE_POLICIES:
        raise ValueError(f"--newline-tokens must be one of {', '.join(NEWLINE_POLICIES)}, got {newline!r}")
    layouts = sample_layouts(run.samples)
    budgets = [lay.patches()[1].n_tokens if newline == "keep" else lay.n_tokens for lay in layouts.values()]
    n_tokens = int(min(budgets))  # keep counts must fit every sample (anyres, dynamic resolution: N varies)
    keep_list = resolve_keeps(keeps, (), n_tokens)
    ratios = sorted({float(r) for r in keep_ratios}, reverse=True)
    resolve_keeps((), ratios, n_tokens)  # each sample keeps ratio x its own N
    if not keep_list and not ratios:
        raise ValueError("no keep counts given: pass --keep or --keep-ratio")
    needs = sorted({n for c in configs for n in c.inputs()})
    missing = [n for n in needs if n not in (run.config.get("store") or [])]
    if missing and any(k > 0 for k in layers):
        raise ValueError(f"{run.root}: the chosen strategies need {', '.join(missing)}, which the capture did not "
                         f"store (capture again with --store {','.join(missing)})")
    tie_rtol = TIE_RTOL.get(run.config.get("store_dtype", "float16"), TIE_RTOL["float16"])
    return _SelectPlan(layers, list(methods), [float(a) for a in alphas], configs, keep_list, ratios,
                       list(queries), needs, newline, seed, tie_rtol)


def layer_methods(methods, layer: int, stored: Sequence[str] = ()) -> list[str]:
    """The methods replayed at ``layer``: at K >= 1 all; at K = 0 (no attention) the controls and
    the strategies read before the LLM (``where`` input / vision) whose inputs the capture
    ``stored`` (with a layer K >= 1: embeddings enter layer 0 whatever K)."""
    if layer > 0:
        return list(methods)
    return [m for m in methods if m in CONTROLS or (
        strategies.strategy(m).where != "llm" and set(strategies.required_inputs(m)) <= set(stored))]


def _chunk_inputs(run, plan, layer: int, methods, ids) -> dict | None:
    """The named inputs of a chunk: layer K's; at K = 0 the pre-LLM strategies' inputs (the
    same at every layer: embeddings enter layer 0) read from the first captured layer >= 1."""
    if layer > 0:
        return run.inputs(layer, ids, plan.needs) if plan.needs else None
    needs = sorted({n for m in methods for n in strategies.required_inputs(m)})
    if not needs:
        return None
    stored = run.inputs_layer(0)
    if stored is None:
        raise ValueError(f"{run.root}: {', '.join(methods)} at K = 0 read {', '.join(needs)}, stored with a layer "
                         "K >= 1 only (capture with --agg-layers 0,K --store ...)")
    return run.inputs(stored, ids, needs)


def _chunk_frames(run, plan: _SelectPlan, layer: int, methods, ids, att, n, layout, geometry):
    """(name, frame) of one chunk of samples at one layer: its selections, the overlap of
    every pair of configurations, and (K > 0) head statistics."""
    objects = object_memberships(run, ids, n, geometry)
    inputs = _chunk_inputs(run, plan, layer, methods, ids)
    patches = None
    if plan.newline == "keep" and len(layout.newline):
        merging = [m for m in methods if strategies.strategy(m).merges]
        if merging:
            raise ValueError(f"select --newline keep: {', '.join(merging)} merge every image token (newlines "
                             "included); select them with --newline prune")
        newlines = layout.newline
        patches, layout = layout.patches()
        att = att[..., torch.from_numpy(patches)]
        if inputs is not None:
            inputs = {k: take_tokens(v, k, patches) for k, v in inputs.items()}
        objects = None if objects is None else (objects[0][:, patches], objects[1])
    kw = dict(sample_ids=ids, agg_layer=layer, layout=layout, queries=plan.queries if layer > 0 else ("last",),
              inputs=inputs)
    chunk_keeps = resolve_keeps(plan.keeps, plan.keep_ratios, att.shape[-1])  # ratios of this chunk's own N
    sel = replay(att, methods, plan.alphas, chunk_keeps, plan.seed, tie_rtol=plan.tie_rtol, objects=objects, **kw)
    if patches is not None:
        sel = with_kept_tokens(sel, patches, newlines)
    sel = with_ratios(sel, plan.keeps, plan.keep_ratios, att.shape[-1], ["config"])
    ov = with_ratios(overlap(att, methods, plan.alphas, chunk_keeps, plan.seed, **kw), plan.keeps, plan.keep_ratios,
                     att.shape[-1], ["config_a", "config_b"])
    frames = [("selections", sel), ("overlap", ov)]
    if layer > 0:
        norms = None
        if "hidden_norm" in (run.config.get("store") or []):
            norms = run.inputs(layer, ids, ["hidden_norm"])["hidden_norm"]
            if patches is not None:
                norms = norms[..., patches]
        frames.append(("heads", heads(att, sample_ids=ids, agg_layer=layer, hidden_norm=norms)))
    return frames


def _merge_parts(tmp: Path, parts: dict[str, Path]) -> None:
    """Each table's parts streamed into one parquet file, and the overlap summary."""
    for name, folder in parts.items():
        if any(folder.glob("*.parquet")):
            pl.scan_parquet(folder / "*.parquet").sink_parquet(tmp / f"{name}.parquet")
        else:  # only K = 0 was selected (no heads), or one configuration (no pairs)
            pl.DataFrame(schema=EMPTY_SCHEMAS[name]).write_parquet(tmp / f"{name}.parquet")
    atomic_write_parquet(summarize_overlap(pl.scan_parquet(tmp / "overlap.parquet")), tmp / "overlap_summary.parquet")
    shutil.rmtree(tmp / "parts")


def _select_info(run, plan: _SelectPlan, chunk_size: int, tmp: Path, seconds: float, command) -> dict:
    """select.json: what was selected, from which capture, with which code."""
    from .provenance import capture_fingerprint, versions

    return {
        "stage": "select",
        "methods": plan.methods,
        "alphas": plan.alphas,
        "keeps": plan.keeps,
        "keep_ratios": plan.keep_ratios,
        "keep_ratio_rule": "each sample keeps R = ratio x its own N image tokens (its patch tokens with "
                           "--newline-tokens keep), rounded half up; configurations named '<config> ratio <r>'",
        "agg_layers": plan.layers,
        "seed": plan.seed,
        "chunk_size": chunk_size,
        "newline_tokens": plan.newline,
        "n_samples": run.samples.height,
        "n_configurations": len(plan.configs) * (len(plan.keeps) + len(plan.keep_ratios)),
        "queries": plan.queries,
        "tie_rtol": plan.tie_rtol,
        "near_ties": _near_tie_summary(tmp / "selections.parquet"),
        "capture_fingerprint": capture_fingerprint(run),
        "run_model_fingerprint": run.config.get("model_fingerprint"),
        "run_data_sha256": run.config.get("data_sha256"),
        "seconds": round(seconds, 3),
        "versions": versions(),
        "command": list(command) if command else None,
    }


def run_select(
    run_dir: str | Path,
    methods: Sequence[str],
    alphas: Sequence[float],
    keeps: Sequence[int],
    keep_ratios: Sequence[float] = (),
    agg_layers: Sequence[int] | None = None,
    seed: int = 0,
    chunk_size: int = 256,
    progress: bool = True,
    command: Sequence[str] | None = None,
    newline: str = "prune",
    queries: Sequence[str] = ("last",),
) -> dict:
    """Stream a run directory through replay/overlap/heads and write ``RUN/select/``.

    ``newline``: what the ranking does with ``image_newline`` tokens (LLaVA-NeXT /
    OneVision), see :data:`fastv_analysis.layout.NEWLINE_POLICIES`; with ``keep`` the
    strategies rank the patch tokens only, keeps and ``keep_ratio`` count those, and every
    kept set also holds the sample's newline tokens, as ``apply_fastv(newline="keep")``.

    Only one chunk of attention is in memory at a time; each chunk's rows go to a part
    file, and the parts are merged by polars' streaming engine into the final tables.
    Everything lands under a temporary folder that replaces ``select/`` at the end.
    """
    from tqdm.auto import tqdm

    run = open_run(run_dir)
    plan = _plan(run, methods, alphas, keeps, keep_ratios, agg_layers, seed, newline, queries)
    run.check_parts(full=True)  # a damaged part stops select here, before .select.tmp exists (hashed once)
    final, tmp = run.root / "select", run.root / ".select.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    parts = {name: tmp / "parts" / name for name in ("selections", "overlap", "heads")}
    for p in parts.values():
        p.mkdir(parents=True)
    t0 = time.perf_counter()
    bar = tqdm(total=run.samples.height * len(plan.layers), desc="select", unit="sample", disable=not progress)
    geometry = None
    if "objects" in run.samples.columns and run.samples["objects"].drop_nulls().len():
        from .grid import load_geometry

        geometry = load_geometry(run.config.get("model"))
    i = 0
    stored = (run.config.get("store") or []) if run.inputs_layer(0) is not None else []  # K = 0 reads a K >= 1's
    for layer in plan.layers:
        at_layer = layer_methods(methods, layer, stored)
        if not at_layer:
            bar.update(run.samples.height)
            continue
        for ids, att, n, layout in _layer_chunks(run, layer, chunk_size):
            for name, frame in _chunk_frames(run, plan, layer, at_layer, ids, att, n, layout, geometry):
                if frame.width:  # one configuration (e.g. a single control at K = 0) has no pairs
                    frame.write_parquet(parts[name] / f"{i:06d}.parquet")
            i += 1
            bar.update(len(ids))
    bar.close()
    _merge_parts(tmp, parts)
    info = _select_info(run, plan, chunk_size, tmp, time.perf_counter() - t0, command)
    atomic_write_json(tmp / "select.json", info)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return info
