"""Every sbatch template in slurm/ runs on the local Slurm with 2 ranks on 1 node (CPU, gloo), with its
command swapped for `python -m hpc.selftest` through STROKE_TSS_CMD, and the ranks agree; the training
templates requeue a run that saved on preemption (it leaves the flag file), once, whatever its exit code.
Their real commands run on two nodes in tests/test_multinode_templates.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.slurm import wait_for_jobs

# The node declares its real cores (2 here), so Slurm runs these 2-CPU jobs one after another: several minutes
pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
# (template, sbatch options for 2 ranks on the one local node, launcher the ranks must report, outputs)
CASES = {
    "ddp_multinode": (["--ntasks-per-node=1", "--cpus-per-task=2"], "srun+torchrun", ["ddp_multinode"]),
    "deepspeed": (["--ntasks-per-node=2", "--cpus-per-task=1"], "slurm", ["deepspeed"]),
    "fold_array": (["--array=0-1", "--ntasks-per-node=2", "--cpus-per-task=1"], "slurm", ["fold-0", "fold-1"]),
    "prep": (["--ntasks-per-node=2", "--cpus-per-task=1"], "slurm", ["prep"]),
}
# What a user edits for their cluster: no GPUs, partition, account or memory request on the test node.
EDITED = re.compile(r"^#SBATCH --(partition|account|gpus-per-node|mem|array)\b.*\n", re.MULTILINE)


def _edited_copy(name: str, folder: Path) -> Path:
    text = (REPO / "slurm" / f"{name}.sbatch").read_text()
    assert "EDIT ME" in text and "$STROKE_TSS_CMD" in text, f"{name}.sbatch lost its header or its command hook"
    path = folder / f"{name}.sbatch"
    path.write_text(EDITED.sub("", text))
    return path


def _submit(args: list[str], *, env: dict, log: Path, cwd: Path = REPO) -> str:
    """sbatch on the debug partition, one node; returns the job id (the job is waited for separately)."""
    proc = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--nodes=1", f"--output={log}-%j.log", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_every_template_runs_two_agreeing_ranks(slurm_cluster, tmp_path):
    assert sorted(p.stem for p in (REPO / "slurm").glob("*.sbatch")) == sorted(CASES), "a template has no test case"
    jobs = {}
    for name, (options, _, _) in CASES.items():
        out = "fold-{fold}" if name == "fold_array" else name
        env = dict(os.environ, STROKE_TSS_VENV=sys.prefix, NPROC_PER_NODE="2",
                   STROKE_TSS_CMD=f"python -m hpc.selftest --out {tmp_path}/{out}.json")
        # --time well above the templates' --signal=USR2@300: at 5 minutes Slurm sent the preemption signal
        # at once, and a loaded machine got it before the ranks were done
        jobs[name] = _submit(["--time=15", *options, str(_edited_copy(name, tmp_path))], env=env, log=tmp_path / name)
    for name, job_id in jobs.items():
        num_tasks = 2 if name == "fold_array" else 1
        states = wait_for_jobs(job_id, num_tasks=num_tasks, start_s=180, run_s=180)
        logs = "".join(p.read_text() for p in tmp_path.glob(f"{name}-*.log"))
        assert set(states.values()) == {"COMPLETED"}, f"{name}.sbatch: {states}\n{logs}"
        _, launcher, outputs = CASES[name]
        for out in outputs:
            summary = json.loads((tmp_path / f"{out}.json").read_text())
            assert summary["ok"] and summary["world_size"] == 2 and summary["sum"] == 3.0, (name, summary)
            assert summary["launcher"] == launcher and summary["backend"] == "gloo", (name, summary)


# The rank command of the preemption test: the first run saves "on preemption" (it creates the flag file, as
# hpc.preempt.record_saved does) and exits 1, as torchrun reports a worker's exit 75; the requeued run
# (SLURM_RESTART_COUNT=1) succeeds. Every run leaves a line, so the test counts the runs.
PREEMPTED_ONCE = """#!/bin/bash
echo "${SLURM_RESTART_COUNT:-0}" >> "$(dirname "$0")/runs-$SLURM_JOB_ID-${RANK:-${SLURM_PROCID:-0}}.txt"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then touch "$STROKE_TSS_PREEMPT_FILE"; exit 1; fi
"""


@pytest.mark.parametrize("name", ["ddp_multinode", "deepspeed", "fold_array"])
def test_a_run_that_saved_on_preemption_is_requeued_once(slurm_cluster, tmp_path, name):
    options = [("--array=0" if o.startswith("--array") else o) for o in CASES[name][0]]  # one task is enough
    command = tmp_path / "preempted_once.sh"
    command.write_text(PREEMPTED_ONCE)
    env = dict(os.environ, STROKE_TSS_VENV=sys.prefix, NPROC_PER_NODE="2", STROKE_TSS_CMD=f"bash {command}")
    job_id = _submit(["--time=15", *options, str(_edited_copy(name, tmp_path))], env=env, log=tmp_path / name,
                     cwd=tmp_path)
    # the requeued job waits for its begin time (about 15 s) before it starts again
    states = wait_for_jobs(job_id, num_tasks=1, start_s=180, run_s=180)
    logs = "".join(p.read_text() for p in tmp_path.glob(f"{name}-*.log"))
    runs = sorted(p.read_text() for p in tmp_path.glob("runs-*.txt"))
    assert runs and all(r == "0\n1\n" for r in runs), (runs, states, logs)
    assert set(states.values()) == {"COMPLETED"}, (states, logs)
    # --open-mode=append: the log holds both attempts; the flag file is gone once the job completed
    assert re.findall(r"attempt (\d)", logs) == ["1", "2"], logs
    assert not list(tmp_path.glob(".preempt-*"))
