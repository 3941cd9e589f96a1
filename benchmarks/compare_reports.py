"""Are two runs' reports the same? The set of figures under RUN/figures/ (names and pixels) and
every output of the executed RUN/report.ipynb (tables, text lines, inline images), the
``**Run** `<path>``` line's run directory left out.

Use it around a change to the report that must not change what it shows: render the report on
a run with the code before, copy the run, render it with the code after, then compare:

    fastv-analyze demo --out /tmp/before --limit 40 --quiet        # code before
    cp -a /tmp/before /tmp/after && fastv-analyze report /tmp/after  # code after
    python benchmarks/compare_reports.py /tmp/before /tmp/after

Prints one line per difference and exits 1, or prints what it compared and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def notebook_outputs(run: Path) -> list[tuple[int, str, str]]:
    """``(cell, mime type, content)`` of every output of RUN/report.ipynb, the run path masked."""
    path = run / "report.ipynb"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `fastv-analyze report {run}` first")
    out = []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        for o in cell.get("outputs", []):
            for kind, value in (o.get("data") or {"stream": o.get("text", "")}).items():
                text = "".join(value) if isinstance(value, list) else str(value)
                out.append((i, kind, text.replace(str(run.resolve()), "RUN").replace(str(run), "RUN")))
    return out


def figure_differences(a: Path, b: Path) -> list[str]:
    names_a = {p.name for p in (a / "figures").glob("*.png")}
    names_b = {p.name for p in (b / "figures").glob("*.png")}
    diffs = [f"figure {n}: only in {a}" for n in sorted(names_a - names_b)]
    diffs += [f"figure {n}: only in {b}" for n in sorted(names_b - names_a)]
    for name in sorted(names_a & names_b):
        pa, pb = (np.asarray(Image.open(r / "figures" / name)) for r in (a, b))
        if pa.shape != pb.shape or not (pa == pb).all():
            diffs.append(f"figure {name}: pixels differ ({pa.shape} vs {pb.shape})")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    oa, ob = notebook_outputs(args.run_a), notebook_outputs(args.run_b)
    diffs = figure_differences(args.run_a, args.run_b)
    if len(oa) != len(ob):
        diffs.append(f"report.ipynb: {len(oa)} outputs vs {len(ob)}")
    diffs += [f"report.ipynb cell {x[0]} ({x[1]}): {x[2][:80]!r} vs {y[2][:80]!r}"
              for x, y in zip(oa, ob) if x != y]
    for line in diffs:
        print(line)
    if not diffs:
        print(f"identical: {len(list((args.run_a / 'figures').glob('*.png')))} figures, {len(oa)} notebook outputs")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
