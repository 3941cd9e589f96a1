"""Are two runs' tables identical? Every parquet table of capture, select and eval and every
answers file, measured times and storage bookkeeping left out
(:func:`fastv_analysis.compare.table_differences`).

Use it around a change that must not change results (a refactor): make a demo on the code
before and on the code after, then compare them:

    git stash; fastv-analyze demo --out /tmp/before --no-report; git stash pop
    fastv-analyze demo --out /tmp/after --no-report
    python benchmarks/compare_runs.py /tmp/before /tmp/after

Prints one line per difference and exits 1, or prints "identical: N tables" and exits 0. Image
paths and model ids are left out unless --same-checkout (two checkouts name their own folders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastv_analysis.compare import STAGES, table_names, table_differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--ignore", default="part_sha256,part_bytes",
                        help="comma list of columns to leave out besides the timing ones (storage bookkeeping)")
    parser.add_argument("--same-checkout", action="store_true",
                        help="also compare image paths and model ids (left out by default: runs made from two "
                             "checkouts name their own data and model folders)")
    args = parser.parse_args()
    diffs = table_differences(args.run_a, args.run_b, ignore_columns=[c for c in args.ignore.split(",") if c],
                              ignore_locations=not args.same_checkout)
    for line in diffs:
        print(line)
    if diffs:
        return 1
    n = sum(len(table_names(args.run_a / s)) for s in STAGES)
    print(f"identical: {n} tables")
    return 0


if __name__ == "__main__":
    sys.exit(main())
