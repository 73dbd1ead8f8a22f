"""The whole method on a phantom cohort: synth -> prep -> cv (2d, 3d, 2d_scratch, 2d_seg) -> report + Grad-CAM.

`--gates OUT0 OUT1 ...` runs nothing: it reads the demo.json of finished demos (one per seed) and prints each
gate per seed and over the seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.commands.common import EXECUTORS
from stroke_tss.errors import UserError
from stroke_tss.runs.demo import run_demo
from stroke_tss.runs.gates import combine_seeds, format_seed_table, read_demo_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="output folder (cohort/, store.zarr, run/); re-running on it resumes")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where the folds run: local processes (default), the Slurm cluster, or in-process")
    parser.add_argument("--size", choices=("small", "paper"), default="small",
                        help="small: 4 mm grid, narrow widths (a 2-core CPU); paper: 2 mm, paper widths (GPUs)")
    parser.add_argument("--subjects", type=int, default=None, help="phantom subjects (default: per --size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort and of training")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for prep")
    parser.add_argument("--lesions", type=Path, default=None,
                        help="folder of real lesion masks (default: ../shared/data/soop/lesions when present)")
    parser.add_argument("--gates", type=Path, nargs="+", metavar="OUT", default=None,
                        help="run nothing: combine the gates of finished demos (their --out folders, one per seed)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo's experiment config")


def main(args: argparse.Namespace) -> int:
    if args.gates:
        print(format_seed_table(combine_seeds(read_demo_results(args.gates))))
        return 0
    if args.subjects is not None and args.subjects < 20:
        raise UserError(f"--subjects {args.subjects}: cross-validation needs at least 20 subjects")
    if args.lesions is not None and not args.lesions.is_dir():
        raise UserError(f"--lesions {args.lesions}: not a folder of lesion masks")
    run_demo(args.out, size=args.size, executor=args.executor, seed=args.seed, subjects=args.subjects,
             workers=args.workers, lesions=args.lesions, overrides=args.overrides)
    return 0
