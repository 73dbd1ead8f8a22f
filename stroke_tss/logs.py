"""One logging set-up for every entry point: rank prefix, rank 0 at INFO, other ranks at WARNING."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int | None = None, *, level: str | int | None = None) -> None:
    """Configure the root logger once per process; later calls only update the rank prefix and level."""
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if level is None:
        level = os.environ.get("STROKE_TSS_LOG_LEVEL", "INFO" if rank == 0 else "WARNING")
    handler = logging.StreamHandler(sys.stderr)
    # The date too: a requeued job's log spans days, and its attempts append to one file.
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty libraries stay quiet unless asked.
    for noisy in ("distributed", "numcodecs", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
