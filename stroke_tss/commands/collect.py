"""Gather a run folder's finished folds into RUN/summary.json (after `cv --no-wait`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stroke_tss.runs.cv import unfinished_items
from stroke_tss.runs.summary import format_summary, read_summary, write_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run folder written by `stroke-tss cv`")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the CIs")


def main(args: argparse.Namespace) -> int:
    unfinished = unfinished_items(args.run)
    path = write_summary(args.run, num_resamples=args.resamples)
    print(format_summary(read_summary(args.run)))
    print(f"summary: {path}")
    if unfinished:
        print(f"not finished (waiting, running or failed): {', '.join(i.name for i in unfinished)}; the summary "
              "pools the finished folds only: collect again when they are done", file=sys.stderr)
    return 0
