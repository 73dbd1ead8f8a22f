"""Validate a manifest and preprocess it into a chunked Zarr store (Dask)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import distributed  # noqa: F401  (it sets its loggers' levels when imported; main() lowers them after)

from data_prep.build import prep
from stroke_tss.config.prep import load_prep_config
from stroke_tss.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="cohort manifest CSV (from `stroke-tss scan` or `synth`)")
    parser.add_argument("store", type=Path, help="Zarr store to build, or to complete when it exists")
    parser.add_argument("--workers", type=int, default=2,
                        help="Dask workers (local processes, or Slurm jobs with --cluster slurm); one subject each")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local",
                        help="local: a LocalCluster on this machine; slurm: dask-jobqueue workers as Slurm jobs")
    parser.add_argument("--config", type=Path,
                        help="YAML preprocessing config: PrepConfig keys at the top level or under `prep:`")
    parser.add_argument("--partition", help="--cluster slurm: partition (queue) of the worker jobs")
    parser.add_argument("--account", help="--cluster slurm: account of the worker jobs")
    parser.add_argument("--memory", default="4GB", help="--cluster slurm: memory per worker job")
    parser.add_argument("--walltime", default="01:00:00", help="--cluster slurm: time limit per worker job")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs and batch jobs)")


def _slurm_options(args: argparse.Namespace) -> dict:
    opts = {"memory": args.memory, "walltime": args.walltime}
    if args.partition:
        opts["queue"] = args.partition
    if args.account:
        opts["account"] = args.account
    return opts


def main(args: argparse.Namespace) -> int:
    config = load_prep_config(args.config)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    options = _slurm_options(args) if args.cluster == "slurm" else None
    # Dask logs every worker start and stop at INFO; our own lines and the progress bar say what matters.
    for name in ("distributed", "dask_jobqueue"):
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    result = prep(args.manifest, args.store, config=config, workers=args.workers, cluster=args.cluster,
                  cluster_options=options, progress=not args.no_progress)
    new = len(result.done) - len(result.skipped) - len(set(result.reprocessed) & set(result.done))
    print(f"store {result.store}: {len(result.done)} subject(s) ({new} new, {len(result.reprocessed)} "
          f"re-processed, {len(result.skipped)} kept), {len(result.failed)} failed, "
          f"{time.perf_counter() - start:.1f} s")
    for title, changes in (("re-processed (input files changed)", result.reprocessed),
                           ("table updated from the manifest", result.updated)):
        if changes:
            print(f"  {title}: " + "; ".join(f"{sid} ({', '.join(cols)})" for sid, cols in changes.items()))
    if not result.failed:
        return 0
    for line in result.failed.values():
        print(f"  failed: {line}")
    print(f"failures listed in {result.store / 'failures.csv'}; fix them and run prep again to add them")
    return 1
