"""Run one fold's phase schedule for each (or one) variant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML, e.g. configs/tss2d.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=2")
    parser.add_argument("--fold", type=int, required=True, help="fold index in RUN/splits.json")
    parser.add_argument("--variant", action="append", default=None, help="variant to run (repeatable; default all)")


def main(args: argparse.Namespace) -> int:
    import torch

    from hpc import preempt
    from hpc.env import destroy_distributed, init_distributed
    from stroke_tss.config import dump_config, load_config
    from stroke_tss.errors import UserError
    from stroke_tss.logs import setup_logging
    from stroke_tss.provenance import write_provenance
    from stroke_tss.schedule import run_fold
    from stroke_tss.train import PREEMPTED_EXIT, Preempted

    cfg = load_config(args.config, args.overrides)
    for name in args.variant or []:
        if name not in cfg.variants:
            raise UserError(f"--variant {name}: not in {args.config} (variants: {', '.join(cfg.variants)})")
    if not Path(cfg.data.store).exists():
        raise UserError(f"data.store {cfg.data.store} does not exist; build it with `stroke-tss prep`")
    env = init_distributed(timeout_s=cfg.engine.timeout_s)
    setup_logging(env.rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    preempt.install()
    if env.is_main:
        dump_config(cfg, Path(cfg.run.dir) / "config.yaml")
        write_provenance(Path(cfg.run.dir), store=Path(cfg.data.store), extra={"world_size": env.world_size})
    try:
        run_fold(cfg, fold=args.fold, variants=args.variant)
    except Preempted as exc:
        print(f"stroke-tss train: {exc}; run the same command again to resume", file=sys.stderr)
        return PREEMPTED_EXIT
    except ValueError as exc:
        raise UserError(str(exc)) from None
    finally:
        destroy_distributed()
    return 0
