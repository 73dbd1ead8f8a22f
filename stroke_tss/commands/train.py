"""Run one fold's phase schedule for each (or one) variant."""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.commands.common import ranks, run_preemptible
from stroke_tss.config import load_config
from stroke_tss.errors import UserError
from stroke_tss.runs.folder import check_run_folder, write_run_files
from stroke_tss.schedule import run_fold


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML, e.g. configs/tss2d.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=2")
    parser.add_argument("--fold", type=int, required=True, help="fold index in RUN/splits.json")
    parser.add_argument("--variant", action="append", default=None, help="variant to run (repeatable; default all)")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    for name in args.variant or []:
        if name not in cfg.variants:
            raise UserError(f"--variant {name}: not in {args.config} (variants: {', '.join(cfg.variants)})")
    check_run_folder(cfg)  # every rank, before anything is written
    with ranks(cfg) as env:
        if env.is_main:
            write_run_files(cfg, provenance={"world_size": env.world_size})
        return run_preemptible("train", lambda: run_fold(cfg, fold=args.fold, variants=args.variant))
