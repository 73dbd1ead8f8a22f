"""Check a store or a run folder end to end: what is damaged, by subject or phase, and what to re-run."""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.runs.verify import verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, metavar="STORE|RUN", help="a Zarr store from `prep` or a run folder")


def main(args: argparse.Namespace) -> int:
    """Exit 0 when everything checked is intact, 1 when something is damaged."""
    report = verify(args.path)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
