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
    # The handler goes in before anything slow: a USR2 that finds no handler ends the process (the templates
    # start ranks with USR2 ignored until here).
    preempt.install(prefix=PREEMPT_PREFIX)
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
    """Run `work` with the preemption flag installed; after a save on preemption, exit with hpc's code.

    A rank that loses its peers (a node died, a rank was killed) ends with one line saying so, exit 1.
    """
    preempt.install(prefix=PREEMPT_PREFIX)
    try:
        work()
    except preempt.Preempted as exc:
        preempt.record_saved()  # the batch script requeues on the flag file, whatever exit code reaches it
        preempt.clear()
        print(f"stroke-tss {verb}: {exc}; run the same command again to resume", file=sys.stderr)
        return preempt.EXIT_CODE
    except Exception as exc:
        if not _lost_peer(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"stroke-tss {verb}: lost contact with another rank ({first}); its node or process may have "
              "died. Submit the job again (Slurm requeues it by itself after a node failure): it resumes from "
              "the last complete checkpoint", file=sys.stderr)
        return 1
    return 0


def _lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because a peer went away: torch's DistError (NCCL and c10d raise
    its subclasses), or gloo's transport errors and timeouts."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(exc, dist.DistError):
        return True
    # gloo raises a plain RuntimeError: "[.../gloo/transport/tcp/pair.cc:537] Read error [10.213.77.12]:44774:
    # Connection reset by peer", or "... Timed out waiting 60000ms for recv operation to complete"
    return isinstance(exc, RuntimeError) and "gloo/transport" in str(exc)
