"""hpc.launch runs one callable per item (debug, local processes, Slurm array), reports failures with their
log while the others land, refuses bad submissions, and requeues a preempted multi-rank item that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pydantic
import pytest
import submitit

from hpc import preempt
from hpc.launch import CheckpointableTask, launch_items
from hpc.launch_config import LaunchConfig
from tests.fixtures.dist import torchrun
from tests.fixtures.slurm import job_states

# Items run in other processes, where this test module is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _double_or_fail(item: int, out_dir: Path) -> int:
    if item < 0:
        raise ValueError(f"item {item} is negative")
    (out_dir / "value.txt").write_text(str(2 * item))
    return 2 * item


def _check_items(results, folder: Path) -> None:
    assert [r.name for r in results] == ["a", "b", "bad", "c"]
    good = [r for r in results if r.name != "bad"]
    assert [r.value for r in good] == [2, 4, 6] and all(r.ok for r in good)
    assert [(folder / r.name / "value.txt").read_text() for r in good] == ["2", "4", "6"]
    (bad,) = [r for r in results if r.name == "bad"]
    assert bad.state == "failed" and "item -1 is negative" in bad.error


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_items_land_and_a_failure_is_reported(tmp_path, executor, capsys):
    config = LaunchConfig(executor=executor, array_parallelism=2, time_min=2)
    results = launch_items(_double_or_fail, [1, 2, -1, 3], config=config, folder=tmp_path, names=["a", "b", "bad", "c"])
    _check_items(results, tmp_path)
    if executor == "local":
        (bad,) = [r for r in results if r.name == "bad"]
        assert "item -1 is negative" in bad.log.read_text()
        assert f"bad failed: ValueError: item -1 is negative\n  log: {bad.log}" in capsys.readouterr().err


def test_config_rejects_unknown_executor_and_keys():
    with pytest.raises(pydantic.ValidationError, match="executor"):
        LaunchConfig(executor="pbs")
    with pytest.raises(pydantic.ValidationError, match="partion"):
        LaunchConfig(partion="gpu")


def test_preempt_signal_only_sets_the_flag(tmp_path, monkeypatch):
    old = signal.getsignal(signal.SIGUSR2)
    try:
        preempt.install(prefix="MYAPP")
        assert not preempt.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preempt.requested() and preempt.requested(sync=False)
        preempt.clear()
        assert not preempt.requested()
        flag_file = tmp_path / "preempt-flag"
        flag_file.touch()  # what the sbatch templates' USR2 trap does
        monkeypatch.setenv("HPC_PREEMPT_FILE", str(flag_file))
        assert not preempt.requested()  # another prefix's file
        monkeypatch.setenv("MYAPP_PREEMPT_FILE", str(flag_file))
        assert preempt.requested()
        flag_file.unlink()
        assert not preempt.requested()
        with pytest.raises(ValueError, match="USR3"):
            preempt.signal_number("USR3")
    finally:
        preempt.install()  # back to the default prefix
        signal.signal(signal.SIGUSR2, old)
        preempt.clear()


class _FlagSeen(CheckpointableTask):
    preempt_prefix = "MYAPP"

    def run(self) -> bool:
        return preempt.requested()


def test_a_task_reads_the_flag_file_of_its_prefix(tmp_path, monkeypatch):
    old = signal.getsignal(signal.SIGUSR2)
    flag_file = tmp_path / "preempt-flag"
    flag_file.touch()
    try:
        monkeypatch.setenv("HPC_PREEMPT_FILE", str(flag_file))
        assert not _FlagSeen()()
        monkeypatch.setenv("MYAPP_PREEMPT_FILE", str(flag_file))
        assert _FlagSeen()()
    finally:
        preempt.install()
        signal.signal(signal.SIGUSR2, old)
        preempt.clear()


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_slurm_array_lands_items_and_reports_the_failed_one(slurm_cluster, tmp_path):
    config = LaunchConfig(executor="slurm", partition="debug", array_parallelism=4, time_min=5)
    results = launch_items(_double_or_fail, [1, 2, -1, 3], config=config, folder=tmp_path,
                           names=["a", "b", "bad", "c"], poll_s=0.5)
    _check_items(results, tmp_path)
    assert len({r.job_id.split("_")[0] for r in results}) == 1, "expected one job array"
    (bad,) = [r for r in results if r.name == "bad"]
    assert bad.log.is_file() and "item -1 is negative" in bad.log.read_text()


@pytest.mark.slurm
@pytest.mark.integration
def test_slurm_rejected_partition_is_one_clear_error(slurm_cluster, tmp_path):
    config = LaunchConfig(executor="slurm", partition="no-such-partition")
    with pytest.raises(ValueError, match="refused the submission: .*[Ii]nvalid partition"):
        launch_items(_double_or_fail, [1], config=config, folder=tmp_path)


class _Steps(CheckpointableTask):
    """Counts to `item` steps on 2 ranks, saving each rank's step on preemption and resuming from it."""

    def run(self, item: int, out_dir: Path) -> dict:
        import torch
        import torch.distributed as dist

        from hpc.env import init_distributed

        torch.set_num_threads(1)
        env = init_distributed(timeout_s=60)
        state = out_dir / f"rank{env.rank}.json"
        start = json.loads(state.read_text())["step"] if state.exists() else 0
        if env.rank == 0:
            with open(out_dir / "starts.txt", "a") as fh:
                fh.write(f"{start}\n")
        for step in range(start, item):
            total = torch.tensor([1.0])
            dist.all_reduce(total)  # the ranks really work together at every step
            if env.rank == 0:
                (out_dir / "progress.txt").write_text(str(step))
            if preempt.requested():
                state.write_text(json.dumps({"step": step}))
                raise preempt.Preempted(f"rank {env.rank} saved at step {step}")
            time.sleep(0.2)
        return {"world_size": env.world_size, "resumed_from": start, "rank": env.rank}


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.timeout(240)
def test_preempted_item_saves_requeues_and_resumes(slurm_cluster, tmp_path):
    config = LaunchConfig(executor="slurm", partition="debug", tasks_per_node=2, time_min=5, folder=tmp_path / "sub")
    (result,) = launch_items(_Steps(), [40], config=config, folder=tmp_path, names=["fold-0"], wait=False)
    progress = tmp_path / "fold-0" / "progress.txt"
    # two deadlines: the job starts (a loaded machine may take a while), then it makes progress
    deadline = time.monotonic() + 120
    while not progress.exists():
        assert time.monotonic() < deadline, f"job {result.job_id} not started within 120 s: {job_states(result.job_id)}"
        time.sleep(0.2)
    deadline = time.monotonic() + 90
    while not (progress.read_text() and int(progress.read_text()) >= 5):
        assert time.monotonic() < deadline, "the item started but made no 5 steps in 90 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", result.job_id], check=True, timeout=60)
    job = submitit.SlurmJob(folder=tmp_path / "sub", job_id=result.job_id, tasks=(0, 1))
    job._results_timeout_s = 2
    values = job.results()
    starts = [int(s) for s in (tmp_path / "fold-0" / "starts.txt").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 5, starts
    assert [v["resumed_from"] for v in values] == [starts[1]] * 2
    saved = [json.loads((tmp_path / "fold-0" / f"rank{r}.json").read_text())["step"] for r in (0, 1)]
    assert saved[0] == saved[1] == starts[1], "ranks must agree on the step they saved at"


def test_an_item_of_several_processes_needs_slurm():
    """submitit's local executor starts tasks_per_node copies that never join one process group and all write
    the item's folder: refused in one line that names the key and what to do."""
    from stroke_tss.config import load_config
    from stroke_tss.errors import UserError

    for key in ("tasks_per_node", "nodes"):
        with pytest.raises(pydantic.ValidationError, match=f"{key}=2 would start unconnected copies"):
            LaunchConfig(executor="local", **{key: 2})
    assert LaunchConfig(executor="slurm", tasks_per_node=2, nodes=2).nodes == 2
    with pytest.raises(UserError) as info:
        load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", ["launch.tasks_per_node=4"])
    assert str(info.value).startswith("override launch.tasks_per_node=4: config key 'launch.tasks_per_node': ")
    assert "set launch.tasks_per_node=1, or use launch.executor=slurm" in str(info.value)


def test_the_preemption_poll_reads_the_flag_file_every_few_seconds_not_every_step(tmp_path, monkeypatch):
    flag = tmp_path / "preempt-flag"
    monkeypatch.setenv("HPC_PREEMPT_FILE", str(flag))
    looks = []
    real_exists = os.path.exists
    monkeypatch.setattr(preempt.os.path, "exists", lambda p: looks.append(p) or real_exists(p))
    preempt.install()
    try:
        poll = preempt.Poll(file_every_s=0.5)
        assert not any(poll() for _ in range(10_000))
        assert len(looks) == 1, "one look at the shared filesystem, not one per step"
        flag.touch()
        time.sleep(0.6)
        assert poll(), "the file is seen once file_every_s has passed"
    finally:
        preempt.clear()


_POLL_RANK = """
import json, sys, time, torch
from hpc import preempt
from hpc.env import init_distributed, destroy_distributed
env = init_distributed(timeout_s=60)
preempt.install()
poll = preempt.Poll()
if env.rank == 1:
    time.sleep(8.0)  # a slow rank: a poll that waited for it would take 8 s, one that does not well under 4
start = time.monotonic()
first = poll()
first_s = time.monotonic() - start
seen = []
for step in range(1, 8):
    if env.rank == 1 and step == 3:
        preempt.request()  # the signal reaches one rank only
    if poll():
        seen.append(step)
        break
poll.close()
json.dump({"first": first, "first_s": first_s, "seen": seen}, open(sys.argv[1] % env.rank, "w"))
destroy_distributed()
"""


@pytest.mark.integration
def test_the_preemption_poll_never_holds_a_rank_and_all_ranks_agree(tmp_path):
    """Two gloo ranks: the poll does not make rank 0 wait for a slow rank 1 (the agreement runs in the
    background), and a signal that reached rank 1 alone at step 3 is seen by both ranks at step 4."""
    script = tmp_path / "poll.py"
    script.write_text(_POLL_RANK)
    proc = subprocess.run([*torchrun(2), str(script), str(tmp_path / "rank%d.json")],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["first"] is False and ranks[0]["first_s"] < 4.0, ranks[0]
    assert ranks[0]["seen"] == ranks[1]["seen"] == [4], ranks


_COUNTING_SACCT = """#!/bin/bash
echo x >> "{count}"
exec "{shim}" "$@"
"""


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_waiting_for_an_item_asks_the_scheduler_with_back_off(slurm_cluster, tmp_path, monkeypatch):
    """A finished item is seen from its result file; the scheduler (sacct) is asked with back-off, not at every
    poll: a 15 s item polled every 0.2 s costs a dozen sacct calls, not 75."""
    bin_dir, count = tmp_path / "bin", tmp_path / "sacct-calls"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(_COUNTING_SACCT.format(
        count=count, shim=Path(slurm_cluster.env["STROKE_TSS_SLURM_BIN"]) / "sacct"))
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir), prepend=os.pathsep)
    config = LaunchConfig(executor="slurm", partition="debug", time_min=5)
    (result,) = launch_items(_sleep_then_double, [15], config=config, folder=tmp_path / "items", names=["slow"],
                             poll_s=0.2)
    assert result.ok and result.value == 30
    calls = len(count.read_text().splitlines())
    assert 1 <= calls <= 15, f"{calls} sacct calls while waiting 15 s"


def _sleep_then_double(item: int, out_dir: Path) -> int:
    time.sleep(item)
    return 2 * item


@pytest.mark.parametrize(("name", "hours"), [("tss2d", 8), ("tss3d", 12)])
def test_shipped_configs_ask_slurm_for_a_gpu_node_share(name, hours):
    """`cv configs/tss2d.yaml --executor slurm` must not train ResNet-18 on one CPU thread for an hour: the
    shipped configs ask for a GPU, CPUs for the loaders and threads, memory and a fold's time per item."""
    from stroke_tss.config import load_config

    launch = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml", ["launch.executor=slurm"]).launch
    assert (launch.gpus_per_node, launch.cpus_per_task, launch.tasks_per_node, launch.nodes) == (1, 8, 1, 1)
    assert launch.time_min == hours * 60 and launch.mem_gb and launch.signal_delay_s >= 300
    # tiny.yaml, which extends tss2d.yaml, stays one CPU with no GPU: it runs on the test cluster
    tiny = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml").launch
    assert (tiny.gpus_per_node, tiny.cpus_per_task, tiny.mem_gb) == (0, 1, None)


def _rank_and_world(item: int, out_dir: Path) -> dict:
    from hpc.env import DistEnv

    env = DistEnv.from_environ()
    return {"item": item, "rank": env.rank, "world_size": env.world_size}


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_waited_for_item_of_two_tasks_returns_rank_0s_value(slurm_cluster, tmp_path):
    """An item of several ranks (launch.tasks_per_node or launch.nodes > 1, as `cv --executor slurm` with 2-node
    folds submits them) lands with rank 0's value when waited for."""
    config = LaunchConfig(executor="slurm", partition="debug", tasks_per_node=2, time_min=5)
    (result,) = launch_items(_rank_and_world, [7], config=config, folder=tmp_path, names=["two-ranks"], poll_s=0.5)
    assert result.ok, result.error
    assert result.value == {"item": 7, "rank": 0, "world_size": 2}
