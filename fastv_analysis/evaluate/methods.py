"""The methods table: every answered configuration side by side with the field's metrics.

One row per method configuration (method, its parameters, K, keep or keep ratio, positions
policy): per benchmark its accuracy, the benchmark's headline (its own metric where it has one,
else accuracy) and the % of the full model's headline it retains; averaged over benchmarks
(``accuracy_avg``: mean of the per-benchmark accuracies; ``retained_avg``: the mean of the
per-benchmark ratios, as VisionZip / DivPrune / CDPruner tables report "Avg."); and the cost:
prefill FLOPs ratio vs ``full`` by FastV's formula alone and with the method's own extra cost
(:func:`fastv_analysis.flops.method_cost`, null where "not counted"), the measured batch-1
prefill time and speed-up (the accuracy table's), and the KV-cache bytes after the prefill.
Cost columns are the mean over benchmarks. Written by eval as ``RUN/eval/methods.parquet``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from .. import flops as flops_mod
from .. import strategies
from .plan import FULL

KEYS = ("agg_layer", "config", "method", "keep", "ratio", "positions")
"""What makes a row: one method configuration."""

COST_COLUMNS = ("flops_ratio", "method_macs", "flops_ratio_total", "flops_ratio_3mlp_total", "prefill_ms",
                "prefill_speedup_vs_full", "kv_cache_bytes", "kv_cache_ratio")


@dataclass(frozen=True)
class ModelDims:
    """The model sizes the cost columns need (an adapter's, plus the vision tower's width)."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    vision_hidden: int | None = None

    @classmethod
    def of(cls, adapter) -> "ModelDims":
        vision = getattr(adapter.model.config, "vision_config", None)
        return cls(adapter.num_layers, adapter.hidden_size, adapter.intermediate_size, adapter.num_heads,
                   adapter.num_kv_heads, adapter.head_dim, adapter.dtype.itemsize,
                   getattr(vision, "hidden_size", None))


def config_params(method: str, alpha, config: str) -> dict:
    """The configuration's parameters: the registry's declared defaults, its alpha, and its
    query (the ``@query`` of its label)."""
    params = dict(strategies.strategy(method).params) if method in strategies.STRATEGIES else {}
    if alpha is not None:
        params["alpha"] = float(alpha)
    head = config.split(" then ")[0]
    if "@" in head and "query" in params:
        params["query"] = head.rsplit("@", 1)[1].split(" ")[0]
    return params


def _cost(g: pl.DataFrame, row: dict, dims: ModelDims) -> dict:
    """The cost columns of one configuration's rows ``g`` (one benchmark)."""
    n_tokens = int(round(float(g["prompt_tokens"].mean())))
    n_image = int(round(float(g["n_image_tokens"].mean())))
    keep = min(int(round(float(g["n_kept"].mean()))), n_image)
    text = int(round(float((g["prompt_tokens"] - g["image_start"] - g["n_image_tokens"]).mean())))
    stages = [(k, kp, m) for k, kp, m in json.loads(g["stages"][0])] if "stages" in g.columns else []
    layer = int(row["agg_layer"])
    macs, formula = 0, "0 (every token kept)"
    if row["method"] != FULL:
        cuts = [(row["method"], n_image, keep, row["params"])] + [
            (m, prev, kp, {}) for (_, kp, m), prev in zip(stages, [keep] + [kp for _, kp, _ in stages])]
        parts = [flops_mod.method_cost(m, flops_mod.CostShape(n, kp, dims.hidden, dims.heads, text, n_tokens,
                                                              dims.vision_hidden, None, p))
                 for m, n, kp, p in cuts]
        macs = None if any(v is None for v, _ in parts) else sum(v for v, _ in parts)
        formula = " + then ".join(f for _, f in parts)
    full = {m: flops_mod.schedule_flops(n_tokens, [], dims.num_layers, dims.hidden, dims.intermediate, m)
            for m in (2, 3)}
    llm = {m: flops_mod.flops_ratio(n_tokens, n_image, keep, dims.num_layers, layer, dims.hidden,
                                    dims.intermediate, [(k, kp) for k, kp, _ in stages], m) for m in (2, 3)}
    kv_args = (dims.num_layers, layer, dims.kv_heads, dims.head_dim, dims.dtype_bytes, [(k, kp) for k, kp, _ in stages])
    kv = flops_mod.kv_cache_bytes(n_tokens, n_image, keep, *kv_args)
    return {"flops_ratio": llm[2], "method_macs": macs, "method_cost": formula,
            "flops_ratio_total": None if macs is None else llm[2] + macs / full[2],
            "flops_ratio_3mlp_total": None if macs is None else llm[3] + macs / full[3],
            "kv_cache_bytes": kv, "kv_cache_ratio": kv / flops_mod.kv_cache_bytes(n_tokens, n_image, n_image, *kv_args)}


def benchmark_rows(pred: pl.DataFrame, accuracy: pl.DataFrame, samples: pl.DataFrame, dims: ModelDims) -> pl.DataFrame:
    """One benchmark's rows: per configuration its accuracy, headline, % of ``full``'s headline
    retained, and cost (``pred``: eval's predictions; ``accuracy``: eval's accuracy table)."""
    pred = pred.join(samples.select("sample_id", "image_start"), on="sample_id", how="left")
    if "positions" not in pred.columns:  # eval before the positions policy: FastV's, original
        pred = pred.with_columns(pl.lit("original").alias("positions"))
    if "ratio" not in pred.columns:
        pred = pred.with_columns(pl.lit(None, dtype=pl.Float64).alias("ratio"))
    acc = accuracy if "ratio" in accuracy.columns else accuracy.with_columns(
        pl.lit(None, dtype=pl.Float64).alias("ratio"))
    headline = "metric_value" if "metric_value" in acc.columns else "accuracy"
    full = acc.filter(pl.col("config") == FULL).select("agg_layer", pl.col(headline).alias("full_headline"))
    acc = acc.join(full, on="agg_layer", how="left")
    rows = []
    for key, g in pred.group_by(list(KEYS), maintain_order=True):
        row = dict(zip(KEYS, key))
        a = acc.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("config") == row["config"],
                       pl.col("keep").eq_missing(row["keep"]), pl.col("ratio").eq_missing(row["ratio"]))
        if a.height != 1:
            raise ValueError(f"methods table: {a.height} accuracy rows for configuration {row['config']!r} at "
                             f"K = {row['agg_layer']}, keep {row['keep']} (expected 1)")
        a = a.row(0, named=True)
        spec = strategies.STRATEGIES.get(row["method"])
        row["params"] = config_params(row["method"], a["alpha"], row["config"])
        rows.append({**row, "alpha": a["alpha"], "params": json.dumps(row["params"], sort_keys=True),
                     "where": spec.where if spec else FULL, "merges": bool(spec and spec.merges),
                     "n": a["n"], "accuracy": a["accuracy"], "headline": a[headline],
                     "retained": 100.0 * a[headline] / a["full_headline"] if a["full_headline"] else None,
                     "prefill_ms": a.get("prefill_ms"), "prefill_speedup_vs_full": a.get("prefill_speedup_vs_full"),
                     **_cost(g, row, dims)})
    floats = ("ratio", "alpha", "prefill_ms", "prefill_speedup_vs_full", "flops_ratio_total", "flops_ratio_3mlp_total",
              "retained")
    return pl.DataFrame(rows, infer_schema_length=None,
                        schema_overrides={"method_macs": pl.Int64, **{c: pl.Float64 for c in floats}})


def methods_table(benchmarks: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """The side-by-side table from each benchmark's :func:`benchmark_rows`: ``accuracy[B]``,
    ``headline[B]``, ``retained[B]`` per benchmark B, ``accuracy_avg`` and ``retained_avg``
    (mean of the per-benchmark values over the benchmarks the configuration has), the cost
    columns averaged over benchmarks; rows sorted by K, budget, then retained_avg descending."""
    if not benchmarks:
        raise ValueError("methods table: no benchmark given")
    ident = [*KEYS, "alpha", "params", "where", "merges"]
    wide = None
    for name, rows in benchmarks.items():
        part = rows.select(*ident, *[pl.col(c).alias(f"{c}[{name}]") for c in ("accuracy", "headline", "retained")])
        wide = part if wide is None else wide.join(part, on=ident, how="full", coalesce=True, nulls_equal=True)
    names = list(benchmarks)
    cost = pl.concat([r.select(*ident, "method_cost", *COST_COLUMNS) for r in benchmarks.values()],
                     how="vertical_relaxed")
    cost = cost.group_by(ident, maintain_order=True).agg(pl.col("method_cost").first(),
                                                         *[pl.col(c).mean() for c in COST_COLUMNS])
    out = wide.with_columns(pl.mean_horizontal([f"accuracy[{b}]" for b in names]).alias("accuracy_avg"),
                            pl.mean_horizontal([f"retained[{b}]" for b in names]).alias("retained_avg"))
    cost = cost.with_columns(*[pl.col(c).round().cast(pl.Int64) for c in ("method_macs", "kv_cache_bytes")])
    out = out.join(cost, on=ident, how="left", nulls_equal=True)
    return out.sort(["agg_layer", "ratio", "keep", "retained_avg"], descending=[False, False, True, True],
                    nulls_last=True)


def benchmark_name(run) -> str:
    """A run's benchmark name in the table: its standard benchmark, else its question file's stem."""
    from pathlib import Path

    return run.config.get("benchmark") or Path(run.config.get("data", "questions")).stem
