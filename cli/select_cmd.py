"""``fastv-analyze select``: replay strategies on a run's cached attention."""

from __future__ import annotations

import sys

import click

from fastv_analysis.layout import NEWLINE_POLICIES
from fastv_analysis.strategies import ALL_METHODS, METHODS, QUERIES

from .params import Choices, FloatGrid, IntList, threads_option


@click.command("select")
@threads_option
@click.argument("run", type=click.Path(file_okay=False, path_type=str))
@click.option("--methods", type=Choices(ALL_METHODS), default=",".join(METHODS), show_default=True,
              help="Comma list of selection methods to replay: " + ", ".join(ALL_METHODS) + " (the newer ones "
                   "read what capture --store kept: no_rope attention_no_rope, sink_excluded hidden_norm, "
                   "diverse sketch).")
@click.option("--queries", type=Choices(QUERIES), default="last", show_default=True,
              help="Query rows the attention rankings read: last (FastV's last prompt token), text_mean "
                   "(the instruction tokens), all_mean (every prompt token, the paper's); each adds a variant "
                   "of every ranking (needs capture --store attention_text_mean / attention_all_mean).")
@click.option("--alphas", type=FloatGrid(), default="0:1:0.1", show_default=True,
              help="weighted_combination alphas: inclusive start:stop:step or a comma list, each in [0, 1].")
@click.option("--keep", "keeps", type=IntList(), default="288,192,128,64", show_default=True,
              help="Comma list of image-token counts to keep (0 keeps none).")
@click.option("--keep-ratio", "keep_ratios", type=FloatGrid(), default="", show_default=False,
              help="Also keep these fractions of each sample's own image tokens, e.g. 0.5,0.25: a sample of N "
                   "tokens keeps ratio x N rounded half up (images of different sizes keep different counts). "
                   "Each ratio is its own configuration, named '<config> ratio <r>' (keep = that sample's count); "
                   "eval answers and reports it as one configuration (keep null in its tables).")
@click.option("--agg-layer", "agg_layers", type=IntList(), default=None,
              help="Aggregation layer(s) K to replay; default: every layer captured in RUN.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random control.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples of attention held in memory at once.")
@click.option("--newline-tokens", "newline", type=click.Choice(NEWLINE_POLICIES), default="prune", show_default=True,
              help="LLaVA-NeXT / OneVision image_newline tokens: prune (ranked like every image token, the budget "
                   "counts every visual token) or keep (always kept, outside the budget).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def select_cmd(run, methods, queries, alphas, keeps, keep_ratios, agg_layers, seed, chunk_size, newline, quiet):
    """Replay every method x alpha x keep on the attention cached in RUN.

    Writes RUN/select/selections.parquet (kept sets), overlap.parquet and
    overlap_summary.parquet (agreement between configurations), heads.parquet (head
    statistics) and select.json (what was run).
    """
    from fastv_analysis.lock import run_lock
    from fastv_analysis.select import run_select

    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise click.BadParameter(f"alpha {a:g} is outside [0, 1]", param_hint="--alphas")
    for r in keep_ratios:
        if not 0.0 <= r <= 1.0:
            raise click.BadParameter(f"ratio {r:g} is outside [0, 1]", param_hint="--keep-ratio")
    with run_lock(run, "select"):
        info = run_select(run, methods, alphas, keeps, keep_ratios, agg_layers, seed=seed,
                          chunk_size=chunk_size, progress=not quiet, command=sys.argv, newline=newline,
                          queries=queries)
    click.echo(f"select: {info['n_samples']} samples x {info['n_configurations']} configurations "
               f"(layers {info['agg_layers']}, keeps {info['keeps']}"
               + (f", ratios {info['keep_ratios']} of each sample's N" if info["keep_ratios"] else "")
               + f") in {info['seconds']:.1f}s -> {run}/select/")
