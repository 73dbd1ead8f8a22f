"""Models Genesis self-supervised pretraining into RUN/genesis/: one per fold (`genesis.subjects: fold`, each
on its fold's train and val subjects, RUN/genesis/fold-<k>/), or one for the run (`all`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.commands.common import ranks, run_preemptible
from stroke_tss.config import load_config
from stroke_tss.runs.folder import check_run_folder, write_run_files
from stroke_tss.runs.pretrain import pretrain_folds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML with a genesis section, e.g. configs/tss3d.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. genesis.epochs=2")
    parser.add_argument("--fold", type=int, default=None,
                        help="pretrain only this fold (genesis.subjects: fold); default: every fold, one after another")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_run_folder(cfg)  # every rank, before anything is written
    folds = None if args.fold is None else [args.fold]
    with ranks(cfg) as env:
        if env.is_main:
            # the folds that start from RUN/genesis/ must come from the config that made it
            write_run_files(cfg, provenance={"world_size": env.world_size})
        return run_preemptible("pretrain", lambda: print(*pretrain_folds(cfg, folds), sep="\n"))
