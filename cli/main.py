"""``fastv-analyze``: a thin click group over the library; tests call :func:`main` in process.

torch and transformers are imported inside the commands that need them, so ``--help``
and ``select`` start fast.
"""

from __future__ import annotations

import sys

import click

from fastv_analysis.lock import RunLocked

from .capture_cmd import capture_cmd
from .demo_cmd import demo_cmd
from .eval_cmd import eval_cmd
from .report_cmd import report_cmd
from .score_cmd import score_cmd
from .select_cmd import select_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fastv-analysis")
def cli():
    """Analyse FastV visual-token pruning: capture -> select -> eval -> report (demo: all four on the toy)."""


for command in (capture_cmd, select_cmd, eval_cmd, report_cmd, demo_cmd, score_cmd):
    command.context_settings.setdefault("max_content_width", 100)
    cli.add_command(command)


def main(args: list[str] | None = None) -> int:
    """Run the CLI; errors become one line on stderr and a non-zero exit code."""
    try:
        cli.main(args=args, prog_name="fastv-analyze", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        return e.exit_code
    except (ValueError, FileNotFoundError, KeyError, RunLocked) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        click.echo(f"Error: {msg}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
