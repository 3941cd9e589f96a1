"""Executing the report notebook headless (papermill, a kernel whose stderr is captured), the
HTML export, one-line errors with the full traceback in RUN/report-error.log, and
RUN/report.json.
"""

from __future__ import annotations

from pathlib import Path


NOTEBOOK = Path(__file__).resolve().parent.parent.parent / "notebooks" / "report.ipynb"

ERROR_LOG = "report-error.log"

# Lines the kernel process prints on every headless run that say nothing about the report:
# ipykernel's notice that the (local, loopback) ZMQ sockets are unencrypted, and the
# KeyboardInterrupt that jupyter_client's shutdown (interrupt, then shutdown request) can
# leave in the kernel's log. Every other line of the kernel's stderr is passed on.
KERNEL_NOISE = ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel")

REQUIRED = (("run.json", "capture"), ("samples.parquet", "capture"), ("select/selections.parquet", "select"),
            ("select/overlap_summary.parquet", "select"), ("select/heads.parquet", "select"))


class ReportError(ValueError):
    """The report could not be made; the message is one line (the CLI prints it as is)."""


def check_ready(run_dir: str | Path) -> Path:
    """Raise :class:`ReportError` naming what is missing unless ``run_dir`` has finished capture
    and select (eval is optional: its sections then say it has not run)."""
    root = Path(run_dir)
    if not (root / "run.json").exists():
        raise ReportError(f"{root} is not a run directory: {root / 'run.json'} is missing")
    for stage in ("capture", "select"):
        missing = [p for p, s in REQUIRED if s == stage and not (root / p).exists()]
        if missing:
            how = f"fastv-analyze select {root}" if stage == "select" else f"fastv-analyze capture ... --out {root}"
            raise ReportError(f"{root} has no finished {stage} stage: {', '.join(missing)} missing "
                              f"(run `{how}` first)")
    from ..provenance import stale_stages
    from ..store import open_run

    stale = stale_stages(open_run(root))
    if stale:  # accuracy of one grid beside overlap of another must never be shown together
        raise ReportError(next(iter(stale.values())))
    return root


def _kernel_manager_class(stderr):
    """A jupyter kernel manager whose kernel process writes its stderr to ``stderr`` (a file)."""
    from jupyter_client.manager import AsyncKernelManager

    class _CapturedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw.setdefault("stderr", stderr)
            return await super().start_kernel(**kw)

    return _CapturedKernelManager


def _read_kernel_stderr(stream) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().decode("utf-8", "replace").splitlines()


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def _one_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _source_cell_number(notebook: Path, source: str, executed_index: int) -> int:
    """1-based position of the failing cell in the notebook as written (papermill's index counts
    the parameters cell it injects)."""
    try:
        import nbformat

        cells = nbformat.read(notebook, as_version=4).cells
        return next(i for i, c in enumerate(cells, start=1) if c.source == source)
    except Exception:  # unreadable or not found: the executed notebook's position
        return int(executed_index) + 1


def _report_failure(root: Path, notebook: Path, err: BaseException, kernel_lines: list[str],
                    verbose: bool) -> ReportError:
    """Write RUN/report-error.log (the full traceback, the kernel's stderr) and return the one-line error."""
    import sys
    import time
    import traceback

    from ..store import atomic_write_bytes

    log = root / ERROR_LOG
    if hasattr(err, "ename") and hasattr(err, "traceback"):  # papermill: a cell raised
        cell = f"cell {_source_cell_number(notebook, getattr(err, 'source', ''), err.cell_index)} of {notebook.name}"
        source = _one_line(getattr(err, "source", ""), 60)
        line = (f"report notebook failed in {cell} (`{source}`): {err.ename}: {_one_line(err.evalue)}"
                f" [full traceback: {log}, or rerun with --verbose]")
        detail = _strip_ansi("\n".join(err.traceback))
        detail = f"{cell} ({notebook}):\n{getattr(err, 'source', '')}\n\n{detail}"
    else:
        line = (f"report notebook could not run: {type(err).__name__}: {_one_line(err)}"
                f" [details: {log}, or rerun with --verbose]")
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    kernel_lines = [ln for ln in kernel_lines if not any(n in ln for n in KERNEL_NOISE)]
    text = (f"fastv-analyze report {root} failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{detail}\n"
            + ("\nkernel stderr:\n" + "\n".join(kernel_lines) + "\n" if kernel_lines else ""))
    atomic_write_bytes(log, text.encode("utf-8"))
    if verbose:
        print(text, file=sys.stderr)
    return ReportError(line)


def render(run_dir: str | Path, out: str | Path | None = None, notebook: str | Path | None = None,
           progress: bool = False, verbose: bool = False) -> Path:
    """Execute the report notebook headless on ``run_dir`` (papermill) and export HTML.

    Writes RUN/report.ipynb (executed), RUN/figures/*.png and the HTML report (images
    embedded, code hidden) to ``out`` (default RUN/report.html), via temporary names.
    Refuses (:class:`ReportError`, nothing written) a run without finished capture and select.
    A failing notebook raises :class:`ReportError` with one line naming the cell and its
    error, writes the full traceback to RUN/report-error.log (also printed with ``verbose``)
    and leaves no temporary file. The kernel's stderr is captured: its constant
    "running over TCP without encryption" notice is dropped, any other line passed on.
    """
    import os
    import sys
    import tempfile

    root = check_ready(run_dir)
    notebook = Path(notebook) if notebook is not None else NOTEBOOK
    if not notebook.exists():
        raise ReportError(f"report notebook {notebook} is missing (install fastv-analysis with `pip install -e .`)")
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    out = Path(out) if out else root / "report.html"
    executed = root / f".report.tmp-{os.getpid()}.ipynb"
    html_tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tempfile.TemporaryFile() as kernel_stderr:
            try:
                pm.execute_notebook(str(notebook), str(executed), parameters={"run_dir": str(root.resolve())},
                                    kernel_name="python3", progress_bar=progress, cwd=str(root),
                                    kernel_manager_class=_kernel_manager_class(kernel_stderr))
            except Exception as err:  # a cell raised, the kernel died or did not start
                raise _report_failure(root, notebook, err, _read_kernel_stderr(kernel_stderr), verbose) from None
            noise = [ln for ln in _read_kernel_stderr(kernel_stderr) if not any(n in ln for n in KERNEL_NOISE)]
            if noise:
                print("\n".join(noise), file=sys.stderr)
        os.replace(executed, root / "report.ipynb")
        exporter = HTMLExporter(template_name="lab")
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
        body, _ = exporter.from_notebook_node(nbformat.read(root / "report.ipynb", as_version=4))
        html_tmp.write_text(body, encoding="utf-8")
        os.replace(html_tmp, out)
    finally:
        executed.unlink(missing_ok=True)
        html_tmp.unlink(missing_ok=True)
    (root / ERROR_LOG).unlink(missing_ok=True)  # the last report worked: an older failure log is stale
    _write_provenance(root, out, notebook)
    return out


def _write_provenance(root: Path, html: Path, notebook: Path) -> None:
    """RUN/report.json: what the report was made from (stage files, fingerprints, versions)."""
    import json

    from ..provenance import file_sha256, versions
    from ..store import atomic_write_json

    config = json.loads((root / "run.json").read_text())
    inputs = [p for p in ("samples.parquet", "select/select.json", "eval/eval.json") if (root / p).exists()]
    atomic_write_json(root / "report.json", {
        "stage": "report",
        "notebook": str(notebook),
        "notebook_sha256": file_sha256(notebook),
        "html": str(html),
        "figures": sorted(p.name for p in (root / "figures").glob("*.png")),
        "inputs_sha256": {p: file_sha256(root / p) for p in inputs},
        "model_fingerprint": config.get("model_fingerprint"),
        "data_sha256": config.get("data_sha256"),
        "versions": versions(),
    })
