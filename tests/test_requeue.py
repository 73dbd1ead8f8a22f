"""Requeue of a real cv fold on the local Slurm: preempted with USR2 (submitit's checkpoint + requeue) and
requeued by `scontrol requeue` (no handler runs), each fold comes back under the same job id, resumes from its
checkpoint, and ends with exactly the metrics of an uninterrupted run.

tests/test_launch.py covers the launch layer with two ranks; these tests are about the training loop's own
checkpoints inside a FoldTask.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import submitit

from hpc.launch import launch_items
from stroke_tss.config import load_config
from stroke_tss.runs.cv import FoldItem, FoldTask
from stroke_tss.runs.folder import prepare_run
from tests.fixtures.slurm import job_states

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
PHASES = ["lesion", "tss3h", "tss4h5", "attention"]
# A lesion phase long enough to interrupt (80 epochs of 4 one-sample steps, a checkpoint after each step);
# the later phases one epoch each, so the fold still runs its whole schedule. Long enough, too, to outlast
# KillWait (5 s): on `scontrol requeue` submitit ignores the SIGTERM and only the SIGKILL after KillWait stops
# the job, so a fold that finished within those seconds (about 3 s for 16 epochs on an idle machine) would
# never be interrupted at all.
OVERRIDES = ["launch.executor=slurm", "launch.partition=debug", "launch.time_min=10",
             "train.batch_size=1", "train.ckpt_every_steps=1", "train.stopping.max_epochs=1",
             "phases.lesion.stopping.max_epochs=80", "phases.lesion.stopping.patience=100"]
# Interrupt mid-epoch (epoch 3 of 4-step epochs): far from the epoch's end, where log.jsonl is appended.
MID_EPOCH = 14


def submit_fold(store: Path, run_dir: Path) -> submitit.SlurmJob:
    """Fold 0 of variant 2d, submitted as `stroke-tss cv` submits it (one FoldTask item of an array)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.store={store}", f"run.dir={run_dir}", *OVERRIDES])
    prepare_run(cfg)
    item = FoldItem("2d", 0)
    (res,) = launch_items(FoldTask(cfg.model_dump(mode="json")), [item], config=cfg.launch,
                          folder=run_dir / "jobs", names=[item.name], wait=False)
    job = submitit.SlurmJob(folder=run_dir / "jobs" / "submitit", job_id=res.job_id)
    job._results_timeout_s = 5  # the result pickle lands a moment after sacct says COMPLETED
    return job


def fold_dir(run_dir: Path) -> Path:
    return run_dir / "2d" / "fold-0"


def wait_for_step(run_dir: Path, job_id: str, *, step: int, start_s: float = 180, run_s: float = 240) -> None:
    """Until the lesion phase has checkpointed global step `step` (or later): the job must start within
    `start_s`, then get there within `run_s` of its first checkpoint."""
    latest = fold_dir(run_dir) / "lesion" / "ckpt" / "latest"
    deadline = time.monotonic() + start_s
    while not latest.exists():
        assert time.monotonic() < deadline, f"job {job_id} wrote no checkpoint within {start_s:.0f} s: " \
                                            f"{job_states(job_id)}"
        time.sleep(0.05)
    deadline = time.monotonic() + run_s
    while not (latest.read_text().startswith("step-") and int(latest.read_text()[5:]) >= step):
        assert time.monotonic() < deadline, f"the fold started but did not reach step {step} in {run_s:.0f} s"
        time.sleep(0.05)


def restarts(job_id: str) -> int:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True,
                         timeout=60)
    return int(re.search(r"\bRestarts=(\d+)", out.stdout).group(1))


def epochs(path: Path) -> list[dict]:
    """log.jsonl without its timings (which differ between runs)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def assert_same_outcome(run_dir: Path, reference: Path) -> None:
    for phase in PHASES:
        ours, ref = fold_dir(run_dir) / phase, fold_dir(reference) / phase
        assert json.loads((ours / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text()), phase
        pd.testing.assert_frame_equal(pd.read_csv(ours / "predictions.csv"), pd.read_csv(ref / "predictions.csv"),
                                      check_exact=True)
        # Every epoch once, with the uninterrupted run's losses: resumed where it stopped, not from epoch 0.
        assert epochs(ours / "log.jsonl") == epochs(ref / "log.jsonl"), phase


def resumed_step(log_text: str, reference: Path) -> int:
    """Global step at which the lesion phase resumed (from the job's log); exactly one resume."""
    (found,) = re.findall(r"resumed \S+/lesion at epoch (\d+), step (\d+)", log_text)
    steps_per_epoch = epochs(fold_dir(reference) / "lesion" / "log.jsonl")[0]["steps"]
    return int(found[0]) * steps_per_epoch + int(found[1])


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_store, tmp_path_factory):
    """The uninterrupted fold; submitted at once so that it runs beside the first interrupted one."""
    run_dir = tmp_path_factory.mktemp("requeue-ref") / "run"
    job = submit_fold(tiny_store, run_dir)

    def finished() -> Path:
        job.result()
        assert restarts(job.job_id) == 0
        return run_dir

    return finished


@pytest.mark.timeout(600)
@pytest.mark.parametrize("interrupt, announced", [
    # submitit's checkpoint(): the flag is set, the loop saves at the next step and rank 0 requeues
    (["scancel", "--signal=USR2"], True),
    # no handler runs: the job is killed and requeued; only the run folder's checkpoints save the work
    (["scontrol", "requeue"], False),
], ids=["usr2", "scontrol-requeue"])
def test_an_interrupted_fold_comes_back_and_ends_as_if_uninterrupted(reference, tiny_store, tmp_path, interrupt,
                                                                      announced):
    run_dir = tmp_path / "run"
    job = submit_fold(tiny_store, run_dir)
    wait_for_step(run_dir, job.job_id, step=MID_EPOCH)
    subprocess.run([*interrupt, job.job_id], check=True, timeout=60)
    job.result()
    log = Path(job.paths.stderr).read_text()
    assert ("received SIGUSR2: will save and requeue at the next step boundary" in log) is announced
    assert restarts(job.job_id) == 1, "the same job came back once"
    ref = reference()
    assert resumed_step(log, ref) >= MID_EPOCH, "resumed from before the checkpoint it had written"
    assert_same_outcome(run_dir, ref)
