"""Benchmark the select stage: vectorised replay vs the reference-style per-sample loop.

Synthetic cache of 1,000 samples x 32 heads x 576 image tokens (LLaVA-1.5-7B's shape),
3 methods x 11 alphas x 4 keeps = 52 configurations = 52,000 selections with their rows.
Both sides produce the same rows (checked), timed side by side in one run.

Then a timed pass of the registry's newer strategies (dynamic_alpha, no_rope,
sink_excluded, diverse, hybrid_uniform and the text_mean / all_mean query variants of
avg_all_heads) at the same 4 keeps, on synthetic named inputs: no-RoPE / text-mean /
all-mean rows, hidden-state norms with a few planted sinks per sample and a 64-dim sketch.
They run through ``select.replay`` as the select stage does (one ranking per
configuration, every keep a prefix; hybrid_uniform, a set, once per keep; the table with
spatial statistics and tie margins); their kept sets are checked against per-sample
``strategies.select`` calls on a few samples (untimed). Last, the field's methods
(divprune, dart) on synthetic D-dim inputs, timed on their own.

    python benchmarks/bench_select.py [--samples 1000]

Last, the N = 2,880 run (LLaVA-NeXT's most image tokens; ``--large-only`` runs it alone):
every registered strategy through ``select.replay`` on inputs synthesised at that shape.

Targets (2-core machine): replay >= 2x the loop, >= 50,000 selections/s overall (old and
new configurations together), overlap statistics of all pairs of score vectors in < 60 s;
at N = 2,880 >= 10,000 selections/s per strategy (issue 22; not met, see README).
Last line: ``select speed-up: <ratio>x``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl
import torch

from fastv_analysis import stats, strategies
from fastv_analysis.select import overlap, replay, score_configs, selection_ids

METHODS = ["avg_all_heads", "max_head", "weighted_combination"]
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
KEEPS = [288, 192, 128, 64]
NEW_CONFIGS = [
    ("dynamic_alpha", {}),
    ("no_rope", {}),
    ("sink_excluded", {}),
    ("diverse", {}),
    ("hybrid_uniform", {}),
    ("avg_all_heads", {"query": "text_mean"}),
    ("avg_all_heads", {"query": "all_mean"}),
]
SKETCH_DIM = 64
SINKS_PER_SAMPLE = 3


def synthetic_inputs(attention: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Named inputs shaped like a capture's: rows per query, norms with planted sinks, a sketch."""
    n_samples, n_heads, n_tokens = attention.shape

    def rows():
        return torch.softmax(torch.randn(n_samples, n_heads, n_tokens, generator=g) * 2, dim=-1)

    norms = 40.0 + 5.0 * torch.randn(n_samples, n_tokens, generator=g).abs()
    sinks = torch.randint(0, n_tokens, (n_samples, SINKS_PER_SAMPLE), generator=g)
    norms.scatter_(1, sinks, 1000.0)  # ~25x the median: above sink_ratio 5
    return {
        "attention_no_rope": rows(),
        "attention_text_mean": rows(),
        "attention_all_mean": rows(),
        "hidden_norm": norms,
        "sketch": torch.randn(n_samples, n_tokens, SKETCH_DIM, generator=g),
    }


FIELD_METHODS = tuple(m for m in strategies.STRATEGIES if strategies.STRATEGIES[m].fn.__module__.startswith(
    "fastv_analysis.methods."))
"""The field's methods (one module each in fastv_analysis/methods/), timed on their own D-dim inputs."""
"""The field's methods (issue 23): timed on their own, outside the combined target (their
inputs are D-dim embeddings / hidden states, not attention rows)."""


def field_inputs(n_samples: int, n_tokens: int, dim: int, g: torch.Generator, n_heads: int = 32
                 ) -> dict[str, torch.Tensor]:
    """The field methods' inputs at their capture shapes: embeddings, dart's (positions, key L1
    norms, vectors; 4 text pivots), CDPruner's instruction, SparseVLM's rater rows and layer K-1
    output, the vision tower's attention, keys (d = 64) and features."""
    pos = torch.arange(35, 35 + n_tokens, dtype=torch.float32).expand(n_samples, n_tokens)
    image = torch.cat([pos[..., None], torch.rand(n_samples, n_tokens, 1, generator=g) * 100,
                       torch.randn(n_samples, n_tokens, dim, generator=g)], dim=-1)
    text_pos = torch.arange(35 + n_tokens + 3, 35 + n_tokens + 7, dtype=torch.float32).expand(n_samples, 4)
    text = torch.cat([text_pos[..., None], torch.randn(n_samples, 4, dim, generator=g)], dim=-1)
    unit = torch.nn.functional.normalize(torch.randn(n_samples, 12, dim, generator=g), dim=-1)
    return {"embeddings": torch.randn(n_samples, n_tokens, dim, generator=g), "dart_image": image, "dart_text": text,
            "instruction": unit.mean(dim=1),
            "attention_raters": torch.softmax(torch.randn(n_samples, n_heads, n_tokens, generator=g) * 2, dim=-1),
            "hidden_out": torch.randn(n_samples, n_tokens, dim, generator=g),
            "vision_attention": torch.softmax(torch.randn(n_samples, n_tokens, generator=g) * 2, dim=-1),
            "vision_keys": torch.randn(n_samples, n_tokens, 64, generator=g),
            "vision_features": torch.randn(n_samples, n_tokens, dim, generator=g)}


def grid_of(n_tokens: int):
    """The raster grid the lattice and pooling strategies lay out: 24 x 24 at 576, 48 x 60 at 2,880."""
    from fastv_analysis.layout import TokenLayout

    rows = next(r for r in range(int(n_tokens ** 0.5), 0, -1) if n_tokens % r == 0)
    return TokenLayout.grid(rows, n_tokens // rows)


def field_strategies(attention: torch.Tensor, dim: int, g: torch.Generator) -> dict[str, float]:
    """Seconds of select.replay per field method over ``attention``'s samples x KEEPS."""
    inputs = field_inputs(attention.shape[0], attention.shape[-1], dim, g, attention.shape[1])
    layout = grid_of(attention.shape[-1])
    seconds = {}
    for method in FIELD_METHODS:
        given = {k: inputs[k] for k in strategies.required_inputs(method)}
        t0 = time.perf_counter()
        frame = replay(attention, [method], [0.5], KEEPS, inputs=given, layout=layout)
        seconds[method] = time.perf_counter() - t0
        one = {k: v[:1] for k, v in given.items()}
        alone = strategies.select(attention[:1], method, KEEPS[-1], inputs=one, layout=layout).indices[0].tolist()
        got = frame.filter(pl.col("sample_id") == 0, pl.col("keep") == KEEPS[-1])["kept"].to_list()
        assert got == [alone], f"{method}: replay != select"
    return seconds


LARGE_N = 2880
"""LLaVA-NeXT's most image tokens (5 tiles x 576, newlines included): the largest N a select replays."""
LARGE_KEEPS = [1440, 720, 640, 320]
"""50 / 25 / 22.2 / 11.1 % of N = 2,880: the keep ratios of KEEPS at N = 576."""


def every_strategy_at_large_n(n_samples: int, n_heads: int, field_samples: int, dim: int) -> dict[str, float]:
    """Selections/s of select.replay per registered strategy at N = LARGE_N, inputs synthesised
    at that shape (attention rows, norms, sketch; the field methods' D-dim inputs on their own
    ``field_samples``, checked against strategies.select on one sample)."""
    g = torch.Generator().manual_seed(1)
    attention = torch.softmax(torch.randn(n_samples, n_heads, LARGE_N, generator=g) * 2, dim=-1)
    inputs = synthetic_inputs(attention, g)
    extra = field_inputs(field_samples, LARGE_N, dim, g, n_heads)
    layout = grid_of(LARGE_N)
    rates = {}
    for method in strategies.STRATEGIES:
        needs = strategies.required_inputs(method)
        field = any(k not in inputs for k in needs)
        att = attention[:field_samples] if field else attention
        given = {k: extra[k] for k in needs} if field else inputs
        t0 = time.perf_counter()
        frame = replay(att, [method], [0.5], LARGE_KEEPS, inputs=given, layout=layout)
        rates[method] = frame.height / (time.perf_counter() - t0)
        if field:
            one = {k: v[:1] for k, v in given.items()}
            alone = strategies.select(att[:1], method, LARGE_KEEPS[-1], inputs=one, layout=layout).indices[0].tolist()
            got = frame.filter(pl.col("sample_id") == 0, pl.col("keep") == LARGE_KEEPS[-1])["kept"].to_list()
            assert got == [alone], f"{method}: replay != select at N = {LARGE_N}"
    return rates


def label(method: str, params: dict) -> str:
    return method + "".join(f"({k}={v})" for k, v in params.items())


def new_strategies(attention: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Seconds of select.replay (the select stage's path: kept sets, spatial statistics, tie
    margins, the table) per new configuration for all samples x KEEPS; its kept sets checked
    against per-sample strategies.select on 3 samples."""
    seconds = {}
    for method, params in NEW_CONFIGS:
        queries = [params["query"]] if "query" in params else ["last"]
        t0 = time.perf_counter()
        frame = replay(attention, [method], [0.5], KEEPS, queries=queries, inputs=inputs)
        seconds[label(method, params)] = time.perf_counter() - t0
        for s in (0, 1, attention.shape[0] - 1):
            one = {k: v[s] for k, v in inputs.items()}
            for keep in KEEPS:
                alone = strategies.select(attention[s], method, keep, inputs=one, **params).indices.tolist()
                got = frame.filter(pl.col("sample_id") == s, pl.col("keep") == keep)["kept"].to_list()
                assert got == [alone], f"{label(method, params)} keep {keep}: replay != select"
    return seconds


def loop_replay(attention: torch.Tensor) -> pl.DataFrame:
    """One strategies.select call per sample and configuration, as the reference worked."""
    rows = []
    n_tokens = attention.shape[-1]
    for cfg in score_configs(METHODS, ALPHAS):
        for keep in KEEPS:
            for s in range(attention.shape[0]):
                sel = strategies.select(attention[s], cfg.method, keep, alpha=0.5 if cfg.alpha is None else cfg.alpha)
                kept = sel.indices.numpy()[None, :]
                sp = stats.spatial_stats(kept, n_tokens)
                rows.append({
                    "sample_id": s, "config": cfg.label, "keep": keep, "kept": kept[0].astype(np.int32).tolist(),
                    "max_head": int(sel.max_head), "selection_id": selection_ids(kept)[0],
                    "mean_row": float(sp["mean_row"][0]), "bottom_share": float(sp["bottom_share"][0]),
                })
    return pl.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--field-samples", type=int, default=50, help="samples for the field methods")
    parser.add_argument("--field-dim", type=int, default=1024, help="embedding width of the field methods' inputs")
    parser.add_argument("--large-samples", type=int, default=200, help=f"samples of the N = {LARGE_N} run")
    parser.add_argument("--large-field-samples", type=int, default=2,
                        help=f"samples of the field methods in the N = {LARGE_N} run (VisPruner: ~0.1 selections/s)")
    parser.add_argument("--large-only", action="store_true", help=f"only the N = {LARGE_N} run")
    args = parser.parse_args()
    if args.large_only:
        return large_n(args)
    g = torch.Generator().manual_seed(0)
    attention = torch.softmax(torch.randn(args.samples, args.heads, args.tokens, generator=g) * 2, dim=-1)
    n_sel = args.samples * len(score_configs(METHODS, ALPHAS)) * len(KEEPS)
    print(f"cache: {args.samples} samples x {args.heads} heads x {args.tokens} tokens; {n_sel} selections")

    t0 = time.perf_counter()
    fast = replay(attention, METHODS, ALPHAS, KEEPS)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = loop_replay(attention)
    t_slow = time.perf_counter() - t0

    key = ["config", "keep", "sample_id"]
    a, b = fast.sort(key), slow.sort(key)
    assert a["kept"].to_list() == b["kept"].to_list(), "replay and loop disagree"
    assert a["selection_id"].to_list() == b["selection_id"].to_list()

    t0 = time.perf_counter()
    ov = overlap(attention, METHODS, ALPHAS, KEEPS)
    t_overlap = time.perf_counter() - t0

    inputs = synthetic_inputs(attention, g)
    new = new_strategies(attention, inputs)
    n_new_each = args.samples * len(KEEPS)
    t_new = sum(new.values())
    n_all = n_sel + n_new_each * len(new)

    print(f"replay:  {t_fast:7.2f} s  ({n_sel / t_fast:,.0f} selections/s)")
    print(f"loop:    {t_slow:7.2f} s  ({n_sel / t_slow:,.0f} selections/s)")
    print(f"overlap: {t_overlap:7.2f} s  ({ov.height:,} pair rows, all pairs of "
          f"{len(score_configs(METHODS, ALPHAS))} score vectors x {args.samples} samples)")
    print(f"new strategies ({len(new)} configurations x {len(KEEPS)} keeps x {args.samples} samples, "
          f"select.replay):")
    for name, sec in new.items():
        print(f"  {name:36s} {sec:6.2f} s  ({n_new_each / sec:,.0f} selections/s)")
    print(f"  {'all new':36s} {t_new:6.2f} s  ({n_new_each * len(new) / t_new:,.0f} selections/s)")
    print(f"combined: {n_all:,} selections in {t_fast + t_new:.2f} s "
          f"({n_all / (t_fast + t_new):,.0f} selections/s; target >= 50,000)")
    field = field_strategies(attention[: args.field_samples], args.field_dim, g)
    n_field = min(args.samples, args.field_samples) * len(KEEPS)
    print(f"field methods ({min(args.samples, args.field_samples)} samples x {len(KEEPS)} keeps, "
          f"D = {args.field_dim}, select.replay; not in the combined target):")
    for name, sec in field.items():
        print(f"  {name:36s} {sec:6.2f} s  ({n_field / sec:,.0f} selections/s)")
    large_n(args)
    print(f"select speed-up: {t_slow / t_fast:.1f}x")


def large_n(args) -> None:
    """The N = 2,880 run: every registered strategy, selections/s (target >= 10,000 each)."""
    rates = every_strategy_at_large_n(args.large_samples, args.heads, args.large_field_samples, args.field_dim)
    print(f"N = {LARGE_N} ({args.large_samples} samples x {args.heads} heads x keeps {LARGE_KEEPS}; the field methods "
          f"on {args.large_field_samples} samples, D = {args.field_dim}), select.replay, target >= 10,000 selections/s:")
    for method, rate in rates.items():
        print(f"  {method:24s} {rate:10,.0f} selections/s{'' if rate >= 10_000 else '  (below target)'}")


if __name__ == "__main__":
    main()
