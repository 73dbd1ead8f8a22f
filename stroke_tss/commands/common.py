"""What the verbs share (not a verb itself): config arguments, starting a rank, the preemption exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from hpc import preempt
from hpc.env import DistEnv, destroy_distributed, init_distributed
from stroke_tss.config import Config, load_config
from stroke_tss.logs import setup_logging
from stroke_tss.runs.folder import PREEMPT_PREFIX

EXECUTORS = ("slurm", "local", "debug")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. cv.folds=3")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where items run (default: launch.executor of the config)")


def load_with_executor(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.executor:
        overrides.append(f"launch.executor={args.executor}")
    return load_config(args.config, overrides)


@contextmanager
def ranks(cfg: Config) -> Iterator[DistEnv]:
    """This process as a rank of the job (one rank outside torchrun/srun), with logging and threads set up."""
    env = init_distributed(timeout_s=cfg.engine.timeout_s)
    setup_logging(env.rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        yield env
    finally:
        destroy_distributed()


def run_preemptible(verb: str, work: Callable[[], object]) -> int:
    """Run `work` with the preemption flag installed; after a save on preemption, exit with hpc's code."""
    preempt.install(prefix=PREEMPT_PREFIX)
    try:
        work()
    except preempt.Preempted as exc:
        print(f"stroke-tss {verb}: {exc}; run the same command again to resume", file=sys.stderr)
        return preempt.EXIT_CODE
    return 0
