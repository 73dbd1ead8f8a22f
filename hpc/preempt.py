"""Preemption as a flag: the signal handler only records it; the training loop acts at a step boundary.

    install()                      # at task start (CheckpointableTask does it)
    poll = Poll()
    for step in ...:
        ...
        if poll():                 # every rank calls it: they agree through an all_reduce
            save_checkpoint()      # every rank saves (ZeRO shards live on every rank)
            raise Preempted()      # CheckpointableTask then requeues (rank 0) and exits

`Poll` costs a step almost nothing: the flag file is looked at every few seconds, not at every step, and the
ranks' all_reduce runs in the background, its answer read at the next step (one step late, never a stall).

submitit's own handler requeues and exits inside the signal handler, before anything is saved; `install`
moves it aside and calls it only in `requeue_and_exit`, where its countdown of timeouts still applies.

A process that ends itself on preemption (a CLI verb under a plain sbatch script) calls `record_saved`, which
creates the flag file, and exits with `EXIT_CODE`. The sbatch templates requeue when the flag file exists
after the ranks ended (their USR2 trap creates it too), never on an exit code: torchrun reports a worker's
exit 75 as its own exit 1.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, NoReturn

log = logging.getLogger(__name__)

EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later", which a preempted run means

_flag = {"signum": None}
_file_var = {"name": "HPC_PREEMPT_FILE"}
_submitit_handler: dict[str, Any] = {"handler": None}


class Preempted(RuntimeError):  # noqa: N818 (a state, not an error)
    """Raised by a loop after every rank saved, to end the task so that it can be requeued (by
    `requeue_and_exit`, or by the caller's launcher when the process exits with `EXIT_CODE`)."""


def signal_number(name: str | None = None) -> signal.Signals:
    """The preemption signal: `name`, else $SUBMITIT_PREEMPT_SIGNAL, else USR2."""
    name = (name or os.environ.get("SUBMITIT_PREEMPT_SIGNAL") or "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ValueError(f"preemption signal {name!r} does not exist; use USR1 or USR2") from None


def install(name: str | None = None, *, prefix: str = "HPC") -> signal.Signals:
    """Route the preemption signal to the flag; keeps submitit's handler (if any) for the requeue.

    ``prefix`` names the environment variable of the flag file, ``{prefix}_PREEMPT_FILE`` (see `requested`).
    The first install clears the flag; installing again keeps a signal that arrived in between.
    """
    _file_var["name"] = f"{prefix}_PREEMPT_FILE"
    sig = signal_number(name)
    previous = signal.getsignal(sig)
    owner = getattr(previous, "__self__", None)
    if owner is not None and type(owner).__module__.startswith("submitit"):
        _submitit_handler["handler"] = previous
    signal.signal(sig, _on_signal)
    if previous is not _on_signal:
        _flag["signum"] = None
    return sig


def _on_signal(signum: int, frame: object) -> None:
    # Only record: saving here could interrupt an optimizer step or a collective half-way.
    _flag["signum"] = signum
    log.warning("received %s: will save and requeue at the next step boundary", signal.Signals(signum).name)


def request() -> None:
    """Ask for a save-and-requeue as if the signal had arrived (tests, or a caller's own policy)."""
    _flag["signum"] = int(signal_number())


def clear() -> None:
    _flag["signum"] = None


def requested(*, sync: bool = True) -> bool:
    """True when this rank (or, with sync under torch.distributed, any rank) got the signal, or the file
    that ``{prefix}_PREEMPT_FILE`` names (prefix as given to `install`) exists.

    With sync every rank must call it at the same step, since it is a collective.
    """
    local = _flag["signum"] is not None or _file_requested()
    if not sync:
        return local
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class Poll:
    """The preemption flag as all ranks agree on it, cheap enough to call at every step.

    Call it at every step boundary on every rank (under torch.distributed it is a collective). A single
    process gets its own flag at once. Under torch.distributed each call starts an asynchronous all_reduce of
    this rank's flag and returns the answer of the previous call's: the ranks learn of a signal one step
    after it arrived, and no rank waits for the slowest one just to hear "no". The flag file (see
    `requested`) lives on a shared filesystem; it is looked at every `file_every_s` seconds, not per step.
    """

    def __init__(self, *, file_every_s: float = 5.0) -> None:
        self.file_every_s = file_every_s
        self._file_checked = -float("inf")
        self._file_seen = False
        self._pending: tuple[Any, Any] | None = None

    def local(self) -> bool:
        """This rank's view: the signal arrived, or the flag file existed when last looked at."""
        if _flag["signum"] is not None:
            return True
        now = time.monotonic()
        if not self._file_seen and now - self._file_checked >= self.file_every_s:
            self._file_checked = now
            self._file_seen = _file_requested()
        return self._file_seen

    def __call__(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.local()
        import torch

        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            self._pending = None
            agreed = bool(flag.item())
        if not agreed:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([1 if self.local() else 0], dtype=torch.int32, device=device)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return agreed

    def close(self) -> None:
        """Wait for the all_reduce in flight (every rank, before the process group goes away)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def record_saved() -> None:
    """A run saved on preemption: create the flag file, which tells the batch script to requeue the job.

    Needed when the signal reached the ranks and not the batch shell (`scancel --signal=USR2`, or
    `--signal=USR2@T` without `B:`). Nothing happens when no flag file is configured.
    """
    path = os.environ.get(_file_var["name"])
    if path:
        with open(path, "a"):
            pass


def _file_requested() -> bool:
    # Under srun+torchrun the signal reaches torchrun, which does not forward USR2; the sbatch templates
    # trap it in the batch shell and touch this file (on a filesystem every node sees) instead.
    path = os.environ.get(_file_var["name"])
    return bool(path) and os.path.exists(path)


def requeue_and_exit(*, rank: int | None = None) -> NoReturn:
    """Rank 0 requeues the job (through submitit when it started us, else `scontrol requeue`); all exit.

    Ends the process without a result, so the requeued run delivers it.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank != 0:
        log.info("rank %d: leaving for the requeue", rank)
        sys.exit(0)
    signum = _flag["signum"] or int(signal_number())
    handler = _submitit_handler["handler"]
    if handler is not None:
        handler(signum, None)  # checkpoint(), countdown of timeouts, requeue, sys.exit
        sys.exit(-1)  # not reached: submitit exits or raises
    job_id = _slurm_job_id()
    if job_id is None:
        raise RuntimeError("preempted outside Slurm and submitit: nothing can requeue this run; rerun it")
    log.warning("requeueing Slurm job %s", job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    sys.exit(0)


def _slurm_job_id() -> str | None:
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc.preempt exit-code``: print EXIT_CODE, so shell scripts hold no copy of it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hpc.preempt", description=main.__doc__)
    parser.add_argument("what", choices=["exit-code"])
    parser.parse_args(argv)
    print(EXIT_CODE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
