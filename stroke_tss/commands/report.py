"""Table-2 report, ROC/learning/calibration plots, DeLong, readers and baselines from run folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.errors import UserError
from stroke_tss.report import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder(s) to report on together")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first RUN)")
    parser.add_argument("--store", type=Path, default=None,
                        help="store with the subjects table for readers and baselines (default: config.yaml's)")
    parser.add_argument("--specificity", type=float, default=0.9, help="fixed specificity for sensitivity")
    parser.add_argument("--resamples", type=int, default=2000, help="subject bootstrap resamples for CIs")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    if not 0 < args.specificity < 1:
        raise UserError(f"--specificity must be between 0 and 1, got {args.specificity}")
    if args.resamples < 100:
        raise UserError(f"--resamples must be at least 100 for a 95% CI, got {args.resamples}")
    path = write_report(args.runs, out_dir=args.out, store=args.store, specificity=args.specificity,
                        num_resamples=args.resamples, seed=args.seed)
    print(path)
    return 0
