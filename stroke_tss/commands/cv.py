"""Cross-validate: every fold x variant as one job array (Slurm, local processes or in-process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.commands.common import add_config_arguments, load_with_executor
from stroke_tss.runs.cv import run_cv
from stroke_tss.runs.summary import format_summary, read_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-wait", action="store_true",
                        help="submit and return; gather later with `stroke-tss collect RUN`")
    parser.add_argument("--variant", action="append", dest="variants", metavar="NAME",
                        help="run only this variant (repeatable; default: every variant of the config)")


def main(args: argparse.Namespace) -> int:
    cfg = load_with_executor(args)
    results = run_cv(cfg, wait=not args.no_wait, variants=args.variants)
    run_dir = Path(cfg.run.dir)
    if args.no_wait:
        jobs = sorted({r.job_id.split("_")[0] for r in results})
        where = f" as job {', '.join(jobs)}" if jobs else ""
        print(f"submitted {len(results)} items{where}; when they finish: stroke-tss collect {run_dir}")
        return 0
    failed = [r for r in results if r.state == "failed"]
    print(format_summary(read_summary(run_dir)))
    print(f"summary: {run_dir / 'summary.json'}")
    for r in failed:
        print(f"FAILED {r.name}: {r.error} (log: {r.log})")
    return 1 if failed else 0
