"""``fastv-analyze report``: the run directory as an HTML report with figures."""

from __future__ import annotations

import click

from .params import threads_option


@click.command("report")
@threads_option
@click.argument("run", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="HTML file [default: RUN/report.html].")
@click.option("--notebook", type=click.Path(dir_okay=False), default=None,
              help="Report notebook to execute (a papermill notebook with a `run_dir` parameter) "
                   "[default: notebooks/report.ipynb of the checkout].")
@click.option("-v", "--verbose", is_flag=True,
              help="On failure, print the failing cell's full traceback (it is always in RUN/report-error.log).")
def report_cmd(run, out, notebook, verbose):
    """Execute notebooks/report.ipynb headless on RUN (after capture and select; eval optional):
    writes the HTML report (images embedded) and every figure as a PNG under RUN/figures/.
    A failure prints one line (the failing cell and its error) and leaves no temporary files."""
    from pathlib import Path

    from fastv_analysis.lock import run_lock
    from fastv_analysis.report import render

    with run_lock(run, "report"):
        path = render(run, out, notebook=notebook, verbose=verbose)
    figures = Path(run) / "figures"
    where = f" (figures in {figures}/)" if figures.is_dir() else ""
    click.echo(f"report: {path}{where}")
