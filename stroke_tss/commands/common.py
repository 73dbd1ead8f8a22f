"""What the verbs share (not a verb itself): config arguments, starting a rank, the preemption exit."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from hpc import preempt
from hpc.env import DistEnv, destroy_distributed, init_distributed
from stroke_tss.config import Config, load_config
from stroke_tss.errors import UserError
from stroke_tss.logs import setup_logging
from stroke_tss.runs.folder import PREEMPT_PREFIX

log = logging.getLogger(__name__)

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
    try:
        env = init_distributed(timeout_s=cfg.engine.timeout_s)
    except ValueError as exc:  # the launcher's variables describe a world that cannot exist
        raise UserError(str(exc)) from None
    setup_logging(env.rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        _log_world(env)
        yield env
    finally:
        destroy_distributed()


def _log_world(env: DistEnv) -> None:
    """One line on rank 0 saying where the ranks run: the first thing to read in a job's log."""
    hosts = [socket.gethostname()]
    if env.distributed:
        hosts = [""] * env.world_size
        dist.all_gather_object(hosts, socket.gethostname())
    where = ", ".join(f"{host} x{hosts.count(host)}" for host in dict.fromkeys(hosts))
    job = f", Slurm job {env.job_id}" if env.job_id else ""
    log.info("%d rank(s) on %s (%s%s)", env.world_size, where, env.launcher, job)


def run_preemptible(verb: str, work: Callable[[], object]) -> int:
    """Run `work` with the preemption flag installed; after a save on preemption, exit with hpc's code."""
    preempt.install(prefix=PREEMPT_PREFIX)
    try:
        work()
    except preempt.Preempted as exc:
        preempt.record_saved()  # the batch script requeues on the flag file, whatever exit code reaches it
        print(f"stroke-tss {verb}: {exc}; run the same command again to resume", file=sys.stderr)
        return preempt.EXIT_CODE
    return 0
