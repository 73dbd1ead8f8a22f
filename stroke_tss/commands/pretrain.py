"""Models Genesis self-supervised pretraining, once per run, into RUN/genesis/."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML with a genesis section, e.g. configs/tss3d.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. genesis.epochs=2")


def main(args: argparse.Namespace) -> int:
    from hpc.env import destroy_distributed, init_distributed
    from stroke_tss.config import load_config
    from stroke_tss.errors import UserError
    from stroke_tss.logs import setup_logging
    from stroke_tss.pretrain import pretrain_genesis

    cfg = load_config(args.config, args.overrides)
    env = init_distributed(timeout_s=cfg.engine.timeout_s)
    setup_logging(env.rank)
    try:
        print(pretrain_genesis(cfg))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    finally:
        destroy_distributed()
    return 0
