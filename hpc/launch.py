"""Run a callable once per work item: one Slurm job array, local processes, or in this process.

Generic: an item is any picklable value; `fn(item, out_dir)` runs with one output folder per item.
Make `fn` a `CheckpointableTask` to survive preemption (see hpc.preempt).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import submitit
from submitit.core.utils import FailedJobError

from hpc import preempt
from hpc.launch_config import LaunchConfig

log = logging.getLogger(__name__)

State = Literal["done", "failed", "submitted"]
_MAX_FORCE_EVERY_S = 60.0


@dataclass
class ItemResult:
    """What became of one work item."""

    index: int
    name: str
    out_dir: Path
    """The item's own output folder (passed to fn)."""
    job_id: str
    state: State
    value: Any = None
    """fn's return value (rank 0's under several tasks) when done."""
    error: str | None = None
    """Last line of the failure when failed."""
    log: Path | None = None
    """stderr log of the item's job (rank 0)."""

    @property
    def ok(self) -> bool:
        return self.state == "done"


class CheckpointableTask(submitit.helpers.Checkpointable):
    """Base of work items that survive preemption. Subclasses implement `run(*args, **kwargs)`.

    On the preemption/timeout signal the handler only sets a flag (hpc.preempt). The loop inside `run`
    polls `preempt.requested()` at step boundaries, every rank saves, and raises `preempt.Preempted`;
    then rank 0 requeues the same call (submitit's `checkpoint()`: same arguments, since the state lives
    in the output folder) and every rank exits without a result. A requeue that calls no handler (node
    failure, `scontrol requeue`) must resume from the output folder too, so `run` should always do so.
    """

    preempt_prefix: str = "HPC"
    """Prefix of the flag file's environment variable, ``{preempt_prefix}_PREEMPT_FILE`` (hpc.preempt.install)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        preempt.install(prefix=self.preempt_prefix)
        try:
            return self.run(*args, **kwargs)
        except preempt.Preempted as exc:
            log.warning("%s; requeueing", exc)
            preempt.requeue_and_exit()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement run()")


def make_executor(config: LaunchConfig, folder: Path) -> submitit.Executor:
    """The submitit executor the config names, with its resources set."""
    if config.executor == "slurm" and not _on_path("sbatch"):
        raise ValueError("launch.executor=slurm but sbatch is not on PATH; use launch.executor=local or run on a Slurm login node")
    executor = submitit.AutoExecutor(folder=folder, cluster=config.executor, slurm_max_num_timeout=config.max_num_timeout)
    params: dict[str, Any] = dict(timeout_min=config.time_min, tasks_per_node=config.tasks_per_node)
    if config.executor == "slurm":
        extra = {"signal": f"{config.signal}@{config.signal_delay_s}", **config.slurm_extra}
        if config.account:
            extra.setdefault("account", config.account)
        params.update(
            nodes=config.nodes,
            cpus_per_task=config.cpus_per_task,
            gpus_per_node=config.gpus_per_node,
            slurm_array_parallelism=config.array_parallelism,
            slurm_signal_delay_s=config.signal_delay_s,
            slurm_additional_parameters=extra,
            slurm_setup=list(config.setup),
        )
        if config.partition:
            params["slurm_partition"] = config.partition
        if config.mem_gb:
            params["mem_gb"] = config.mem_gb
    elif config.executor == "local":
        params.update(gpus_per_node=config.gpus_per_node)
    executor.update_parameters(**params)
    return executor


def launch_items(
    fn: Callable[[Any, Path], Any],
    items: Sequence[Any],
    *,
    config: LaunchConfig,
    folder: Path,
    names: Sequence[str] | None = None,
    wait: bool = True,
    poll_s: float = 2.0,
) -> list[ItemResult]:
    """Run `fn(item, folder / name)` for every item as one array; returns one ItemResult per item.

    Waits with a live status line (stderr) and reports each failed item with its log as soon as it
    fails, while the others go on. With wait=False returns at once with state "submitted".
    Raises ValueError, before anything runs, when the scheduler refuses the submission.
    """
    folder = Path(folder)
    names = list(names) if names is not None else [f"item-{i:03d}" for i in range(len(items))]
    if len(names) != len(items) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(items)} distinct folder names, one per item; got {names}")
    # local processes all start at once unless throttled here, and only a waiting caller can throttle
    first = len(items) if config.executor == "slurm" else config.array_parallelism
    if not wait and config.executor == "local" and first < len(items):
        raise ValueError(f"wait=False needs launch.array_parallelism >= {len(items)} with the local executor")
    out_dirs = [folder / name for name in names]
    created = [out_dir for out_dir in out_dirs if not out_dir.exists()]
    for out_dir in out_dirs:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_folder = config.folder or folder / "submitit"
    if config.executor == "debug":
        return _run_in_process(fn, items, out_dirs=out_dirs, names=names, log_folder=log_folder)
    executor = make_executor(config, log_folder)
    try:
        jobs = _submit(executor, fn, list(items[:first]), out_dirs[:first], config)
    except ValueError:  # refused: leave no empty item folders behind either
        for out_dir in created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    pending = list(range(first, len(items)))
    results = [ItemResult(i, names[i], out_dirs[i], job.job_id, "submitted") for i, job in enumerate(jobs)]
    if not wait:
        return results
    return _wait(jobs, results, pending, fn=fn, items=items, out_dirs=out_dirs, names=names, executor=executor,
                 config=config, poll_s=poll_s)


def _submit(executor, fn, items, out_dirs, config: LaunchConfig) -> list:
    if not items:
        return []
    try:
        with _job_environ(config):
            return executor.map_array(fn, items, out_dirs)
    except FailedJobError as exc:
        lines = str(exc).strip().splitlines() or ["no message"]
        raise ValueError(f"{config.executor} refused the submission: {lines[-1]} (check launch.partition, "
                         f"launch.account and the resources in the launch section)") from None


@contextlib.contextmanager
def _job_environ(config: LaunchConfig) -> Iterator[None]:
    # Jobs inherit the submitting environment (sbatch --export=ALL, local subprocesses).
    # SUBMITIT_PREEMPT_SIGNAL tells submitit inside the job which signal is the preemption one.
    wanted = {"SUBMITIT_PREEMPT_SIGNAL": config.signal}
    if "OMP_NUM_THREADS" not in os.environ:
        wanted["OMP_NUM_THREADS"] = str(config.cpus_per_task)
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait(jobs, results, pending, *, fn, items, out_dirs, names, executor, config, poll_s) -> list[ItemResult]:
    total = len(items)
    unfinished = set(range(len(jobs)))
    status = _StatusLine(total)
    # A finished job is seen from its result file at every poll; only a job that died without one needs the
    # scheduler (sacct). Those checks back off from poll_s to once a minute: a run of hours asks a few
    # hundred times, not every poll_s.
    force_every, force_at = poll_s, 0.0
    while unfinished or pending:
        if unfinished and time.monotonic() >= force_at:  # one forced poll refreshes the whole array (one sacct)
            jobs[min(unfinished)].done(force_check=True)
            force_at = time.monotonic() + force_every
            force_every = min(2 * force_every, _MAX_FORCE_EVERY_S)
        ready = [i for i in sorted(unfinished) if jobs[i].done()]
        for i in ready:
            unfinished.discard(i)
            _collect(jobs[i], results[i])
            if not results[i].ok:
                status.clear()
                log.error("item %s failed: %s (log: %s)", results[i].name, results[i].error, results[i].log)
                print(f"[launch] {results[i].name} failed: {results[i].error}\n  log: {results[i].log}",
                      file=sys.stderr)
        while pending and len(unfinished) < config.array_parallelism:
            i = pending.pop(0)
            (job,) = _submit(executor, fn, [items[i]], [out_dirs[i]], config)
            jobs.append(job)
            results.append(ItemResult(i, names[i], out_dirs[i], job.job_id, "submitted"))
            unfinished.add(len(jobs) - 1)
        states = [jobs[i].state for i in unfinished]
        status.show(results, running=sum(s == "RUNNING" for s in states), waiting=len(pending) + len(states)
                    - sum(s == "RUNNING" for s in states))
        if unfinished and not ready:
            time.sleep(poll_s)
    status.close(results)
    return sorted(results, key=lambda r: r.index)


def _run_in_process(fn, items, *, out_dirs, names, log_folder: Path) -> list[ItemResult]:
    # submitit's DebugExecutor opens pdb on a failure; here a failure is reported like the other executors'.
    log_folder.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (item, out_dir, name) in enumerate(zip(items, out_dirs, names)):
        result = ItemResult(i, name, out_dir, f"debug-{i}", "submitted", log=log_folder / f"{name.replace('/', '_')}.err")
        try:
            result.value, result.state = fn(item, out_dir), "done"
        except Exception as exc:
            result.log.write_text(traceback.format_exc())
            result.state, result.error = "failed", f"{type(exc).__name__}: {exc}"
            print(f"[launch] {name} failed: {result.error}\n  log: {result.log}", file=sys.stderr)
        results.append(result)
    return results


def _collect(job, result: ItemResult) -> None:
    result.log = Path(job.paths.stderr)
    try:
        result.value = job.results()[0]  # rank 0's: submitit's result() refuses a job of several tasks
        result.state = "done"
    except Exception as exc:  # the item's own error (FailedJobError), or a killed job (UncompletedJobError)
        result.error = _error_line(str(exc)) or type(exc).__name__
        result.state = "failed"


def _error_line(message: str) -> str:
    """The exception line of submitit's failure text (its traceback sits between dashed rules)."""
    lines = message.strip().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("-----")]
    if len(rules) >= 2:
        lines = lines[rules[0] + 1 : rules[1]]
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1] if lines else ""


class _StatusLine:
    """One line that rewrites itself on a terminal; a new line per change elsewhere (log files)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.last = ""

    def show(self, results: list[ItemResult], *, running: int, waiting: int) -> None:
        done = sum(r.state == "done" for r in results)
        failed = sum(r.state == "failed" for r in results)
        text = f"[launch] {done}/{self.total} done, {running} running, {waiting} waiting, {failed} failed"
        if text == self.last:
            return
        self.last = text
        print(f"\r{text}" if self.tty else text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.tty and self.last:
            print("\r" + " " * len(self.last) + "\r", end="", file=sys.stderr, flush=True)
            self.last = ""

    def close(self, results: list[ItemResult]) -> None:
        self.show(results, running=0, waiting=0)
        if self.tty:
            print(file=sys.stderr)


def _on_path(program: str) -> bool:
    return any(os.access(Path(d) / program, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep) if d)
