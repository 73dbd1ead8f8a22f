"""Fold parallelism of `stroke-tss cv` and the local Slurm's submit-to-start latency.

folds_parallel_vs_seq: 4 folds of configs/tiny.yaml through the local executor, all at once
(launch.array_parallelism=4) vs one after another (=1), one thread each; ratio = sequential / parallel time.
slurm_start_vs_fold: how small the scheduler's delay is next to the tiny fold it starts; ratio = mean
sequential fold time / median submit-to-start latency; detail: sbatch round trip, single jobs, an array of 4,
Slurm's own submit->start, and the delay before a requeued job's function runs again.
Run as a module by `python -m bench`.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUM_FOLDS = 4


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the fold processes, once reaped)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cv_launch(store: Path, run_dir: Path, *, parallelism: int) -> tuple[float, float]:
    """Wall seconds and cores used (CPU seconds / wall seconds) to run every fold of tiny.yaml (variant 2d)
    through the local executor; splits are made first."""
    from hpc.launch import launch_items
    from stroke_tss.config import load_config
    from stroke_tss.runs.cv import FoldTask, fold_items
    from stroke_tss.runs.folder import prepare_run

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.store={store}", f"run.dir={run_dir}", f"cv.folds={NUM_FOLDS}", "launch.executor=local",
        f"launch.array_parallelism={parallelism}", "launch.cpus_per_task=1"])
    prepare_run(cfg)
    items = fold_items(cfg, ["2d"])
    start, cpu = time.perf_counter(), _cpu_seconds()
    results = launch_items(FoldTask(cfg.model_dump(mode="json")), items, config=cfg.launch,
                           folder=run_dir / "jobs", names=[i.name for i in items], poll_s=0.5)
    seconds = time.perf_counter() - start
    cores = (_cpu_seconds() - cpu) / seconds
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{failed[0].name} failed: {failed[0].error} (log: {failed[0].log})")
    return seconds, cores


def _folds(tmp: Path) -> tuple[dict, float]:
    from tests.fixtures.data import build_tiny_store

    store = build_tiny_store()
    load_before = os.getloadavg()[0]
    seq, seq_cores = _cv_launch(store, tmp / "seq", parallelism=1)
    par, par_cores = _cv_launch(store, tmp / "par", parallelism=NUM_FOLDS)
    load_after = os.getloadavg()[0]
    ratio = seq / par
    row = {"name": "folds_parallel_vs_seq", "ratio": round(ratio, 3), "target": 1.7,
           "detail": (f"{NUM_FOLDS} folds of tiny.yaml (2d, 4 phases), local executor, 1 thread each, "
                      f"{os.cpu_count()} cores: one after another {seq:.1f} s using {seq_cores:.2f} cores, all at once "
                      f"{par:.1f} s using {par_cores:.2f} cores; 1-min load average {load_before:.1f} before, "
                      f"{load_after:.1f} after{_autogroup_note()}")}
    return row, seq / NUM_FOLDS


def _autogroup_note() -> str:
    # With autogroup the kernel shares CPU fairly between sessions, not processes: while other sessions
    # keep the cores busy, 4 fold processes get the share 1 got, and the ratio says nothing about the code.
    flag = Path("/proc/sys/kernel/sched_autogroup_enabled")
    return "; autogroup on: CPU is shared per session" if flag.exists() and flag.read_text().strip() == "1" else ""


# ---------------------------------------------------------------- Slurm latency


def _started() -> float:
    return time.time()


def _note_start_then_sleep(path: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"{time.time()}\n")
    time.sleep(120)  # long enough that the requeue, not the end of the function, ends the first run


def _until(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s on the local Slurm")
        time.sleep(0.1)


def _requeue_delay(executor, tmp: Path) -> float:
    """Seconds from `scontrol requeue` of a running job to its function starting again."""
    starts = tmp / "starts.txt"
    job = executor.submit(_note_start_then_sleep, str(starts))
    _until(starts.exists)
    requeued = time.time()
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    _until(lambda: len(starts.read_text().split()) >= 2)
    restart = float(starts.read_text().split()[1]) - requeued
    job.cancel(check=False)
    return restart


def _slurm_times(job_id: str) -> tuple[datetime, datetime]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    return datetime.fromisoformat(fields["SubmitTime"]), datetime.fromisoformat(fields["StartTime"])


def _latency(tmp: Path) -> dict | None:
    import cloudpickle
    import submitit

    env_file = os.environ.get("STROKE_TSS_SLURM_ENV")
    if not env_file or not Path(env_file).is_file():
        print("   slurm_start_vs_fold: not measured, the local Slurm is not up "
              "(export STROKE_TSS_SLURM_ENV=$(bash slurm/local/up.sh))", flush=True)
        return None
    from tests.fixtures.slurm import read_env_file

    env = read_env_file(Path(env_file))
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    os.environ["PATH"] = env["STROKE_TSS_SLURM_BIN"] + os.pathsep + os.environ["PATH"]
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job need not import bench/

    executor = submitit.AutoExecutor(folder=tmp / "slurm", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1)
    singles, slurm_gap, sbatch_s = [], [], []
    for _ in range(5):
        submitted = time.time()
        job = executor.submit(_started)
        sbatch_s.append(time.time() - submitted)
        singles.append(job.result() - submitted)
        submit, start = _slurm_times(job.job_id)
        slurm_gap.append((start - submit).total_seconds())
    submitted = time.time()
    with executor.batch():
        batch = [executor.submit(_started) for _ in range(4)]
    array = [j.result() - submitted for j in batch]
    # A requeue waits for the job credential to expire (cred_expire + 1 s) before the job may start again.
    restart = _requeue_delay(executor, tmp)
    median = statistics.median(singles)
    return {"median": median, "detail": (
        f"submit->fn start: single jobs median {median:.2f} s (min {min(singles):.2f}, max {max(singles):.2f}, "
        f"n=5; sbatch call {statistics.median(sbatch_s):.2f} s; Slurm submit->start {statistics.median(slurm_gap):.0f} s "
        f"at 1 s resolution); array of 4: {min(array):.2f}-{max(array):.2f} s; scontrol requeue->function "
        f"restart {restart:.1f} s (this cluster: cred_expire=10, KillWait=5)")}


def run() -> list[dict]:
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folds_row, fold_s = _folds(tmp)
        rows = [folds_row]
        latency = _latency(tmp)
    if latency is not None:
        ratio = fold_s / latency["median"]
        rows.append({"name": "slurm_start_vs_fold", "ratio": round(ratio, 3), "target": 5.0,
                     "detail": f"tiny fold {fold_s:.1f} s; {latency['detail']}"})
    return rows
