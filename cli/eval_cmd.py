"""``fastv-analyze eval``: re-run the model with each selection pruned and score it."""

from __future__ import annotations

import sys

import click

from .params import Choices, FloatGrid, IntList, threads_option
from fastv_analysis.pruning.config import SCHEDULE_PRESETS, preset_stages
from fastv_analysis.strategies import ALL_METHODS


@click.command("eval")
@threads_option
@click.argument("run", type=click.Path(file_okay=False, path_type=str))
@click.option("--agg-layer", "agg_layers", type=IntList(), default=None,
              help="Aggregation layer(s) K to evaluate; default: every selected layer.")
@click.option("--methods", type=Choices(ALL_METHODS), default=None, help="Only these methods (comma list).")
@click.option("--configs", default=None, help="Only these selection labels, comma list (e.g. "
              "avg_all_heads,avg_all_heads@text_mean,random); see the config column of selections.parquet.")
@click.option("--alphas", type=FloatGrid(), default=None, help="Only these weighted_combination alphas.")
@click.option("--then", "then", default=None, metavar="K:KEEP[:METHOD],...|pdrop",
              help="Also answer every configuration as the first cut of a per-layer schedule: then at layer K keep "
                   "KEEP of what the previous cut kept (a count, or a fraction like 0.5), ranked by METHOD "
                   "(default avg_all_heads) on the pruned model's layer K-1 attention, e.g. 4:0.5:max_head; "
                   "pdrop: PyramidDrop's 16:0.5,24:0.5 (after a first cut at K = 8, keep ratio 0.5).")
@click.option("--keep", "keeps", type=IntList(), default=None,
              help="Only these select --keep counts (never a --keep-ratio configuration, whose count is each "
                   "sample's own).")
@click.option("--keep-ratio", "keep_ratios", type=FloatGrid(), default=None,
              help="Only these select --keep-ratio configurations: each sample keeps ratio x its own N image tokens "
                   "(rounded half up), so one ratio is one configuration, '<config> ratio <r>', with keep null in the "
                   "tables (each sample's count in predictions' n_kept). With --keep, both kinds are answered.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Answer length [default: the capture's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="At most this many kept sets of one sample go through layers K.. as one batch "
                   "(a sample with more distinct sets at one keep count shares layers 0..K-1 per chunk).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N samples.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default=None, help="Model dtype [default: the capture's].")
@click.option("--compare-mask", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also run mask mode on the first N samples and fail unless the answers are identical.")
@click.option("--timing-samples", type=click.IntRange(min=0), default=5, show_default=True, metavar="N",
              help="Time every configuration on its own (batch 1), the full control included, on the first N "
                   "samples.")
@click.option("--timing-repeats", type=click.IntRange(min=1), default=3, show_default=True, metavar="R",
              help="Timed passes per sample after one warm-up pass, each over every configuration in a fresh "
                   "seeded order; accuracy.parquet reports medians and quartiles.")
@click.option("--positions", type=click.Choice(["original", "compact"]), default=None,
              help="Positions policy of every pruned set: original (kept tokens and merged slots keep their anchor's "
                   "position) or compact (the reduced sequence re-numbered) [default: each strategy's registered "
                   "policy]; a compact configuration's label ends in 'positions=compact'.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_cmd(run, agg_layers, methods, configs, alphas, then, keeps, keep_ratios, max_new_tokens, batch_size, limit, device,
             dtype, compare_mask, timing_samples, timing_repeats, positions, quiet):
    """Evaluate every selected configuration of RUN with the pruned model, replaying the
    kept sets of RUN/select/selections.parquet (so capture, select and eval agree token for
    token).

    Every sample is also answered with nothing pruned (the `full` control) through the same
    code path; it is the reference. Writes RUN/eval/predictions.parquet, accuracy.parquet
    (accuracy, 95% Wilson interval, change vs full, exact McNemar vs full, vs
    avg_all_heads and vs random with Holm and BH columns, FLOPs, timings), relations.parquet
    (overlap / head / spatial statistics vs correctness), oracle.parquet and adaptive.parquet
    (choosing the strategy per sample: the oracle bound and a cross-validated rule on cached
    statistics) and eval.json.
    """
    from fastv_analysis.evaluate import EvalConfig, run_eval
    from fastv_analysis.lock import run_lock

    configs = [c.strip() for c in configs.split(",") if c.strip()] if configs else None
    stages = None
    if then and then.strip() in SCHEDULE_PRESETS:
        stages = preset_stages(then.strip())
    elif then:
        stages = []
        for part in then.split(","):
            bits = part.strip().split(":")
            try:
                k, amount = int(bits[0]), (float(bits[1]) if "." in bits[1] else int(bits[1]))
            except (ValueError, IndexError):
                raise click.BadParameter(f"{part!r}: expected K:KEEP[:METHOD]", param_hint="--then") from None
            stages.append((k, amount, *(bits[2:3] or ["avg_all_heads"])))
    cfg = EvalConfig(run=run, agg_layers=agg_layers, methods=methods, configs=configs, then=stages, alphas=alphas,
                     keeps=keeps, keep_ratios=keep_ratios,
                     max_new_tokens=max_new_tokens, device=device, dtype=dtype, limit=limit, batch_size=batch_size,
                     timing_samples=timing_samples, timing_repeats=timing_repeats, compare_mask=compare_mask,
                     positions=positions)
    with run_lock(run, "eval", device):  # one eval per run directory (a launch's ranks share it)
        info = run_eval(cfg, progress=not quiet, command=sys.argv)
    if "rank" in info:  # a non-zero process of a sharded eval: rank 0 writes the tables
        click.echo(f"eval[{info['rank']}]: {info['n_samples']} samples answered")
        return
    click.echo(f"eval: {info['n_samples']} samples, {info['configurations_asked']} configurations asked, "
               f"{info['distinct_kept_sets']} distinct kept sets answered in {info['shared_prefills']} shared "
               f"prefills ({info['seconds']:.1f}s) -> {run}/eval/")
    if compare_mask:
        click.echo(f"mask check: identical answers on {len(info['mask_check'])} samples")
    click.echo(headline(info["accuracy"]))
    f = info["full_vs_capture"]
    click.echo(f"full control vs capture's answers: {f['differ']} of {f['compared']} differ")


def headline(accuracy) -> str:
    """The accuracy table as text: one row per configuration."""
    import polars as pl

    cols = ["agg_layer", "keep", "config", "n", "accuracy", "ci_lo", "ci_hi", "delta_vs_full", "flops_ratio"]
    table = accuracy.select(cols).with_columns(pl.col(pl.Float64).round(3))
    if "mcnemar_p_vs_full_holm" in accuracy.columns:  # Holm over the whole table, scientific notation
        table = table.with_columns(accuracy["mcnemar_p_vs_full_holm"].map_elements(
            lambda p: f"{p:.1e}", return_dtype=pl.Utf8).fill_null("").alias("p_vs_full_holm"))
    longest = max((len(c) for c in table["config"]), default=0)  # configuration labels print whole
    with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=max(160, 130 + longest),
                   fmt_str_lengths=max(32, longest), tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        return str(table)
