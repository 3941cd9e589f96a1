"""``fastv-analyze``: a thin click group over the library; tests call :func:`main` in process.

torch and transformers are imported inside the commands that need them, so ``--help``
and ``select`` start fast.
"""

from __future__ import annotations

import sys

import click

from .select_cmd import select_cmd

STAGES_TODO = {
    "capture": "the capture stage (issue 4)",
    "eval": "the eval stage (issue 5)",
    "report": "the report (issue 6)",
    "demo": "the one-command demo (issue 6)",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fastv-analysis")
def cli():
    """Analyse FastV visual-token pruning: capture -> select -> eval -> report."""


cli.add_command(select_cmd)


def _not_yet(name: str, what: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"Not available yet: {what}.")
    def cmd():
        raise click.ClickException(f"`fastv-analyze {name}` is not available yet: {what} is not built")

    return cmd


def _register_optional():
    import importlib

    for name, what in STAGES_TODO.items():
        try:
            mod = importlib.import_module(f"fastv_analysis.cli.{name}_cmd")
            cli.add_command(getattr(mod, f"{name}_cmd"))
        except ModuleNotFoundError as err:
            if err.name != f"fastv_analysis.cli.{name}_cmd":
                raise
            cli.add_command(_not_yet(name, what))


_register_optional()


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
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        click.echo(f"Error: {msg}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
