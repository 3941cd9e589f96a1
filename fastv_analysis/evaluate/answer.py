"""Answering: every distinct kept set of one sample through one shared prefill and greedy decode
(the ``full`` control on the same path), batch-1 timings of each configuration alone, and the
loop over this process's samples that writes them into resumable parts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from ..loading import sync_device
from ..samples import BadSample, PromptSettings, model_inputs, prepare
from ..scoring import is_correct


def _stages(text: str | None):
    from ..pruning import Stage

    return [Stage(int(k), int(kp), str(m)) for k, kp, m in json.loads(text or "[]")]


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
    if "positions" not in rows.columns:
        rows = rows.with_columns(pl.lit("original").alias("positions"))
    for key, group in rows.group_by(["agg_layer", "keep", "stages", "positions"], maintain_order=True):
        distinct = group.unique("selection_id", keep="first", maintain_order=True)
        step = 1 if mode == "mask" and key[0] == 0 else batch_size  # mask mode cannot fan out the input at K = 0
        groups.extend((key, distinct.slice(i, step)) for i in range(0, distinct.height, step))
    for (layer, keep, stages, positions), distinct in groups:
        kept = torch.tensor(distinct["kept"].to_list(), dtype=torch.long)  # newlines kept by policy widen it
        tokens, t0, t1, t2 = pruned_answer_tokens(loaded, inputs, kept, int(layer), max_new_tokens, mode,
                                                  _stages(stages), group_merge(distinct, kept), positions)
        texts = processor.batch_decode(tokens, skip_special_tokens=True)
        answers.update(((int(layer), sid), t.strip()) for sid, t in zip(distinct["selection_id"].to_list(), texts))
        timings.append({"agg_layer": int(layer), "keep": int(keep), "n_sets": distinct.height,
                        "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                        "decode_tokens": int(tokens.shape[1]) * distinct.height})
    return answers, timings


def group_merge(rows: pl.DataFrame, kept: torch.Tensor):
    """The merge plans ``[C, N]`` of rows answered in one prefill (a drop's: its identity plan),
    None when none of them merges."""
    from ..pruning import drop_plan
    from ..select import row_merge
    from ..strategies import Merge

    if "merge_assign" not in rows.columns or rows["merge_assign"].null_count() == rows.height:
        return None
    plans = [row_merge(r) for r in rows.select("merge_assign", "merge_weight").iter_rows(named=True)]
    n = next(p.assign.shape[-1] for p in plans if p is not None)
    plans = [p if p is not None else drop_plan(k[None], n) for p, k in zip(plans, kept)]
    return Merge(torch.stack([p.assign.reshape(-1) for p in plans]), torch.stack([p.weight.reshape(-1) for p in plans]))


def pruned_answer_tokens(loaded, inputs: dict, kept: torch.Tensor, agg_layer: int, max_new_tokens: int,
                         mode: str = "drop", stages=(), merge=None, positions: str = "original"):
    """Greedy answer tokens ``[C, T]`` of C kept sets sharing one prefill (each followed by
    the schedule's ``stages``; ``merge``: their merge plans, ``positions``: the policy), with
    the clock readings (start, prefill done, decode done)."""
    from ..pruning import greedy_decode, prefill_shared

    eos = loaded.model.generation_config.eos_token_id
    pad = loaded.processor.tokenizer.pad_token_id or 0
    t0 = time.perf_counter()
    with prefill_shared(loaded.model, inputs, kept, agg_layer, mode=mode, stages=stages, merge=merge,
                        positions=positions) as shared:
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
                                    stages=_stages(row.get("stages")), merge=group_merge(pl.DataFrame([row]), kept),
                                    positions=row.get("positions") or "original")

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


@dataclass
class Answered:
    """What this process's loop measured besides the answers (those are in the parts):
    the mask-vs-drop checks, the samples timed at batch 1 and their timing rows."""

    n_samples: int = 0
    mask_checks: list[dict] = field(default_factory=list)
    timed: list[int] = field(default_factory=list)
    config_timing: list[dict] = field(default_factory=list)


def _mask_check(loaded, prepared, rows: pl.DataFrame, answers: dict, max_new: int, batch_size: int) -> dict:
    """Whether mask mode answers one sample's sets as drop mode did (the sets mask mode can
    represent: drops under original positions)."""
    if "merge_assign" in rows.columns:
        rows = rows.filter(pl.col("merge_assign").is_null())
    if "positions" in rows.columns:
        rows = rows.filter(pl.col("positions") == "original")
    masked, _ = evaluate_sample(loaded, prepared, rows, max_new, mode="mask", batch_size=batch_size)
    return {"sample_id": prepared.sample_id, "n_sets": len(answers),
            "identical": all(masked[k] == v for k, v in answers.items())}


def _answer_rows(sid: int, question, answers: dict) -> list[dict]:
    return [{"sample_id": sid, "agg_layer": layer, "selection_id": sel_id, "prediction": text,
             "correct": is_correct(text, question.answer, question.choices)} for (layer, sel_id), text in answers.items()]


def answer_samples(loaded, adapter, plan, parts, rank: int = 0, world: int = 1, progress: bool = True) -> Answered:
    """Answer this process's share of ``plan``'s samples (every ``world``-th) into ``parts``,
    skipping samples a finished part holds; rank 0 also times its first samples at batch 1
    and checks mask mode against drop mode on its first ``compare_mask`` samples."""
    from tqdm.auto import tqdm

    cfg, max_new = plan.cfg, plan.max_new_tokens
    settings = PromptSettings(data=plan.data_file, benchmark=plan.benchmark, max_new_tokens=max_new,
                              prompt_template=plan.run.config.get("prompt_template"))
    done = set(parts.load()[1]["sample_id"].to_list())
    by_sample = plan.selections.partition_by("sample_id", as_dict=True)
    mine = plan.sample_ids[rank::world]
    out = Answered(n_samples=len(mine))
    for sid in tqdm(mine, desc=f"eval[{rank}]" if world > 1 else "eval", unit="sample", disable=not progress):
        needs_mask = rank == 0 and len(out.mask_checks) < cfg.compare_mask
        needs_timing = rank == 0 and len(out.timed) < cfg.timing_samples
        if sid in done and not needs_mask and not needs_timing:
            continue
        try:
            prepared = prepare(sid, plan.questions[sid], loaded.processor, settings, adapter.max_positions,
                               adapter.image_token_id)
        except BadSample:
            continue  # skipped at capture time too (errors.jsonl)
        rows = by_sample[(sid,)]
        if needs_timing:
            out.timed.append(sid)
            out.config_timing.extend({"sample_id": sid, **t} for t in time_configurations(
                loaded, prepared, rows, max_new, repeats=cfg.timing_repeats))
        if sid in done and not needs_mask:
            continue
        answers, timings = evaluate_sample(loaded, prepared, rows, max_new, batch_size=cfg.batch_size)
        if needs_mask:
            out.mask_checks.append(_mask_check(loaded, prepared, rows, answers, max_new, cfg.batch_size))
        if sid not in done:
            parts.add(_answer_rows(sid, plan.questions[sid], answers), [{"sample_id": sid, **t} for t in timings])
    parts.flush()
    return out
