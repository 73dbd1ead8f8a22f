"""Models Genesis self-supervised pretraining, once per run, into RUN/genesis/."""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.commands.common import ranks, run_preemptible
from stroke_tss.config import load_config
from stroke_tss.runs.folder import check_store
from stroke_tss.runs.pretrain import pretrain_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML with a genesis section, e.g. configs/tss3d.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. genesis.epochs=2")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_store(cfg)
    with ranks(cfg):
        return run_preemptible("pretrain", lambda: print(pretrain_run(cfg)))
