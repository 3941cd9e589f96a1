"""Click parameter types for the grids researchers sweep (alphas, keeps, methods)."""

from __future__ import annotations

import math

import click


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number", param_hint=flag) from None


class FloatGrid(click.ParamType):
    """``0:1:0.1`` (inclusive start:stop:step) or a comma list ``0.3,0.5``."""

    name = "GRID"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        flag = param.opts[0] if param else None
        text = str(value).strip()
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                self.fail(f"{text!r}: a range is start:stop:step", param, ctx)
            start, stop, step = (_float(p, flag) for p in parts)
            if step <= 0 or stop < start:
                self.fail(f"{text!r}: need step > 0 and stop >= start", param, ctx)
            n = int(math.floor((stop - start) / step + 1e-9))  # never past stop
            return [round(start + i * step, 10) for i in range(n + 1)]
        return [_float(p, flag) for p in text.split(",") if p.strip()]


class IntList(click.ParamType):
    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        out = []
        for p in str(value).split(","):
            p = p.strip()
            if not p:
                continue
            try:
                out.append(int(p))
            except ValueError:
                self.fail(f"{p!r} is not a whole number", param, ctx)
            if out[-1] < 0:
                self.fail(f"{p!r} is negative", param, ctx)
        return out


class Choices(click.ParamType):
    """Comma list whose items must come from ``choices``."""

    name = "LIST"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [p.strip() for p in str(value).split(",") if p.strip()]
        for item in items:
            if item not in self.choices:
                self.fail(f"unknown {item!r}; choose from {', '.join(self.choices)}", param, ctx)
        return items


DEFAULT_THREADS = 1
"""torch's intra-op threads. One thread is as fast as two on the toy demo when the machine
is idle and 10x faster when another process is busy (README, "Threads"): PyTorch's thread
pool spins and collapses when it shares cores."""


def set_threads(ctx, param, value):
    """Click callback: apply --threads before the command runs (torch and the papermill
    kernel, which reads OMP_NUM_THREADS from the environment)."""
    import os

    os.environ["OMP_NUM_THREADS"] = str(value)
    os.environ["MKL_NUM_THREADS"] = str(value)
    import torch

    torch.set_num_threads(value)
    return value


def threads_option(command):
    """``--threads N`` on a stage command (default :data:`DEFAULT_THREADS`)."""
    return click.option("--threads", type=click.IntRange(min=1), default=DEFAULT_THREADS, show_default=True,
                        callback=set_threads, expose_value=False, is_eager=True,
                        help="CPU threads for torch (1 does not collapse when another process shares the "
                             "cores; more can help on an idle many-core machine).")(command)
