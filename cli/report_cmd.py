"""``fastv-analyze report``: the run directory as an HTML report with figures."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("run", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="HTML file [default: RUN/report.html].")
def report_cmd(run, out):
    """Execute notebooks/report.ipynb headless on RUN: writes the HTML report (images
    embedded) and every figure as a PNG under RUN/figures/."""
    from fastv_analysis.report import render

    path = render(run, out)
    click.echo(f"report: {path} (figures in {run}/figures/)")
