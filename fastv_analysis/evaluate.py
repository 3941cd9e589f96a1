"""The eval stage: re-run the model with each selection pruned, score, relate to statistics.

The kept sets come from ``RUN/select/selections.parquet``, so capture, select and eval
agree token for token. For each sample, layer and keep count, the distinct kept sets
(``selection_id``) share one pass through layers 0..K-1 and go through layers K.. as one
batch (:func:`fastv_analysis.pruning.prefill_shared`); configurations with the same set
are answered once.

The reference is the ``full`` control: every image token kept, answered through exactly
the same hooks, prefill and greedy decode as the pruned sets, so a change against it is
the pruning and nothing else (capture's own answers, from ``generate``, are only compared
with it: ``eval.json``'s ``full_vs_capture``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from . import flops as flops_mod
from . import stats
from .capture import model_inputs
from .loading import sync_device
from .select import sample_layouts
from .store import atomic_write_bytes, atomic_write_json, atomic_write_parquet, open_run

QUANTILES = 4
STATISTICS = ("jaccard_vs_avg", "max_head_share", "head_entropy", "mean_row", "mean_col", "bottom_share",
              "object_token_share", "objects_touched")
FULL = "full"
"""The unpruned control: keep = N, through the same code path as every pruned set."""
REFERENCE = "avg_all_heads"
"""Original FastV: the second reference of the paired tests."""


@dataclass
class EvalConfig:
    run: str
    agg_layers: list[int] | None = None
    methods: list[str] | None = None
    alphas: list[float] | None = None
    keeps: list[int] | None = None
    max_new_tokens: int | None = None
    device: str = "auto"
    dtype: str | None = None
    limit: int | None = None
    compare_mask: int = 0
    timing_samples: int = 5
    timing_repeats: int = 3
    model: str | None = None
    batch_size: int = 64
    configs: list[str] | None = None  # selection labels ("avg_all_heads@text_mean", ...) to answer; None = all
    keep_ratios: list[float] | None = None  # select --keep-ratio configurations to answer (with keeps: counts)
    then: list[tuple] | None = None  # schedule stages (K, keep count or fraction of the previous cut, method)


def configurations(selections: pl.DataFrame, cfg: EvalConfig, complete=None) -> pl.DataFrame:
    """The selection rows to evaluate, filtered by the flags; one-line error when none match."""
    out = selections
    if cfg.agg_layers:
        missing = sorted(set(cfg.agg_layers) - set(out["agg_layer"].unique().to_list()))
        if missing:
            raise ValueError(f"--agg-layer {missing}: not in {cfg.run}/select/selections.parquet "
                             f"(selected layers: {sorted(out['agg_layer'].unique().to_list())})")
        out = out.filter(pl.col("agg_layer").is_in(cfg.agg_layers))
    where = f"{cfg.run}/select/selections.parquet"
    for flag, column, asked in (("--methods", "method", cfg.methods),
                                ("--alphas", "alpha", [float(a) for a in cfg.alphas or []])):
        present = set(out[column].drop_nulls().unique().to_list())
        missing = [a for a in asked or [] if a not in present]
        if missing:
            raise ValueError(f"{flag} {', '.join(map(str, missing))}: not in {where} "
                             f"(there: {', '.join(map(str, sorted(present)))})")
    if cfg.methods:
        out = out.filter(pl.col("method").is_in(cfg.methods))
    if cfg.configs:
        present = set(out["config"].unique().to_list())
        missing = [c for c in cfg.configs if c not in present]
        if missing:
            raise ValueError(f"--configs {', '.join(missing)}: not in {where} (there: {', '.join(sorted(present))})")
        out = out.filter(pl.col("config").is_in(cfg.configs))
    if cfg.alphas:
        out = out.filter(pl.col("alpha").is_null() | pl.col("alpha").is_in([float(a) for a in cfg.alphas]))
    out = by_budget(out, cfg, where)
    if cfg.limit:
        available = out["sample_id"].unique().sort().to_list()
        first = available[: cfg.limit]
        if complete is not None:  # whole circular groups / MME images, as their metrics need
            first = complete(first, available)
        out = out.filter(pl.col("sample_id").is_in(first))
    if out.height == 0:
        raise ValueError(f"no configuration of {cfg.run}/select/selections.parquet matches the given flags")
    return out


def by_budget(selections: pl.DataFrame, cfg: EvalConfig, where: str) -> pl.DataFrame:
    """The rows of the ``--keep`` counts and ``--keep-ratio`` ratios asked (every row when neither
    is): a ratio's rows keep each sample's own count, so ``--keep`` never picks them."""
    ratio = pl.col("ratio") if "ratio" in selections.columns else pl.lit(None, dtype=pl.Float64)
    if not cfg.keeps and not cfg.keep_ratios:
        return selections
    for flag, column, asked in (("--keep", "keep", cfg.keeps), ("--keep-ratio", "ratio", cfg.keep_ratios)):
        kind = selections.filter(ratio.is_null() if column == "keep" else ratio.is_not_null())
        present = set(kind[column].unique().to_list()) if kind.height else set()
        missing = [a for a in asked or [] if a not in present]
        if missing:
            raise ValueError(f"{flag} {', '.join(f'{a:g}' for a in missing)}: not in {where} "
                             f"(there: {', '.join(f'{a:g}' for a in sorted(present)) or 'none'})")
    return selections.filter((ratio.is_null() & pl.col("keep").is_in(cfg.keeps or []))
                             | ratio.is_in([float(r) for r in cfg.keep_ratios or []]))


def ratio_rows_keep_null(pred: pl.DataFrame) -> pl.DataFrame:
    """A ``--keep-ratio`` configuration is one configuration whatever each sample kept (its count
    stays in ``n_kept``): ``keep`` null in the tables, the ratio in its label and ``ratio``."""
    if "ratio" not in pred.columns:
        return pred
    return pred.with_columns(pl.when(pl.col("ratio").is_null()).then(pl.col("keep")).alias("keep"))


def stage_spec(stage: tuple, keep: int) -> tuple[int, int, str]:
    """``(K, keep, method)`` of one ``--then`` stage for a previous cut that kept ``keep``: a
    float keep in (0, 1] is that fraction of it (rounded), an int a count (at most ``keep``)."""
    k, amount, method = (*stage, "avg_all_heads")[:3]
    count = int(round(float(amount) * keep)) if isinstance(amount, float) else int(amount)
    return int(k), min(count, keep), str(method)


def schedule_text(stages: list[tuple[int, int, str]]) -> str:
    """How a schedule is named in config labels: ``then max_head K=4 keep 32``."""
    return " ".join(f"then {m} K={k} keep {kp}" for k, kp, m in stages)


def with_schedule(selections: pl.DataFrame, then: list[tuple] | None) -> pl.DataFrame:
    """``selections`` plus, for every row with a kept set, the same first cut followed by the
    ``then`` stages (ranked online by the pruned model, so eval gives their exact answer);
    column ``stages`` (JSON ``[[K, keep, method], ...]``, ``[]`` for one cut), labels /
    selection ids that carry the schedule, and ``base_config``: the label of the first cut
    (the configuration itself for one cut)."""
    out = selections.with_columns(pl.lit("[]").alias("stages"), pl.col("config").alias("base_config"))
    if not then:
        return out
    rows = []
    for row in out.iter_rows(named=True):
        if row["keep"] == 0 or row["method"] == FULL:
            continue  # nothing left to rank; the full control stays the unpruned reference
        stages, keep = [], int(row["keep"])
        for stage in then:
            k, keep, method = stage_spec(stage, keep)
            stages.append((k, keep, method))
        if stages[0][0] <= int(row["agg_layer"]):
            raise ValueError(f"--then: stage at K = {stages[0][0]} must come after the first cut at "
                             f"K = {row['agg_layer']}")
        text = schedule_text(stages)
        rows.append({**row, "config": f"{row['config']} {text}", "selection_id": f"{row['selection_id']}|{text}",
                     "stages": json.dumps([list(s) for s in stages])})
    return pl.concat([out, pl.DataFrame(rows, schema=out.schema)]) if rows else out


def _stages(text: str | None):
    from .pruning import Stage

    return [Stage(int(k), int(kp), str(m)) for k, kp, m in json.loads(text or "[]")]


def with_full_control(selections: pl.DataFrame, layouts: dict) -> pl.DataFrame:
    """``selections`` plus one ``full`` row (every image token kept) per sample and layer;
    ``layouts``: sample_id -> its :class:`~fastv_analysis.layout.TokenLayout`."""
    from .select import selection_ids

    base = selections.unique(["sample_id", "agg_layer"], keep="first", maintain_order=True).sort(
        "sample_id", "agg_layer")
    rows = []
    for sid, layer in base.select("sample_id", "agg_layer").iter_rows():
        n = layouts[sid].n_tokens
        kept = np.arange(n)[None]
        rows.append({"sample_id": sid, "agg_layer": layer, "method": FULL, "alpha": None, "config": FULL,
                     "keep": n, "keep_ratio": 1.0, "kept": list(range(n)), "max_head": None,
                     "selection_id": selection_ids(kept)[0],
                     **{k: float(v[0]) for k, v in stats.spatial_stats(kept, layouts[sid]).items()}})
    full = pl.DataFrame(rows, schema_overrides={"alpha": pl.Float64, "max_head": pl.Int64,
                                                "kept": pl.List(pl.Int32)})
    full = full.select([pl.col(c).cast(selections.schema[c]) if c in full.columns
                        else pl.lit(None, dtype=selections.schema[c]).alias(c) for c in selections.columns])
    return pl.concat([selections, full])


def evaluate_sample(loaded, prepared, rows: pl.DataFrame, max_new_tokens: int, mode: str = "drop",
                    batch_size: int = 64):
    """Answer every distinct kept set of one sample; returns ({(agg_layer, selection_id): answer}, timings).

    rows: this sample's selection rows (any layers and keeps). Groups by (layer, keep):
    one shared prefill per group, all its distinct sets decoded together.
    """
    processor = loaded.processor
    inputs = model_inputs(loaded, [prepared])
    answers, timings = {}, []
    groups = []
    if "stages" not in rows.columns:
        rows = rows.with_columns(pl.lit("[]").alias("stages"))
    for (layer, keep, stages), group in rows.group_by(["agg_layer", "keep", "stages"], maintain_order=True):
        distinct = group.unique("selection_id", keep="first", maintain_order=True)
        step = 1 if mode == "mask" and layer == 0 else batch_size  # mask mode cannot fan out the input at K = 0
        groups.extend(((layer, keep, stages), distinct.slice(i, step)) for i in range(0, distinct.height, step))
    for (layer, keep, stages), distinct in groups:
        kept = torch.tensor(distinct["kept"].to_list(), dtype=torch.long)  # newlines kept by policy widen it
        tokens, t0, t1, t2 = pruned_answer_tokens(loaded, inputs, kept, int(layer), max_new_tokens, mode,
                                                  _stages(stages))
        texts = processor.batch_decode(tokens, skip_special_tokens=True)
        answers.update(((int(layer), sid), t.strip()) for sid, t in zip(distinct["selection_id"].to_list(), texts))
        timings.append({"agg_layer": int(layer), "keep": int(keep), "n_sets": distinct.height,
                        "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                        "decode_tokens": int(tokens.shape[1]) * distinct.height})
    return answers, timings


def pruned_answer_tokens(loaded, inputs: dict, kept: torch.Tensor, agg_layer: int, max_new_tokens: int,
                         mode: str = "drop", stages=()):
    """Greedy answer tokens ``[C, T]`` of C kept sets sharing one prefill (each followed by
    the schedule's ``stages``), with the clock readings (start, prefill done, decode done)."""
    from .pruning import greedy_decode, prefill_shared

    eos = loaded.model.generation_config.eos_token_id
    pad = loaded.processor.tokenizer.pad_token_id or 0
    t0 = time.perf_counter()
    with prefill_shared(loaded.model, inputs, kept, agg_layer, mode=mode, stages=stages) as shared:
        sync_device(loaded.device)
        t1 = time.perf_counter()
        tokens = greedy_decode(shared, max_new_tokens, eos, pad)
        sync_device(loaded.device)
    return tokens, t0, t1, time.perf_counter()


@torch.no_grad()
def time_configurations(loaded, prepared, rows: pl.DataFrame, max_new_tokens: int, repeats: int = 3,
                        warmup: int = 1, seed: int = 0) -> list[dict]:
    """Wall time of each configuration of one sample on its own (batch 1), ``full`` included.

    The shared-prefix batching that answers the configurations mixes their costs; these
    separate runs are what a deployed pruned model would take. ``warmup`` untimed passes
    over every configuration first (allocator, kernels, caches), then ``repeats`` timed
    passes, each in a fresh seeded order, so drift and position effects fall on every
    configuration alike. One row per (configuration, repeat).
    """
    inputs = model_inputs(loaded, [prepared])
    configs = rows.unique(["agg_layer", "config", "keep"], keep="first", maintain_order=True).to_dicts()
    rng = np.random.default_rng([seed, int(prepared.sample_id)])

    def run(row):
        kept = torch.tensor([row["kept"]], dtype=torch.long).reshape(1, -1)
        return pruned_answer_tokens(loaded, inputs, kept, int(row["agg_layer"]), max_new_tokens,
                                    stages=_stages(row.get("stages")))

    for _ in range(warmup):
        for row in configs:
            run(row)
    out = []
    for rep in range(repeats):
        for i in rng.permutation(len(configs)):
            row = configs[i]
            tokens, t0, t1, t2 = run(row)
            keep = None if row.get("ratio") is not None else int(row["keep"])  # see ratio_rows_keep_null
            out.append({"agg_layer": int(row["agg_layer"]), "config": row["config"], "keep": keep,
                        "repeat": rep, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                        "decode_tokens": int(tokens.shape[1])})
    return out


def _pairs(g: pl.DataFrame, ref: pl.DataFrame, what: str) -> pl.DataFrame:
    """``g``'s rows joined with the reference configuration's ``correct`` (``ref``) on
    sample_id: one pair per sample, or an error naming the reference that repeats one."""
    dup = ref.group_by("sample_id").len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(f"the {what} reference has {dup['len'][0]} rows for sample_id {dup['sample_id'][0]}: "
                         f"a paired test needs exactly one")
    return g.join(ref.select("sample_id", pl.col("correct").alias("ref")), on="sample_id")


def _paired_tests(g: pl.DataFrame, ref: pl.DataFrame | None, what: str) -> tuple[float | None, float | None, pl.DataFrame]:
    """(exact McNemar p, the unit-level test's p, the pairs) of a configuration against a
    reference configuration on the samples both answered; Nones when there is no reference."""
    if ref is None or ref.height == 0:
        return None, None, g.clear()
    pairs = _pairs(g, ref, what)
    if pairs.height == 0:
        return None, None, pairs
    a, b = pairs["correct"].to_numpy(), pairs["ref"].to_numpy()
    return stats.mcnemar_exact(a, b), stats.paired_unit_test(a, b, pairs["unit"].to_numpy()), pairs


P_COLUMNS = ("mcnemar_p_vs_full", "mcnemar_p_vs_avg", "mcnemar_p_vs_random",
             "unit_p_vs_full", "unit_p_vs_avg", "unit_p_vs_random")
CONTROL = "random"
"""The control every strategy must beat: the per-sample random subset at the same keep."""


def with_adjusted(frame: pl.DataFrame, columns) -> pl.DataFrame:
    """Add ``<col>_holm`` and ``<col>_bh`` next to each p-value column.

    The family of a column is every test in it (all layers, keeps and configurations of
    the table): Holm controls the chance of any false positive among them,
    Benjamini-Hochberg the expected share of false positives among the rejections.
    """
    out = frame
    for c in columns:
        p = out[c].cast(pl.Float64).fill_null(np.nan).to_numpy()
        out = out.with_columns(pl.Series(f"{c}_holm", stats.holm(p)).fill_nan(None),
                               pl.Series(f"{c}_bh", stats.benjamini_hochberg(p)).fill_nan(None))
    return out


def with_units(pred: pl.DataFrame) -> pl.DataFrame:
    """``pred`` with a ``unit`` column: as given, or every sample its own unit."""
    return pred if "unit" in pred.columns else pred.with_columns(pl.col("sample_id").cast(pl.Utf8).alias("unit"))


def reference_label(name: str, ratio: float | None) -> str:
    """A reference configuration's id at a budget: ``avg_all_heads``, or at a ``--keep-ratio``
    ``avg_all_heads ratio 0.25``."""
    from .select import ratio_label

    return name if ratio is None else ratio_label(name, ratio)


def _references(layer: pl.DataFrame, row: dict) -> dict[str, pl.DataFrame | None]:
    """The reference configurations of one configuration, by configuration id: ``full`` at
    its layer, and the plain ``avg_all_heads`` and ``random`` configurations at its layer and
    budget (keep, or keep ratio); None where it is that reference itself (or ``full``)."""
    config, ratio = row["config"], row.get("ratio")
    same = layer.filter(pl.col("keep").eq_missing(row["keep"]))
    if "ratio" in layer.columns:
        same = same.filter(pl.col("ratio").eq_missing(ratio))
    avg, rnd = reference_label(REFERENCE, ratio), reference_label(CONTROL, ratio)
    return {"full": None if config == FULL else layer.filter(pl.col("config") == FULL),
            "avg": None if config in (avg, FULL) else same.filter(pl.col("config") == avg),
            "random": None if config in (rnd, FULL) else same.filter(pl.col("config") == rnd)}


def _accuracy_row(g: pl.DataFrame, layer: pl.DataFrame, row: dict) -> dict:
    """Accuracy, its interval and the paired tests of one configuration (``g``: its rows)."""
    correct = g["correct"].to_numpy()
    lo, hi = stats.cluster_wilson_interval(correct, g["unit"].to_numpy())
    out = {"n": len(correct), "n_units": g["unit"].n_unique(), "accuracy": float(correct.mean()),
           "ci_lo": lo, "ci_hi": hi}
    for name, ref in _references(layer, row).items():
        p, p_unit, pairs = _paired_tests(g, ref, name)
        out[f"mcnemar_p_vs_{name}"], out[f"unit_p_vs_{name}"] = p, p_unit
        delta = float(pairs["correct"].mean() - pairs["ref"].mean()) if pairs.height else None
        if name == "full":
            out["full_accuracy"] = float(pairs["ref"].mean()) if pairs.height else None
            out["delta_vs_full"] = delta
        elif name == "random":
            out["delta_vs_random"] = delta
    if row["config"] == FULL:
        out["full_accuracy"], out["delta_vs_full"] = out["accuracy"], 0.0
    return out


def accuracy_table(pred: pl.DataFrame, timing: pl.DataFrame, model_dims: dict,
                   config_timing: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per configuration: accuracy with its 95 % interval (Wilson; copies of one item count
    as one unit, :func:`fastv_analysis.stats.cluster_wilson_interval`), n samples and
    n_units, the change vs the ``full`` control, and paired tests against three reference
    configurations joined by configuration id — ``full`` (same layer), the plain
    ``avg_all_heads`` and ``random`` (same layer and keep) — each from exactly one pair per
    sample: the exact McNemar p (``mcnemar_p_vs_*``: samples as independent) and the exact
    sign-flip test over units (``unit_p_vs_*``: the same p when every unit is one sample),
    with Holm and BH columns over the table; FLOPs and timings."""
    pred = with_units(pred)
    rows = []
    keys = ["agg_layer", "config", "method", "alpha", "keep", *(["ratio"] if "ratio" in pred.columns else [])]
    for key, g in pred.group_by(keys, maintain_order=True):
        row = dict(zip(keys, key))
        g = g.sort("sample_id")
        layer = pred.filter(pl.col("agg_layer") == row["agg_layer"])
        n_tokens = int(g["prompt_tokens"].mean())
        n_image = int(round(float(g["n_image_tokens"].mean())))  # anyres models: N varies by image
        # image tokens the model really kept: the full control all of each sample's, and a
        # --newline-tokens keep selection its newline tokens on top of the budget
        keep = min(int(round(float(g["n_kept"].mean()))) if "n_kept" in g.columns else int(row["keep"]), n_image)
        stages = [(k, kp) for k, kp, _ in json.loads(g["stages"][0])] if "stages" in g.columns else []
        t = timing.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("keep").eq_missing(row["keep"]))
        rows.append({
            **row, **_accuracy_row(g, layer, row),
            **{name: flops_mod.flops_ratio(n_tokens, n_image, keep, model_dims["num_layers"], int(row["agg_layer"]),
                                           model_dims["hidden"], model_dims["intermediate"], stages, matrices)
               for name, matrices in (("flops_ratio", 2), ("flops_ratio_3mlp", 3))},
            "equivalent_image_tokens": flops_mod.equivalent_image_tokens(n_image, keep,
                                                                         model_dims["num_layers"],
                                                                         int(row["agg_layer"]), stages),
            **_config_times(config_timing, row),
            "batched_prefill_ms_per_set": 1e3 * float(t["prefill_seconds"].sum() / max(t["n_sets"].sum(), 1)),
            "batched_decode_ms_per_token": 1e3 * float(t["decode_seconds"].sum() / max(t["decode_tokens"].sum(), 1)),
        })
    first = ["agg_layer", "config", "method", "alpha", "keep", "n", "n_units", "accuracy", "ci_lo", "ci_hi",
             "full_accuracy", "delta_vs_full", "delta_vs_random", *P_COLUMNS]
    table = pl.DataFrame(rows, infer_schema_length=None,
                         schema_overrides={c: pl.Float64 for c in (*P_COLUMNS, "full_accuracy", "delta_vs_full",
                                                                   "delta_vs_random")})
    table = table.select(*first, *[c for c in table.columns if c not in first])
    return with_adjusted(table, P_COLUMNS).sort(["agg_layer", "keep", "method", "alpha"],
                                                descending=[False, True, False, False], nulls_last=True)


TIMING_COLUMNS = ("prefill_ms", "prefill_ms_p25", "prefill_ms_p75", "decode_ms_per_token",
                  "prefill_speedup_vs_full", "prefill_speedup_p25", "prefill_speedup_p75")


CONFIG_KEYS = ["agg_layer", "config", "keep"]


def sorted_predictions(pred: pl.DataFrame) -> pl.DataFrame:
    """The one row order of predictions.parquet (whatever the process or part order was)."""
    return pred.sort(["sample_id", "agg_layer", "keep", "method", "alpha"], descending=[False, False, True, False, False],
                     nulls_last=True)


def benchmark_scores(pred: pl.DataFrame, benchmark: str | None, questions) -> tuple[pl.DataFrame, dict | None]:
    """Score every configuration's answers by the run's rule: ``correct`` (0/1, what McNemar
    compares) and ``score`` (soft where the benchmark's metric is soft, what the relations
    use). For a benchmark also its headline per configuration, with its 95% interval, and
    the long table of every metric (``metrics.parquet``)."""
    from .benchmark import headline_interval, score_answers

    if benchmark is None:  # a plain question file: exact match / option / yes-no, per sample
        return pred.with_columns(pl.col("correct").cast(pl.Float64).alias("score")), None
    scored, headlines, long = [], [], []
    units = dict(zip(pred["question_id"].to_list(), pred["unit"].to_list())) if "unit" in pred.columns else None
    for key, g in pred.group_by(CONFIG_KEYS, maintain_order=True):
        answers = dict(zip(g["question_id"].to_list(), g["prediction"].to_list()))
        per_question, result = score_answers(benchmark, questions, answers)
        scored.append(g.drop("correct", "score", strict=False).join(
            per_question.select("question_id", "score", "correct"), on="question_id", how="left"))
        if result is not None:
            lo, hi = headline_interval(result, per_question, units=units)
            headlines.append({**dict(zip(CONFIG_KEYS, key)), "benchmark": benchmark, "metric": result.headline[0],
                              "metric_value": result.headline[1], "metric_ci_lo": lo, "metric_ci_hi": hi})
            long.append(result.long.with_columns(*(pl.lit(v).alias(k) for k, v in zip(CONFIG_KEYS, key))))
    out = sorted_predictions(pl.concat(scored).with_columns(pl.col("correct").fill_null(False),
                                                            pl.col("score").fill_null(0.0)))
    headline = pl.DataFrame(headlines, schema_overrides={"metric_ci_lo": pl.Float64, "metric_ci_hi": pl.Float64})
    return out, {"headline": headline, "long": pl.concat(long).select(*CONFIG_KEYS, "metric", "category", "value")}


def write_answer_files(pred: pl.DataFrame, questions, folder: Path, model_id: str) -> None:
    """One answers file per configuration, each line as LLaVA's ``llava/eval/model_vqa*.py``
    write it (question_id with the question file's own type, prompt where the official
    script looks for it, text, answer_id, model_id, metadata, and a benchmark's extra fields:
    :func:`fastv_analysis.tasks.answer_record`), in question-file order, so the benchmark's
    official scripts score it too."""
    import hashlib
    import re

    from .tasks import answer_record

    folder.mkdir(parents=True, exist_ok=True)
    by_id = {q.question_id: q for q in questions}
    for (layer, config, keep), g in pred.group_by(CONFIG_KEYS, maintain_order=True):
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"K{layer}_keep{keep}_{config}").strip("_")
        lines = []
        for qid, text in g.sort("sample_id").select("question_id", "prediction").iter_rows():
            q = by_id.get(qid)
            record = answer_record(q) if q is not None else {"question_id": qid, "prompt": ""}
            lines.append(json.dumps({"question_id": record.pop("question_id"), "prompt": record.pop("prompt"),
                                     "text": text,
                                     "answer_id": hashlib.blake2b(f"{name}/{qid}".encode(), digest_size=8).hexdigest(),
                                     "model_id": model_id, "metadata": {"agg_layer": layer, "config": config,
                                                                        "keep": keep}, **record}))
        atomic_write_bytes(folder / f"{name}.jsonl", ("\n".join(lines) + "\n").encode())


def _config_times(config_timing: pl.DataFrame | None, row: dict) -> dict:
    """Median batch-1 prefill ms with its quartiles, median decode ms per token, and the
    prefill speed-up vs ``full``: the median of paired ratios (same sample, same repeat),
    so a slow moment of the machine cancels out of each ratio."""
    empty = {**{c: None for c in TIMING_COLUMNS}, "timing_n": 0}
    if config_timing is None or config_timing.height == 0:
        return empty
    keys = ["sample_id", "repeat"]
    layer = config_timing.filter(pl.col("agg_layer") == row["agg_layer"])
    mine = layer.filter(pl.col("config") == row["config"],
                        pl.col("keep").eq_missing(row["keep"]) | (pl.col("config") == FULL))  # full: keep = each N
    if mine.height == 0:
        return empty
    prefill = 1e3 * mine["prefill_seconds"].to_numpy()
    per_token = 1e3 * mine["decode_seconds"].to_numpy() / np.maximum(mine["decode_tokens"].to_numpy(), 1)
    full = layer.filter(pl.col("config") == FULL).select(*keys, pl.col("prefill_seconds").alias("full_s"))
    ratio = mine.join(full, on=keys).select(pl.col("full_s") / pl.col("prefill_seconds"))["full_s"].to_numpy()
    q = (lambda x, p: float(np.percentile(x, p)) if len(x) else None)
    return {
        "prefill_ms": q(prefill, 50), "prefill_ms_p25": q(prefill, 25), "prefill_ms_p75": q(prefill, 75),
        "decode_ms_per_token": q(per_token[mine["decode_tokens"].to_numpy() > 0], 50),
        "prefill_speedup_vs_full": q(ratio, 50), "prefill_speedup_p25": q(ratio, 25),
        "prefill_speedup_p75": q(ratio, 75), "timing_n": mine.height,
    }


def _budget(frame: pl.DataFrame) -> pl.Expr:
    """A row's budget as one join key: its keep count, or its ``--keep-ratio`` (whose rows
    keep each sample's own count)."""
    keep = pl.lit("keep ") + pl.col("keep").cast(pl.Utf8)
    if "ratio" not in frame.columns:
        return keep.alias("budget")
    return pl.when(pl.col("ratio").is_null()).then(keep).otherwise(
        pl.lit("ratio ") + pl.col("ratio").cast(pl.Utf8)).alias("budget")


def _reference_at_budget(frame: pl.DataFrame) -> pl.Expr:
    """Per row, the plain avg_all_heads configuration's id at the row's budget
    (:func:`reference_label`)."""
    if "ratio" not in frame.columns:
        return pl.lit(REFERENCE)
    return pl.when(pl.col("ratio").is_null()).then(pl.lit(REFERENCE)).otherwise(
        pl.col("ratio").map_elements(lambda r: reference_label(REFERENCE, r), return_dtype=pl.Utf8))


def statistics_frame(pred: pl.DataFrame, run_dir: Path) -> pl.DataFrame:
    """Predictions joined with each selection's statistics (overlap with the plain
    avg_all_heads configuration's set at the same sample, layer and keep — measured for
    every configuration, query variants included; a schedule's first cut for a schedule;
    1.0 for that configuration itself — head statistics, spatial statistics)."""
    sel_dir = run_dir / "select"
    overlap = pl.read_parquet(sel_dir / "overlap.parquet")
    overlap = overlap.with_columns(_budget(overlap))
    ref = _reference_at_budget(overlap)
    vs_avg = pl.concat([
        overlap.filter(pl.col("config_a") == ref).select(
            "sample_id", "agg_layer", "budget", pl.col("config_b").alias("base_config"), pl.col("jaccard")),
        overlap.filter(pl.col("config_b") == ref).select(
            "sample_id", "agg_layer", "budget", pl.col("config_a").alias("base_config"), pl.col("jaccard")),
    ]).rename({"jaccard": "jaccard_vs_avg"})
    heads = pl.read_parquet(sel_dir / "heads.parquet").select("sample_id", "agg_layer", "max_head_share",
                                                                "head_entropy")
    out = pred if "base_config" in pred.columns else pred.with_columns(pl.col("config").alias("base_config"))
    out = out.with_columns(_budget(out)).join(vs_avg, on=["sample_id", "agg_layer", "budget", "base_config"],
                                               how="left").drop("budget")
    is_ref = pl.col("base_config") == _reference_at_budget(out)
    out = out.with_columns(pl.when(is_ref).then(1.0).otherwise(pl.col("jaccard_vs_avg")).alias("jaccard_vs_avg"))
    return out.join(heads, on=["sample_id", "agg_layer"], how="left")


ADAPTIVE_FEATURES = ("max_head_share", "head_entropy", "head_gini", "sink_mass")
"""Cached per-sample statistics a choice rule may read (select's heads.parquet)."""


def adaptive_tables(pred: pl.DataFrame, run_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(oracle table, cross-validated choice rule) over the answered configurations, per layer
    and keep (:mod:`fastv_analysis.adaptive`): what choosing the strategy per sample could
    gain, and what a threshold rule on cached head / sink statistics gains on held-out
    questions."""
    from .adaptive import choice_rule_cv, oracle_table

    candidates = pred.filter(pl.col("method") != FULL)
    features = pl.read_parquet(run_dir / "select" / "heads.parquet")
    columns = [c for c in ADAPTIVE_FEATURES if c in features.columns]
    if candidates["config"].n_unique() < 2:
        return pl.DataFrame(), pl.DataFrame()
    oracle = oracle_table(candidates)
    summary, _ = choice_rule_cv(candidates, features, None, feature_columns=columns)
    return oracle, summary


def relations_table(frame: pl.DataFrame, n_permutations: int = 2000, seed: int = 0) -> pl.DataFrame:
    """How each selection statistic relates to being correct.

    scope "configuration": within one configuration (one row per sample, so the samples
    are independent), Spearman's rho with its p-value and accuracy by quartile of the
    statistic. scope "within_sample": pooled over the pruned configurations (``full`` and
    avg_all_heads left out) but compared only within each (sample, layer, keep): the
    within-stratum correlation ``r_within`` and a permutation p that shuffles the
    statistic within strata (:func:`fastv_analysis.stats.within_sample_permutation_test`),
    so a sample counted in 24 configurations is one sample and keep cannot confound it.
    Statistics that are properties of the sample (head statistics) do not vary within a
    stratum and get no pooled test. Each scope is its own family for ``p_holm``/``p_bh``.

    Copies of one item (a ``unit`` column: MME's two questions per image, MMBench's
    rotations, several questions per image) are one unit: a configuration's Spearman test
    runs on the units' mean statistic and mean outcome (``n_units`` of them), and the pooled
    permutation shuffles every copy of a unit alike.
    """
    from scipy.stats import spearmanr

    per_config = []
    scored = with_units(frame.filter(pl.col("method") != FULL))
    outcome = "score" if "score" in frame.columns else "correct"  # soft where the metric is soft
    for (config, layer, keep), g in scored.group_by(["config", "agg_layer", "keep"], maintain_order=True):
        correct = g[outcome].cast(pl.Float64).to_numpy()
        for stat in STATISTICS:
            x = g[stat].cast(pl.Float64).fill_null(np.nan).to_numpy()
            ok = ~np.isnan(x)
            units = g.filter(pl.Series(ok)).group_by("unit", maintain_order=True).agg(
                pl.col(stat).cast(pl.Float64).mean(), pl.col(outcome).cast(pl.Float64).mean())
            ux, uy = units[stat].to_numpy(), units[outcome].to_numpy()
            rho = p = None
            if ux.size >= 3 and np.ptp(ux) > 0 and np.ptp(uy) > 0:
                res = spearmanr(ux, uy)
                rho, p = float(res.statistic), float(res.pvalue)
            qs = stats.quantile_accuracy(x[ok], correct[ok], QUANTILES)
            per_config.append({"scope": "configuration", "config": config, "agg_layer": layer, "keep": keep,
                               "statistic": stat, "n": int(ok.sum()), "n_units": int(ux.size), "n_strata": None,
                               "spearman_rho": rho, "r_within": None, "p_value": p,
                               **{f"accuracy_q{i + 1}": v for i, v in enumerate(qs)}})
    pooled = []
    pruned = scored.filter(pl.col("config") != REFERENCE)
    if pruned.height:
        strata = pruned.select(pl.struct("sample_id", "agg_layer", "keep").rank("dense")).to_series().to_numpy()
        blocks = pruned.select(pl.struct("unit", "agg_layer", "keep").rank("dense")).to_series().to_numpy()
        correct = pruned[outcome].cast(pl.Float64).to_numpy()
        for stat in STATISTICS:
            x = pruned[stat].cast(pl.Float64).fill_null(np.nan).to_numpy()
            res = stats.within_sample_permutation_test(x, correct, strata, n_permutations=n_permutations, seed=seed,
                                                       blocks=blocks, slots=pruned["config"].to_numpy())
            r = None if res["r"] is None or not np.isfinite(res["r"]) else float(res["r"])
            p = None if r is None or res["p_value"] is None or not np.isfinite(res["p_value"]) else float(res["p_value"])
            pooled.append({"scope": "within_sample", "config": "pooled", "agg_layer": None, "keep": None,
                           "statistic": stat, "n": int(res["n"]), "n_units": pruned["unit"].n_unique(),
                           "n_strata": int(res["n_strata"]),
                           "spearman_rho": None, "r_within": r, "p_value": p,
                           **{f"accuracy_q{i + 1}": None for i in range(QUANTILES)}})
    schema = {"scope": pl.Utf8, "config": pl.Utf8, "agg_layer": pl.Int64, "keep": pl.Int64, "statistic": pl.Utf8,
              "n": pl.Int64, "n_units": pl.Int64, "n_strata": pl.Int64, "spearman_rho": pl.Float64, "r_within": pl.Float64,
              "p_value": pl.Float64, **{f"accuracy_q{i + 1}": pl.Float64 for i in range(QUANTILES)}}
    frames = [with_adjusted(pl.DataFrame(rows, schema=schema), ["p_value"]) for rows in (per_config, pooled) if rows]
    out = pl.concat(frames) if frames else with_adjusted(pl.DataFrame(schema=schema), ["p_value"])
    return out.rename({"p_value_holm": "p_holm", "p_value_bh": "p_bh"})


PART_SAMPLES = 16
ANSWER_SCHEMA = {"sample_id": pl.Int64, "agg_layer": pl.Int64, "selection_id": pl.Utf8, "prediction": pl.Utf8,
                 "correct": pl.Boolean}
TIMING_SCHEMA = {"sample_id": pl.Int64, "agg_layer": pl.Int64, "keep": pl.Int64, "n_sets": pl.Int64,
                 "prefill_seconds": pl.Float64, "decode_seconds": pl.Float64, "decode_tokens": pl.Int64}


def _settings_key(model_id: str, data_sha256: str, max_new_tokens: int, selections: pl.DataFrame,
                  numerics: str = "") -> str:
    """What the cached answers depend on: the kept sets asked for, model, data, answer
    length, and the numerics they were computed in (dtype, device type, attention kernel:
    a bfloat16 eval must not reuse float32 answers)."""
    import hashlib

    asked = selections.select("sample_id", "agg_layer", "keep", "selection_id").unique().sort(pl.all())
    h = hashlib.sha256(f"{model_id}|{data_sha256}|{max_new_tokens}|{numerics}|".encode() + asked.write_csv().encode())
    return h.hexdigest()[:16]


class EvalParts:
    """Answers of finished samples, in parts under RUN/.eval-parts/<key>/, so an
    interrupted eval resumes where it stopped (key: selections, model, answer length).
    Each process of a sharded eval writes its own ``answers-R-N`` / ``timing-R-N`` parts, and
    last ``part-R-N.json`` with both files' sha256: a part counts once that lands and its
    files match it. A damaged part is removed (its samples are answered again, said in one
    line on stderr); a sample found in two parts (an older version's concurrent evals)
    counts once."""

    _NUMBER = re.compile(r"^(?:answers|timing|part)-(\d+)-(\d+)\.(?:parquet|json)$")

    def __init__(self, root: Path, key: str, rank: int = 0):
        self.dir = root / ".eval-parts" / key
        self.rank = rank
        self.dir.mkdir(parents=True, exist_ok=True)

    def _read(self, name: str) -> tuple[pl.DataFrame, pl.DataFrame] | str:
        """A part's (answers, timing), or what is wrong with it."""
        files = {kind: self.dir / f"{kind}-{name}.parquet" for kind in ("answers", "timing")}
        manifest = self.dir / f"part-{name}.json"
        try:
            sums = json.loads(manifest.read_text()) if manifest.exists() else {}  # none: an older version's part
        except ValueError:
            return f"{manifest} is damaged"
        for kind, path in files.items():
            if not path.is_file():
                return f"{path} is missing"
            if kind in sums and hashlib.sha256(path.read_bytes()).hexdigest() != sums[kind]:
                return f"{path} is damaged (its sha256 differs from {manifest.name})"
        try:
            return pl.read_parquet(files["answers"]), pl.read_parquet(files["timing"])
        except Exception as err:  # polars raises several kinds on an unreadable file
            return f"{files['answers']} or its timing is unreadable ({err.__class__.__name__})"

    def load(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Answers and timings of complete, intact parts, each sample from the first part holding it."""
        names = sorted({f.stem.split("-", 1)[1] for f in self.dir.glob("part-*.json")}
                       | {f.stem.split("-", 1)[1] for f in self.dir.glob("timing-*.parquet")})
        answers, timing, seen = [], [], set()
        for name in names:
            part = self._read(name)
            if isinstance(part, str):
                print(f"eval: {part}: its samples are answered again", file=sys.stderr)
                for kind in ("part-{}.json", "timing-{}.parquet", "answers-{}.parquet"):
                    (self.dir / kind.format(name)).unlink(missing_ok=True)
                continue
            new = pl.col("sample_id").is_in(list(seen)).not_()
            answers.append(part[0].filter(new))
            timing.append(part[1].filter(new))
            seen |= set(part[1]["sample_id"].to_list())
        return (pl.concat(answers) if answers else pl.DataFrame(schema=ANSWER_SCHEMA),
                pl.concat(timing) if timing else pl.DataFrame(schema=TIMING_SCHEMA))

    def write(self, answers: list[dict], timing: list[dict]) -> None:
        """Answers, timing, then their sha256 in part-R-N.json: a part counts only once all three are there."""
        if not timing:
            return
        found = (self._NUMBER.match(f.name) for f in self.dir.iterdir())
        numbers = [int(m[2]) for m in found if m and int(m[1]) == self.rank]
        n = f"{self.rank:03d}-{max(numbers, default=-1) + 1:05d}"
        sums = {}
        for kind, rows, schema in (("answers", answers, ANSWER_SCHEMA), ("timing", timing, TIMING_SCHEMA)):
            buffer = io.BytesIO()
            pl.DataFrame(rows, schema=schema).write_parquet(buffer)
            sums[kind] = hashlib.sha256(buffer.getvalue()).hexdigest()
            atomic_write_bytes(self.dir / f"{kind}-{n}.parquet", buffer.getvalue())
        atomic_write_json(self.dir / f"part-{n}.json", sums)


def run_eval(cfg: EvalConfig, progress: bool = True, command: list[str] | None = None) -> dict:
    """Evaluate the select stage's configurations of ``cfg.run``; writes ``RUN/eval/``.

    Under ``accelerate launch`` / ``torchrun`` the processes split the samples (every
    world-th), each writes its own resumable parts, and rank 0 merges them into the same
    tables one process would write; batch-1 timings and the mask check run on rank 0's
    samples only.
    """
    from tqdm.auto import tqdm

    from .adapters import get_adapter
    from .capture import BadSample, CaptureConfig, _distributed, prepare
    from .benchmark import complete_groups, questions_fingerprint, run_questions, sample_unit
    from .loading import load_model
    from .provenance import file_sha256, fingerprint, select_fingerprint, stale_stages, versions
    from .scoring import is_correct

    run = open_run(cfg.run)
    sel_path = run.root / "select" / "selections.parquet"
    if not sel_path.exists():
        raise FileNotFoundError(f"{sel_path} is missing: run `fastv-analyze select {cfg.run}` first")
    select_info = json.loads((run.root / "select" / "select.json").read_text())
    for key, name in (("run_model_fingerprint", "model_fingerprint"), ("run_data_sha256", "data_sha256")):
        if select_info.get(key) != run.config.get(name):
            raise ValueError(f"{run.root / 'select'} was made from another capture ({name} differs): "
                             f"run `fastv-analyze select {cfg.run}` again")
    stale = stale_stages(run).get("select")
    if stale:
        raise ValueError(stale)
    select_id = select_fingerprint(run.root)
    benchmark = run.config.get("benchmark")
    data_file = str(run.data_path)
    if not Path(data_file).exists():
        raise FileNotFoundError(f"{data_file} (the run's question file) is missing")
    image_root = run.config.get("image_root")
    if image_root and not Path(image_root).exists() and (run.root / "benchmark-images").exists():
        image_root = str(run.root / "benchmark-images")  # a moved run
    # capture's list; a sample --skip-bad skipped for its missing image is not in the run
    questions = run_questions(data_file, benchmark, image_root, errors=[], missing_images_ok=True)
    selections = configurations(pl.read_parquet(sel_path), cfg,
                                lambda ids, available: complete_groups(ids, questions, available))
    selections = with_schedule(with_full_control(selections, sample_layouts(run.samples)), cfg.then)
    now = file_sha256(data_file) if benchmark is None else questions_fingerprint(questions)
    if now != run.config.get("data_sha256"):
        raise ValueError(f"{data_file} changed since the capture of {cfg.run} (sha256 differs)")
    model_name = cfg.model or run.config["model"]
    rank, world, state = _distributed(cfg.device)
    loaded = load_model(model_name, cfg.device if state is None else str(state.device),
                        cfg.dtype or run.config.get("dtype", "auto"))
    model_id = fingerprint(model_name, loaded.model)
    if model_id != run.config.get("model_fingerprint"):
        raise ValueError(f"model {model_name} (fingerprint {model_id}) is not the model of {cfg.run} "
                         f"(fingerprint {run.config.get('model_fingerprint')})")
    adapter = get_adapter(loaded.model)
    max_new = cfg.max_new_tokens or int(run.config.get("max_new_tokens", 10))
    capture_cfg = CaptureConfig(model=model_name, data=data_file, prompt_template=run.config.get("prompt_template"),
                                max_new_tokens=max_new, benchmark=benchmark)
    max_tokens = int(getattr(loaded.model.config.text_config, "max_position_embeddings", 1 << 30))

    out_dir = run.root / "eval"
    tmp = run.root / ".eval.tmp"
    sample_ids = selections["sample_id"].unique().sort().to_list()
    numerics = (f"{loaded.dtype}|{loaded.device.type}|"
                f"{getattr(loaded.model.config, '_attn_implementation', None)}")
    parts = EvalParts(run.root, _settings_key(model_id, run.config.get("data_sha256", ""), max_new, selections,
                                              numerics), rank)
    _, timing_parts = parts.load()
    done = set(timing_parts["sample_id"].to_list())
    answers_rows, timing_rows, mask_checks, timed, config_timing_rows = [], [], [], [], []
    by_sample = selections.partition_by("sample_id", as_dict=True)
    t_start = time.perf_counter()
    mine = sample_ids[rank::world]
    for sid in tqdm(mine, desc=f"eval[{rank}]" if world > 1 else "eval", unit="sample", disable=not progress):
        needs_mask = rank == 0 and len(mask_checks) < cfg.compare_mask
        needs_timing = rank == 0 and len(timed) < cfg.timing_samples
        if sid in done and not needs_mask and not needs_timing:
            continue
        try:
            prepared = prepare(sid, questions[sid], loaded.processor, capture_cfg, max_tokens, adapter.image_token_id)
        except BadSample:
            continue  # skipped at capture time too (errors.jsonl)
        rows = by_sample[(sid,)]
        if needs_timing:
            timed.append(sid)
            config_timing_rows.extend({"sample_id": sid, **t} for t in time_configurations(
                loaded, prepared, rows, max_new, repeats=cfg.timing_repeats))
        if sid in done and not needs_mask:
            continue
        answers, timings = evaluate_sample(loaded, prepared, rows, max_new, batch_size=cfg.batch_size)
        if needs_mask:
            masked, _ = evaluate_sample(loaded, prepared, rows, max_new, mode="mask", batch_size=cfg.batch_size)
            mask_checks.append({"sample_id": sid, "n_sets": len(answers),
                                "identical": all(masked[k] == v for k, v in answers.items())})
        if sid in done:
            continue
        timing_rows.extend({"sample_id": sid, **t} for t in timings)
        q = questions[sid]
        answers_rows.extend({"sample_id": sid, "agg_layer": layer, "selection_id": sel_id, "prediction": text,
                             "correct": is_correct(text, q.answer, q.choices)} for (layer, sel_id), text in answers.items())
        if len({r["sample_id"] for r in timing_rows}) >= PART_SAMPLES:
            parts.write(answers_rows, timing_rows)
            answers_rows, timing_rows = [], []
    parts.write(answers_rows, timing_rows)
    if state is not None:
        state.wait_for_everyone()
        if rank != 0:
            return {"rank": rank, "n_samples": len(mine)}
    answers_df, timing = parts.load()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pred = (
        selections.with_columns(pl.col("kept").list.len().alias("n_kept")).drop("kept")
        .join(answers_df, on=["sample_id", "agg_layer", "selection_id"], how="inner")
        .join(run.samples.select("sample_id", pl.col("prediction").alias("capture_prediction")), on="sample_id",
              how="left")
        .join(run.samples.select("sample_id", "question_id", "category", "answer", "prompt_tokens", "n_image_tokens"),
              on="sample_id", how="left")
    )
    units = pl.DataFrame({"sample_id": sample_ids, "unit": [sample_unit(questions[i]) for i in sample_ids]},
                         schema={"sample_id": pred.schema["sample_id"], "unit": pl.Utf8})
    pred = ratio_rows_keep_null(sorted_predictions(pred.join(units, on="sample_id", how="left")))
    if pred.filter(pl.col("method") == FULL)["keep"].n_unique() > 1:  # anyres: one full control, keep = max N
        pred = pred.with_columns(pl.when(pl.col("method") == FULL).then(pl.col("keep").max().over("agg_layer"))
                                 .otherwise(pl.col("keep")).alias("keep"))
    pred, metrics = benchmark_scores(pred, benchmark, questions)
    dims = {"num_layers": adapter.num_layers, "hidden": adapter.hidden_size, "intermediate": adapter.intermediate_size}
    config_timing = pl.DataFrame(config_timing_rows, infer_schema_length=None) if config_timing_rows else None
    accuracy = accuracy_table(pred, timing, dims, config_timing)
    if metrics is not None:
        accuracy = accuracy.join(metrics["headline"], on=["agg_layer", "config", "keep"], how="left")
        atomic_write_parquet(metrics["long"], tmp / "metrics.parquet")
    write_answer_files(pred, questions, tmp / "answers", model_name)
    relations = relations_table(statistics_frame(pred, run.root))
    oracle, choice = adaptive_tables(pred, run.root)
    atomic_write_parquet(oracle, tmp / "oracle.parquet")
    atomic_write_parquet(choice, tmp / "adaptive.parquet")
    atomic_write_parquet(pred, tmp / "predictions.parquet")
    atomic_write_parquet(accuracy, tmp / "accuracy.parquet")
    atomic_write_parquet(relations, tmp / "relations.parquet")
    atomic_write_parquet(timing, tmp / "timing.parquet")
    if config_timing is not None:
        atomic_write_parquet(config_timing, tmp / "config_timing.parquet")
    n_forwards = timing.height
    full = pred.filter(pl.col("method") == FULL)
    differ = full.filter(pl.col("prediction") != pl.col("capture_prediction"))
    info = {
        "stage": "eval",
        "select_fingerprint": select_id,
        "settings": asdict(cfg),
        "model": model_name,
        "model_fingerprint": model_id,
        "n_samples": len(sample_ids),
        "processes": world,
        "configurations_asked": selections.height,
        "distinct_kept_sets": answers_df.height,
        "shared_prefills": n_forwards,
        "max_new_tokens": max_new,
        "mask_check": mask_checks,
        "full_vs_capture": {"compared": full.height, "differ": differ.height,
                            "examples": differ.select("sample_id", "agg_layer", "prediction", "capture_prediction")
                            .head(10).to_dicts()},
        "timing": {"samples": len(timed), "repeats": cfg.timing_repeats, "warmup_passes": 1,
                   "order": "every configuration once per repeat, a fresh seeded order each repeat",
                   "threads": torch.get_num_threads(), "device": str(loaded.device),
                   "dtype": str(loaded.dtype).removeprefix("torch.")},
        "seconds": round(time.perf_counter() - t_start, 3),
        "versions": versions(),
        "command": command or sys.argv,
    }
    atomic_write_json(tmp / "eval.json", info)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    if mask_checks and not all(c["identical"] for c in mask_checks):
        bad = [c["sample_id"] for c in mask_checks if not c["identical"]]
        raise ValueError(f"mask and drop modes gave different answers on sample_ids {bad} (see {out_dir}/eval.json)")
    return {**info, "accuracy": accuracy}
