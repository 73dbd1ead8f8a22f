"""The local one-node Slurm runs what users submit through submitit: arrays, multi-task gloo jobs, and a
killed job reads as failed instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.fixtures.slurm import (
    LOCAL,
    alive,
    job_states,
    read_env_file,
    start_cluster,
    stop_cluster,
    wait_for_jobs,
)

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(180)]

# Functions defined here run inside Slurm jobs, where the tests package is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _square(x: int) -> int:
    return x * x


def _all_reduce_rank() -> dict:
    import torch
    import torch.distributed as dist

    from hpc.env import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    env = init_distributed(timeout_s=60)
    value = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(value)
    destroy_distributed()
    return {"rank": env.rank, "world_size": env.world_size, "launcher": env.launcher, "sum": value.item()}


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "finished"


def _executor(folder: Path, **params) -> submitit.AutoExecutor:
    # A fresh folder per test: job ids restart with every fresh cluster, and old results would be read.
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", **params)
    return executor


def test_job_array_returns_every_result(slurm_cluster, tmp_path):
    executor = _executor(tmp_path / "array", slurm_array_parallelism=4)
    jobs = executor.map_array(_square, [0, 1, 2, 3])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "expected one array job"
    assert [job.result() for job in jobs] == [0, 1, 4, 9]


def test_two_task_job_all_reduces_over_gloo(slurm_cluster, tmp_path):
    executor = _executor(tmp_path / "ddp", nodes=1, tasks_per_node=2, cpus_per_task=1)
    job = executor.submit(_all_reduce_rank)
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["launcher"] == "slurm" for r in results)
    assert [r["sum"] for r in results] == [3.0, 3.0]


def test_killed_job_raises_instead_of_hanging(slurm_cluster, tmp_path):
    executor = _executor(tmp_path / "killed")
    job = executor.submit(_sleep, 300)
    deadline = time.monotonic() + 120
    while job.watcher.get_state(job.job_id, mode="force") != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} not started within 120 s"
        time.sleep(0.5)
    subprocess.run(["scancel", job.job_id], check=True, timeout=60)
    # Forced polls only make this quicker than submitit's back-off; without sacct it would never end.
    deadline = time.monotonic() + 60  # its own deadline: a slow start must not eat the time to end
    while not job.done(force_check=True):
        assert time.monotonic() < deadline, f"job {job.job_id} still not done 60 s after scancel"
        time.sleep(0.5)
    # submitit then waits _results_timeout_s (15 s) for a result file lagging on NFS; local disk does not lag.
    job._results_timeout_s = 1
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
    assert job.state.startswith("CANCELLED")


def _sbatch(*args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--output=/dev/null", *args],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip().split(";")[0]


def test_the_sacct_shim_gives_submitit_the_states_squeue_shows(slurm_cluster):
    """Without slurmdbd, slurm/local/sacct answers submitit's own query from squeue: run submitit's command
    and parser on jobs held, running, completed, failed and cancelled, and on array tasks (a finished pair
    and a pending range), and every job reads as squeue shows it."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    jobs = {"held": _sbatch("--hold", "--wrap", "true"),
            "held_array": _sbatch("--hold", "--array=0-1", "--wrap", "true"),
            "completed": _sbatch("--wrap", "true"),
            "failed": _sbatch("--wrap", "exit 3"),
            "array": _sbatch("--array=0-1", "--wrap", "exit $SLURM_ARRAY_TASK_ID")}
    try:
        for name, num_tasks in (("completed", 1), ("failed", 1), ("array", 2)):
            wait_for_jobs(jobs[name], num_tasks=num_tasks)
        jobs["running"] = _sbatch("--wrap", "sleep 300")
        deadline = time.monotonic() + 120
        while job_states(jobs["running"]) != {jobs["running"]: "RUNNING"}:
            assert time.monotonic() < deadline, f"sleep job not running within 120 s: {job_states(jobs['running'])}"
            time.sleep(0.5)
        jobs["cancelled"] = _sbatch("--wrap", "sleep 300")
        subprocess.run(["scancel", jobs["cancelled"]], check=True, timeout=60)
        wait_for_jobs(jobs["cancelled"])

        watcher = SlurmInfoWatcher()
        for job_id in jobs.values():
            watcher.register_job(job_id)
        command = watcher._make_command()
        assert command[:4] == ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
        shim = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        read = {k: v["State"] for k, v in watcher.read_info(shim.stdout).items()}
        want = {
            jobs["held"]: "PENDING", f"{jobs['held_array']}_0": "PENDING", f"{jobs['held_array']}_1": "PENDING",
            jobs["completed"]: "COMPLETED", jobs["failed"]: "FAILED", f"{jobs['array']}_0": "COMPLETED",
            f"{jobs['array']}_1": "FAILED", jobs["running"]: "RUNNING", jobs["cancelled"]: "CANCELLED"}
        assert {k: read.get(k) for k in want} == want, shim.stdout
        squeue = {}
        for job_id in jobs.values():
            squeue.update(job_states(job_id))
        # squeue folds a pending array range into one line, as sacct does, and submitit expands it
        pending = squeue.pop(f"{jobs['held_array']}_[0-1]")
        squeue.update({f"{jobs['held_array']}_0": pending, f"{jobs['held_array']}_1": pending})
        assert squeue == want
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True, timeout=60)


def test_waiting_for_a_job_blames_a_start_that_never_comes_apart_from_a_run_that_never_ends(slurm_cluster):
    """The Slurm tests' `wait_for_jobs` has a deadline to start and another to run, each failing with its own
    message: a held job fails the first, a job that sleeps on fails the second."""
    held, sleeping = _sbatch("--hold", "--wrap", "true"), _sbatch("--wrap", "sleep 300")
    try:
        with pytest.raises(AssertionError, match=f"job {held}: nothing of it started within 3 s"):
            wait_for_jobs(held, start_s=3, run_s=600)
        with pytest.raises(AssertionError, match=rf"job {sleeping}: \['{sleeping}'\] still running after 3 s"):
            wait_for_jobs(sleeping, start_s=120, run_s=3)
    finally:
        subprocess.run(["scancel", held, sleeping], capture_output=True, timeout=60)


def test_down_stops_exactly_what_up_started(slurm_cluster, tmp_path):
    # A second cluster beside the session's: both must run, and stopping one leaves the other up.
    env_file = start_cluster(tmp_path / "up.log")
    env = read_env_file(env_file)
    pids = [int(p) for p in env["STROKE_TSS_SLURM_PIDS"].split()]
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    stop_cluster(env_file)
    assert not any(alive(pid) for pid in pids)
    assert not Path(env["STROKE_TSS_SLURM_DIR"]).exists()
    assert all(alive(pid) for pid in slurm_cluster.pids)
    subprocess.run(["sinfo", "-h"], check=True, capture_output=True, timeout=60)


@pytest.mark.multinode
def test_nodes_live_in_namespaces_of_their_own_and_down_removes_them(multinode_cluster, tmp_path):
    """`up.sh --nodes 2`: each node a slurmd with its own hostname on a private subnet with no route out;
    `down.sh` removes the namespaces, veths and bridge it made and leaves the session's cluster running."""
    with (tmp_path / "up.log").open("w") as log:
        proc = subprocess.run(["bash", str(LOCAL / "up.sh"), "--nodes", "2"], stdout=subprocess.PIPE, stderr=log,
                              text=True, check=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "STROKE_TSS_SLURM_ENV"})
    env_file = Path(proc.stdout.strip())
    env = read_env_file(env_file)
    k = env["STROKE_TSS_SLURM_NET_INDEX"]
    netns = env["STROKE_TSS_SLURM_NETNS"].split()
    pids = [int(p) for p in env["STROKE_TSS_SLURM_PIDS"].split()]
    try:
        assert netns == [f"sttss{k}-node1", f"sttss{k}-node2"] and k != multinode_cluster.env["STROKE_TSS_SLURM_NET_INDEX"]
        assert set(netns) <= set(_ip("netns", "list").split())
        assert f"inet 10.213.{77 + int(k)}.1/24" in _ip("-4", "addr", "show", f"sttss-br{k}")
        for i, ns in enumerate(netns, start=1):
            assert f"inet 10.213.{77 + int(k)}.{10 + i}/24" in _ip("-n", ns, "-4", "addr", "show", "eth0")
            # the node's only route is its subnet: nothing beyond the bridge is reachable
            assert _ip("-n", ns, "-4", "route").split("\n")[0].split()[:3] == [f"10.213.{77 + int(k)}.0/24", "dev", "eth0"]
            assert len(_ip("-n", ns, "-4", "route").strip().splitlines()) == 1
        srun = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "hostname"], capture_output=True, text=True,
                              timeout=60, check=True, env={**os.environ, "SLURM_CONF": env["SLURM_CONF"]})
        assert sorted(srun.stdout.split()) == ["node1", "node2"]
    finally:
        stop_cluster(env_file)
    assert not any(alive(pid) for pid in pids)
    assert not set(netns) & set(_ip("netns", "list").split())
    links = _ip("link", "show")
    assert f"sttss-br{k}" not in links and f"sttss{k}-v" not in links
    assert not Path(env["STROKE_TSS_SLURM_DIR"]).exists()
    # the session's two-node cluster is untouched: its controller runs and both nodes answer
    assert all(alive(int(pid)) for pid in multinode_cluster.env["STROKE_TSS_SLURM_PIDS"].split()[:2])
    assert multinode_cluster.run("sinfo", "-h", "-N", "-o", "%N").stdout.split() == ["node1", "node2"]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=60).stdout
