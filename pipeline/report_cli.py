"""``ssam-pipeline report RUN [--output DIR]``: a static HTML report of a run (finished or running).

Examples::

    ssam-pipeline report runs/smoke                  # -> runs/smoke/report/index.html
    ssam-pipeline report /data/runs/laion-0 --output /tmp/laion-0-report --samples 48
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` command to ``ssam-pipeline``'s subparsers."""
    p = subparsers.add_parser(
        "report",
        help="write a static HTML report of a run",
        description="Write index.html and its plots: accounting, labels, scores, sources, throughput, "
        "a contact sheet. Reads only committed shards, so it works while the run is going.",
    )
    p.add_argument("run_dir", help="the run directory (output.dir)")
    p.add_argument(
        "--output", metavar="DIR", default=None, help="folder for the report (default: RUN_DIR/report)"
    )
    p.add_argument(
        "--samples", type=int, default=24, metavar="N", help="samples on the contact sheet (default: 24)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the contact sheet's random sample (default: 0)"
    )
    return p


def main(args: argparse.Namespace) -> int:
    from .report import collect
    from .report_html import write_report

    run = Path(args.run_dir)
    if not run.is_dir():
        print(f"error: {run}: no such run directory", file=sys.stderr)
        return 2
    stats = collect(run, sheet_size=args.samples, seed=args.seed)
    index = write_report(stats, args.output or run / "report")
    print(f"report of {len(stats.shards)} committed shard(s), {stats.written} sample(s): {index}")
    if stats.smoke:
        print("*** SMOKE RUN: output made by tiny random models; it is marked smoke and means nothing ***")
    return 0
