"""The map of cohort size × ε × compute, drawn from the cells ``bench_utility.py --grid`` has recorded so far.

    .venv/bin/python benchmarks/experiments/bench_map.py bench_runs/map/results.jsonl [more.jsonl …] \\
        --figure bench_runs/map/map.png

A cell takes one to three hours on 2 CPU cores, so the map fills over several invocations (and machines: a GPU
run appends its rows the same way); this prints the Markdown table of every grid row found (``not run`` where
a cell has none; several runs of a cell side by side) and, with ``--figure``, the PNG of BENCHMARKS.md.
``--protocol small`` maps the n-per-label TSTR instead of the fair one (a cell of a 10 000-patient store is
scored with ``--small-tstr-only``: its fair synthetic set would be ten times the sampling).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_utility import grid_figure, grid_table


def load_rows(paths: list[Path]) -> list[dict]:
    """The grid rows (those with a ``cell``) of ``results.jsonl`` files, in file order."""
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "cell" in row:
                    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results.jsonl files of bench_utility.py --grid")
    parser.add_argument("--figure", type=Path, default=None, help="write the map as a PNG here")
    parser.add_argument(
        "--protocol",
        choices=("fair", "small"),
        default="fair",
        help="TSTR on a synthetic set as large as the real one (fair) or on --n slices per label (small)",
    )
    args = parser.parse_args()
    rows = load_rows(args.results)
    if not rows:
        parser.error("no grid rows in the files given (run bench_utility.py --grid first)")
    print(grid_table(rows, args.protocol))
    if args.figure:
        grid_figure(rows, args.figure, args.protocol)


if __name__ == "__main__":
    main()
