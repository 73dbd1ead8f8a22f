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
    deadline = time.monotonic() + 90
    while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= 5):
        assert time.monotonic() < deadline, "the item never made progress"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", result.job_id], check=True)
    job = submitit.SlurmJob(folder=tmp_path / "sub", job_id=result.job_id, tasks=(0, 1))
    job._results_timeout_s = 2
    values = job.results()
    starts = [int(s) for s in (tmp_path / "fold-0" / "starts.txt").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 5, starts
    assert [v["resumed_from"] for v in values] == [starts[1]] * 2
    saved = [json.loads((tmp_path / "fold-0" / f"rank{r}.json").read_text())["step"] for r in (0, 1)]
    assert saved[0] == saved[1] == starts[1], "ranks must agree on the step they saved at"
