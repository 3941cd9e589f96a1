"""The eval stage: re-run the model with each selection pruned, score, relate to statistics.

The kept sets come from ``RUN/select/selections.parquet``, so capture, select and eval
agree token for token. For each sample, layer and keep count, the distinct kept sets
(``selection_id``) share one pass through layers 0..K-1 and go through layers K.. as one
batch (:func:`fastv_analysis.pruning.prefill_shared`); configurations with the same set
are answered once.
"""

from __future__ import annotations

import json
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
from .store import atomic_write_json, atomic_write_parquet, open_run

QUANTILES = 4
STATISTICS = ("jaccard_vs_avg", "max_head_share", "head_entropy", "mean_row", "mean_col", "bottom_share")


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
    model: str | None = None
    batch_size: int = 64


def configurations(selections: pl.DataFrame, cfg: EvalConfig) -> pl.DataFrame:
    """The selection rows to evaluate, filtered by the flags; one-line error when none match."""
    out = selections
    if cfg.agg_layers:
        missing = sorted(set(cfg.agg_layers) - set(out["agg_layer"].unique().to_list()))
        if missing:
            raise ValueError(f"--agg-layer {missing}: not in {cfg.run}/select/selections.parquet "
                             f"(selected layers: {sorted(out['agg_layer'].unique().to_list())})")
        out = out.filter(pl.col("agg_layer").is_in(cfg.agg_layers))
    if cfg.methods:
        out = out.filter(pl.col("method").is_in(cfg.methods))
    if cfg.alphas:
        out = out.filter(pl.col("alpha").is_null() | pl.col("alpha").is_in([float(a) for a in cfg.alphas]))
    if cfg.keeps:
        out = out.filter(pl.col("keep").is_in(cfg.keeps))
    if cfg.limit:
        first = out["sample_id"].unique().sort().head(cfg.limit)
        out = out.filter(pl.col("sample_id").is_in(first.to_list()))
    if out.height == 0:
        raise ValueError(f"no configuration of {cfg.run}/select/selections.parquet matches the given flags")
    return out


def _full_baseline(run) -> pl.DataFrame:
    return run.samples.select("sample_id", pl.col("prediction").alias("full_prediction"),
                              pl.col("correct").alias("full_correct"))


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
    for (layer, keep), group in rows.group_by(["agg_layer", "keep"], maintain_order=True):
        distinct = group.unique("selection_id", keep="first", maintain_order=True)
        groups.extend(((layer, keep), distinct.slice(i, batch_size)) for i in range(0, distinct.height, batch_size))
    for (layer, keep), distinct in groups:
        kept = torch.tensor(distinct["kept"].to_list(), dtype=torch.long).reshape(distinct.height, int(keep))
        tokens, t0, t1, t2 = pruned_answer_tokens(loaded, inputs, kept, int(layer), max_new_tokens, mode)
        texts = processor.batch_decode(tokens, skip_special_tokens=True)
        answers.update(((int(layer), sid), t.strip()) for sid, t in zip(distinct["selection_id"].to_list(), texts))
        timings.append({"agg_layer": int(layer), "keep": int(keep), "n_sets": distinct.height,
                        "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                        "decode_tokens": int(tokens.shape[1]) * distinct.height})
    return answers, timings


def pruned_answer_tokens(loaded, inputs: dict, kept: torch.Tensor, agg_layer: int, max_new_tokens: int,
                         mode: str = "drop"):
    """Greedy answer tokens ``[C, T]`` of C kept sets sharing one prefill, with the clock
    readings (start, prefill done, decode done)."""
    from .pruning import greedy_decode, prefill_shared

    eos = loaded.model.generation_config.eos_token_id
    pad = loaded.processor.tokenizer.pad_token_id or 0
    t0 = time.perf_counter()
    with prefill_shared(loaded.model, inputs, kept, agg_layer, mode=mode) as shared:
        sync_device(loaded.device)
        t1 = time.perf_counter()
        tokens = greedy_decode(shared, max_new_tokens, eos, pad)
        sync_device(loaded.device)
    return tokens, t0, t1, time.perf_counter()


@torch.no_grad()
def time_configurations(loaded, prepared, rows: pl.DataFrame, max_new_tokens: int) -> list[dict]:
    """Wall time of each configuration of one sample on its own (batch 1), and of the full model.

    The shared-prefix batching that answers the configurations mixes their costs; these
    separate runs are what a deployed pruned model would take: prefill ms and decode ms
    per generated token, per configuration.
    """
    inputs = model_inputs(loaded, [prepared])
    out = []
    t0 = time.perf_counter()
    loaded.model(**inputs, use_cache=True, logits_to_keep=1)
    sync_device(loaded.device)
    out.append({"agg_layer": None, "config": "full model", "keep": None,
                "prefill_seconds": time.perf_counter() - t0, "decode_seconds": None, "decode_tokens": None})
    for row in rows.unique(["agg_layer", "config", "keep"], keep="first", maintain_order=True).iter_rows(named=True):
        kept = torch.tensor([row["kept"]], dtype=torch.long).reshape(1, int(row["keep"]))
        tokens, t0, t1, t2 = pruned_answer_tokens(loaded, inputs, kept, int(row["agg_layer"]), max_new_tokens)
        out.append({"agg_layer": int(row["agg_layer"]), "config": row["config"], "keep": int(row["keep"]),
                    "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "decode_tokens": int(tokens.shape[1])})
    return out


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Exact McNemar p-value of two paired correctness vectors (binomial on discordant pairs)."""
    from scipy.stats import binomtest

    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def accuracy_table(pred: pl.DataFrame, timing: pl.DataFrame, model_dims: dict,
                   config_timing: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per configuration: accuracy with its Wilson 95% interval, change vs the full model,
    exact McNemar p vs avg_all_heads at the same keep and layer, FLOPs and timings."""
    rows = []
    keys = ["agg_layer", "config", "method", "alpha", "keep"]
    for key, g in pred.group_by(keys, maintain_order=True):
        row = dict(zip(keys, key))
        g = g.sort("sample_id")
        correct = g["correct"].to_numpy()
        full = g["full_correct"].to_numpy()
        n = len(correct)
        lo, hi = stats.wilson_interval(int(correct.sum()), n)
        ref = pred.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("keep") == row["keep"],
                          pl.col("method") == "avg_all_heads").sort("sample_id")
        p = None
        if ref.height and row["method"] != "avg_all_heads":
            merged = g.join(ref.select("sample_id", pl.col("correct").alias("ref")), on="sample_id")
            p = mcnemar_exact(merged["correct"].to_numpy(), merged["ref"].to_numpy())
        n_tokens = int(g["prompt_tokens"].mean())
        n_image = int(g["n_image_tokens"][0])
        t = timing.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("keep") == row["keep"])
        own = _config_times(config_timing, row)
        rows.append({
            **row, "n": n, "accuracy": float(correct.mean()), "ci_lo": lo, "ci_hi": hi,
            "full_accuracy": float(full.mean()), "delta_vs_full": float(correct.mean() - full.mean()),
            "mcnemar_p_vs_avg": p,
            "flops_ratio": flops_mod.flops_ratio(n_tokens, n_image, int(row["keep"]), model_dims["num_layers"],
                                                 int(row["agg_layer"]), model_dims["hidden"],
                                                 model_dims["intermediate"]),
            "equivalent_image_tokens": flops_mod.equivalent_image_tokens(n_image, int(row["keep"]),
                                                                         model_dims["num_layers"],
                                                                         int(row["agg_layer"])),
            **own,
            "batched_prefill_ms_per_set": 1e3 * float(t["prefill_seconds"].sum() / max(t["n_sets"].sum(), 1)),
            "batched_decode_ms_per_token": 1e3 * float(t["decode_seconds"].sum() / max(t["decode_tokens"].sum(), 1)),
        })
    return pl.DataFrame(rows).sort(["agg_layer", "keep", "method", "alpha"], descending=[False, True, False, False],
                                   nulls_last=True)


def _config_times(config_timing: pl.DataFrame | None, row: dict) -> dict:
    """Mean batch-1 prefill ms, decode ms per token and prefill speed-up vs the full model."""
    empty = {"prefill_ms": None, "decode_ms_per_token": None, "prefill_speedup_vs_full": None, "timing_n": 0}
    if config_timing is None or config_timing.height == 0:
        return empty
    mine = config_timing.filter(pl.col("agg_layer") == row["agg_layer"], pl.col("config") == row["config"],
                                pl.col("keep") == row["keep"])
    full = config_timing.filter(pl.col("config") == "full model")
    if mine.height == 0:
        return empty
    prefill = float(mine["prefill_seconds"].mean())
    tokens = mine["decode_tokens"].sum()
    return {
        "prefill_ms": 1e3 * prefill,
        "decode_ms_per_token": 1e3 * float(mine["decode_seconds"].sum()) / tokens if tokens else None,
        "prefill_speedup_vs_full": float(full["prefill_seconds"].mean()) / prefill if full.height else None,
        "timing_n": mine.height,
    }


def statistics_frame(pred: pl.DataFrame, run_dir: Path) -> pl.DataFrame:
    """Predictions joined with each selection's statistics (overlap with avg_all_heads,
    head statistics, spatial statistics)."""
    sel_dir = run_dir / "select"
    overlap = pl.read_parquet(sel_dir / "overlap.parquet")
    vs_avg = pl.concat([
        overlap.filter(pl.col("config_a") == "avg_all_heads").select(
            "sample_id", "agg_layer", "keep", pl.col("config_b").alias("config"), pl.col("jaccard")),
        overlap.filter(pl.col("config_b") == "avg_all_heads").select(
            "sample_id", "agg_layer", "keep", pl.col("config_a").alias("config"), pl.col("jaccard")),
    ]).rename({"jaccard": "jaccard_vs_avg"})
    heads = pl.read_parquet(sel_dir / "heads.parquet").select("sample_id", "agg_layer", "max_head_share",
                                                                "head_entropy")
    out = pred.join(vs_avg, on=["sample_id", "agg_layer", "keep", "config"], how="left")
    out = out.with_columns(
        pl.when(pl.col("method") == "avg_all_heads").then(1.0).otherwise(pl.col("jaccard_vs_avg")).alias(
            "jaccard_vs_avg"))
    return out.join(heads, on=["sample_id", "agg_layer"], how="left")


def relations_table(frame: pl.DataFrame) -> pl.DataFrame:
    """How each statistic relates to being correct: Spearman rho with p-value, and accuracy
    by quantile of the statistic; per configuration and pooled over configurations."""
    from scipy.stats import spearmanr

    rows = []
    scopes = [(("pooled", None, None), frame.filter(pl.col("method") != "avg_all_heads"))]
    for key, g in frame.group_by(["config", "agg_layer", "keep"], maintain_order=True):
        scopes.append((key, g))
    for (config, layer, keep), g in scopes:
        correct = g["correct"].cast(pl.Float64).to_numpy()
        for stat in STATISTICS:
            x = g[stat].cast(pl.Float64).fill_null(np.nan).to_numpy()
            ok = ~np.isnan(x)
            base = {"scope": "pooled" if config == "pooled" else "configuration", "config": config,
                    "agg_layer": layer, "keep": keep, "statistic": stat, "n": int(ok.sum())}
            if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(correct[ok]) > 0:
                res = spearmanr(x[ok], correct[ok])
                rho, p = float(res.statistic), float(res.pvalue)
            else:
                rho, p = None, None
            qs = _quantile_accuracy(x[ok], correct[ok])
            rows.append({**base, "spearman_rho": rho, "p_value": p, **qs})
    return pl.DataFrame(rows, infer_schema_length=None)


def _quantile_accuracy(x: np.ndarray, correct: np.ndarray) -> dict:
    """Accuracy within each quartile bin of the statistic (ties kept in one bin)."""
    out = {}
    if len(x) == 0:
        return {f"accuracy_q{i + 1}": None for i in range(QUANTILES)}
    edges = np.quantile(x, np.linspace(0, 1, QUANTILES + 1))
    bins = np.clip(np.searchsorted(edges[1:-1], x, side="right"), 0, QUANTILES - 1)
    for i in range(QUANTILES):
        sel = bins == i
        out[f"accuracy_q{i + 1}"] = float(correct[sel].mean()) if sel.any() else None
    return out


PART_SAMPLES = 16
ANSWER_SCHEMA = {"sample_id": pl.Int64, "agg_layer": pl.Int64, "selection_id": pl.Utf8, "prediction": pl.Utf8,
                 "correct": pl.Boolean}
TIMING_SCHEMA = {"sample_id": pl.Int64, "agg_layer": pl.Int64, "keep": pl.Int64, "n_sets": pl.Int64,
                 "prefill_seconds": pl.Float64, "decode_seconds": pl.Float64, "decode_tokens": pl.Int64}


def _settings_key(model_id: str, data_sha256: str, max_new_tokens: int, selections: pl.DataFrame) -> str:
    """What the cached answers depend on: the kept sets asked for, model, data, answer length."""
    import hashlib

    asked = selections.select("sample_id", "agg_layer", "keep", "selection_id").unique().sort(pl.all())
    h = hashlib.sha256(f"{model_id}|{data_sha256}|{max_new_tokens}|".encode() + asked.write_csv().encode())
    return h.hexdigest()[:16]


class EvalParts:
    """Answers of finished samples, in parts under RUN/.eval-parts/<key>/, so an
    interrupted eval resumes where it stopped (key: selections, model, answer length)."""

    def __init__(self, root: Path, key: str):
        self.dir = root / ".eval-parts" / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Answers and timings of complete parts (a part is complete once its timing landed)."""
        timing = sorted(self.dir.glob("timing-*.parquet"))
        answers = [self.dir / f.name.replace("timing-", "answers-") for f in timing]
        return (pl.concat([pl.read_parquet(f) for f in answers]) if answers else pl.DataFrame(schema=ANSWER_SCHEMA),
                pl.concat([pl.read_parquet(f) for f in timing]) if timing else pl.DataFrame(schema=TIMING_SCHEMA))

    def write(self, answers: list[dict], timing: list[dict]) -> None:
        """Answers first, timing last: a part counts only once both are there."""
        if not timing:
            return
        numbers = [int(f.stem.split("-")[1]) for f in self.dir.glob("*-*.parquet")]
        n = max(numbers, default=-1) + 1
        atomic_write_parquet(pl.DataFrame(answers, schema=ANSWER_SCHEMA), self.dir / f"answers-{n:05d}.parquet")
        atomic_write_parquet(pl.DataFrame(timing, schema=TIMING_SCHEMA), self.dir / f"timing-{n:05d}.parquet")


def run_eval(cfg: EvalConfig, progress: bool = True, command: list[str] | None = None) -> dict:
    """Evaluate the select stage's configurations of ``cfg.run``; writes ``RUN/eval/``."""
    from tqdm.auto import tqdm

    from .adapters import get_adapter
    from .capture import BadSample, CaptureConfig, prepare
    from .data import load_questions
    from .loading import load_model
    from .provenance import file_sha256, fingerprint, versions
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
    selections = configurations(pl.read_parquet(sel_path), cfg)
    data_file = run.config["data"]
    if not Path(data_file).exists():
        raise FileNotFoundError(f"{data_file} (the run's question file) is missing")
    if file_sha256(data_file) != run.config.get("data_sha256"):
        raise ValueError(f"{data_file} changed since the capture of {cfg.run} (sha256 differs)")
    model_name = cfg.model or run.config["model"]
    loaded = load_model(model_name, cfg.device, cfg.dtype or run.config.get("dtype", "auto"))
    model_id = fingerprint(model_name, loaded.model)
    if model_id != run.config.get("model_fingerprint"):
        raise ValueError(f"model {model_name} (fingerprint {model_id}) is not the model of {cfg.run} "
                         f"(fingerprint {run.config.get('model_fingerprint')})")
    adapter = get_adapter(loaded.model)
    max_new = cfg.max_new_tokens or int(run.config.get("max_new_tokens", 10))
    questions = load_questions(data_file, errors=[])  # the same questions capture kept with --skip-bad
    capture_cfg = CaptureConfig(model=model_name, data=data_file, prompt_template=run.config.get("prompt_template"),
                                max_new_tokens=max_new)
    max_tokens = int(getattr(loaded.model.config.text_config, "max_position_embeddings", 1 << 30))

    out_dir = run.root / "eval"
    tmp = run.root / ".eval.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sample_ids = selections["sample_id"].unique().sort().to_list()
    parts = EvalParts(run.root, _settings_key(model_id, run.config.get("data_sha256", ""), max_new, selections))
    _, timing_parts = parts.load()
    done = set(timing_parts["sample_id"].to_list())
    answers_rows, timing_rows, mask_checks, timed, config_timing_rows = [], [], [], [], []
    by_sample = selections.partition_by("sample_id", as_dict=True)
    t_start = time.perf_counter()
    for sid in tqdm(sample_ids, desc="eval", unit="sample", disable=not progress):
        needs_mask = len(mask_checks) < cfg.compare_mask
        needs_timing = len(timed) < cfg.timing_samples
        if sid in done and not needs_mask and not needs_timing:
            continue
        try:
            prepared = prepare(sid, questions[sid], loaded.processor, capture_cfg, max_tokens, adapter.image_token_id)
        except BadSample:
            continue  # skipped at capture time too (errors.jsonl)
        rows = by_sample[(sid,)]
        if needs_timing:
            timed.append(sid)
            config_timing_rows.extend({"sample_id": sid, **t} for t in time_configurations(loaded, prepared, rows, max_new))
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
    answers_df, timing = parts.load()
    tmp.mkdir()
    pred = (
        selections.drop("kept")
        .join(answers_df, on=["sample_id", "agg_layer", "selection_id"], how="inner")
        .join(_full_baseline(run), on="sample_id", how="left")
        .join(run.samples.select("sample_id", "question_id", "category", "answer", "prompt_tokens", "n_image_tokens"),
              on="sample_id", how="left")
    )
    dims = {"num_layers": adapter.num_layers, "hidden": adapter.hidden_size, "intermediate": adapter.intermediate_size}
    config_timing = pl.DataFrame(config_timing_rows, infer_schema_length=None) if config_timing_rows else None
    accuracy = accuracy_table(pred, timing, dims, config_timing)
    relations = relations_table(statistics_frame(pred, run.root))
    atomic_write_parquet(pred, tmp / "predictions.parquet")
    atomic_write_parquet(accuracy, tmp / "accuracy.parquet")
    atomic_write_parquet(relations, tmp / "relations.parquet")
    atomic_write_parquet(timing, tmp / "timing.parquet")
    if config_timing is not None:
        atomic_write_parquet(config_timing, tmp / "config_timing.parquet")
    n_forwards = timing.height
    info = {
        "stage": "eval",
        "settings": asdict(cfg),
        "model": model_name,
        "model_fingerprint": model_id,
        "n_samples": len(sample_ids),
        "configurations_asked": selections.height,
        "distinct_kept_sets": answers_df.height,
        "shared_prefills": n_forwards,
        "max_new_tokens": max_new,
        "mask_check": mask_checks,
        "seconds": round(time.perf_counter() - t_start, 3),
        "versions": versions(),
        "command": command or sys.argv,
    }
    atomic_write_json(tmp / "eval.json", info)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    if mask_checks and not all(c["identical"] for c in mask_checks):
        bad = [c["sample_id"] for c in mask_checks if not c["identical"]]
        raise ValueError(f"mask and drop modes gave different answers on samples {bad} (see {out_dir}/eval.json)")
    return {**info, "accuracy": accuracy}
