"""``fastv-analyze demo``: capture -> select -> eval -> report on the embedded toy default."""

from __future__ import annotations

import time

import click

from .params import threads_option


@click.command("demo")
@threads_option
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Run directory to write.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N questions (quick look).")
@click.option("--agg-layer", type=int, default=2, show_default=True)
@click.option("--keep", default="192,64,16", show_default=True)
@click.option("--alphas", default="0:1:0.25", show_default=True)
@click.option("--no-report", is_flag=True, help="Stop after eval.")
@click.option("--overwrite", is_flag=True, help="Replace OUT when it holds a run made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(out, limit, agg_layer, keep, alphas, no_report, overwrite, quiet):
    """The whole pipeline on the toy LLaVA and toy VQA set shipped in data/ (CPU, minutes)."""
    from fastv_analysis.capture import CaptureConfig, run_capture
    from fastv_analysis.evaluate import EvalConfig, run_eval
    from fastv_analysis.lock import run_lock
    from fastv_analysis.probes import STORE_OPTIONS
    from fastv_analysis.select import ScoreConfig, run_select, score_configs
    from fastv_analysis.strategies import ALL_METHODS, QUERIES

    from .eval_cmd import headline
    from .params import FloatGrid, IntList

    keeps = IntList().convert(keep, None, None)
    alpha_list = FloatGrid().convert(alphas, None, None)
    t0 = time.perf_counter()
    from fastv_analysis.store import RunMismatchError

    click.echo(f"[1/4] capture: full model on the toy VQA set -> {out}")
    capture = CaptureConfig(out=out, agg_layers=[agg_layer], limit=limit, batch_size=8, overwrite=overwrite,
                            store=list(STORE_OPTIONS))
    try:
        with run_lock(out, "capture"):  # each stage as its own command takes it: one process per stage
            captured = run_capture(capture, progress=not quiet)
    except RunMismatchError as err:  # never delete a run this command did not make
        raise click.ClickException(f"{err} (demo --overwrite replaces it)") from None
    if limit is not None and (captured["n_samples"] or 0) > limit:  # a run grows with --limit, never shrinks
        click.echo(f"note: {out} already holds {captured['n_samples']} samples; --limit {limit} does not shrink "
                   f"a run, so select, eval and report use all {captured['n_samples']} (--overwrite or another "
                   f"--out for {limit})")
    click.echo("[2/4] select: replaying strategies on the cached attention")
    with run_lock(out, "select"):
        run_select(out, ALL_METHODS, alpha_list, keeps, agg_layers=[agg_layer], progress=not quiet, queries=QUERIES)
    # eval answers every strategy on the last token's rows, and FastV's ranking by the other
    # two queries (select compares all query variants offline, at no model cost)
    answered = [c.label for c in score_configs(ALL_METHODS, alpha_list)]
    answered += [ScoreConfig("avg_all_heads", query=q).label for q in QUERIES if q != "last"]
    click.echo("[3/4] eval: pruned model on every distinct kept set")
    with run_lock(out, "eval"):
        info = run_eval(EvalConfig(run=out, agg_layers=[agg_layer], configs=answered), progress=not quiet)
    if not no_report:
        from fastv_analysis.report import render

        click.echo("[4/4] report: executing notebooks/report.ipynb")
        with run_lock(out, "report"):
            path = render(out)
        click.echo(f"report: {path}")
    click.echo(headline(info["accuracy"]))
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f}s; run directory: {out}")
