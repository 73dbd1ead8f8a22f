"""The sbatch templates with their real command (`stroke-tss train CONFIG --fold 0`) on two nodes: one rank per
node, each in its own network namespace with its own hostname, gloo over the veth links, the store copied to
each node's own $TMPDIR. Then preemption (USR2 to the ranks, and `scontrol requeue`) and a lost node, both
ending with the weights of the uninterrupted run."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.test_data import make_store

pytestmark = [pytest.mark.multinode, pytest.mark.integration, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
PHASES = ("lesion", "tss3h")
# What a user edits for their cluster: no GPUs, partition or account on the test nodes (1 CPU each).
EDITED = re.compile(r"^#SBATCH --(partition|account|gpus-per-node|cpus-per-task)\b.*\n", re.MULTILINE)


def write_config(folder: Path, store: Path, run: Path, **extra: str) -> Path:
    """tss2d.yaml at test size: two phases, one variant, batches of 1 (enough steps to preempt mid-epoch)."""
    path = folder / f"{run.name}.yaml"
    lines = [f"extends: {REPO / 'configs' / 'tss2d.yaml'}", f"data: {{store: {store}}}", f"run: {{dir: {run}}}",
             "cv: {folds: 2}", "model: {options: {base_channels: 4}}",
             "train: {num_workers: 0, threads: 1, batch_size: 1, augment: {noise_std: 0.1},",
             "        stopping: {max_epochs: 5, min_epochs: 1}, keep_checkpoints: 2}",
             "phases: {tss4h5: null, attention: null}", "variants: {2d_scratch: null}",
             "engine: {timeout_s: 60" + "".join(f", {k}: {v}" for k, v in extra.items()) + "}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def template(name: str, folder: Path) -> Path:
    path = folder / f"{name}.sbatch"
    path.write_text(EDITED.sub("", (REPO / "slurm" / f"{name}.sbatch").read_text()))
    return path


def submit(cluster, name: str, folder: Path, config: Path, **env: str) -> tuple[str, Path]:
    """sbatch the template on both nodes; returns the job id and its log."""
    import subprocess

    proc = subprocess.run(
        ["sbatch", "--parsable", "--partition=debug", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--time=30", f"--output={folder}/{name}-%j.out", str(template(name, folder))],
        cwd=folder, env=cluster.environ(STROKE_TSS_VENV=sys.prefix, CONFIG=str(config), FOLD="0", **env),
        capture_output=True, text=True, check=True, timeout=60)
    job = proc.stdout.strip()
    return job, folder / f"{name}-{job}.out"


def job_state(cluster, job: str) -> str:
    return cluster.run("squeue", "-h", "-j", job, "--states=all", "-o", "%T", check=False).stdout.strip()


def wait_for(predicate, what: str, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.3)
    return value


def wait_done(cluster, job: str, log: Path, timeout: float = 300) -> str:
    state = wait_for(lambda: (s := job_state(cluster, job)) not in ("", "PENDING", "RUNNING", "COMPLETING",
                                                                     "CONFIGURING", "REQUEUED") and s,
                     f"job {job} to end", timeout, log)
    return state


def in_log(log: Path, pattern: str) -> bool:
    return log.exists() and re.search(pattern, log.read_text(errors="replace")) is not None


def check_every_sample_once(store: Path, run: Path, engine: str) -> None:
    """Each phase's predictions hold every validation and test sample of the fold exactly once (the sampler's
    padding dropped after the gather), and its checkpoints record 2 ranks."""
    from data_prep.store import open_store
    from stroke_tss.splits import fold_of, read_splits
    from stroke_tss.tasks import task_samples

    table = open_store(store).table
    roles = fold_of(read_splits(run / "splits.json"), 0)
    for phase, task in zip(PHASES, ("lesion_present", "tss_lt_3h")):
        pred = pd.read_csv(run / "2d" / "fold-0" / phase / "predictions.csv")
        for split in ("val", "test"):
            want = sorted((s.subject_id, s.hemisphere) for s in task_samples(table, task, roles[split])[0])
            got = sorted(pred.query("split == @split")[["subject_id", "hemisphere"]].itertuples(index=False, name=None))
            assert want and got == want, (phase, split)
        done = [json.loads(p.read_text()) for p in (run / "2d" / "fold-0" / phase / "ckpt").glob("*/done")]
        assert done and all(d == {"world_size": 2, "engine": engine} for d in done), done


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {phase: torch.load(run / "2d" / "fold-0" / phase / "weights.pt", weights_only=True)["state_dict"]
            for phase in PHASES}


def assert_same_weights(run: Path, reference: Path) -> None:
    got, want = weights(run), weights(reference)
    for phase in PHASES:
        assert got[phase].keys() == want[phase].keys()
        differ = [k for k in want[phase] if not torch.equal(got[phase][k], want[phase][k])]
        assert not differ, f"{phase}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("mn-store") / "store.zarr", num_subjects=16)


@pytest.fixture(scope="module")
def reference(multinode_cluster, store, tmp_path_factory) -> dict:
    """The uninterrupted 2-node run of ddp_multinode.sbatch, its store copied to each node's $TMPDIR."""
    folder = tmp_path_factory.mktemp("mn-ddp")
    run = folder / "run"
    job, log = submit(multinode_cluster, "ddp_multinode", folder, write_config(folder, store, run),
                      STORE=str(store), TMPDIR=str(multinode_cluster.node_tmp))
    state = wait_done(multinode_cluster, job, log)
    return {"job": job, "log": log, "run": run, "state": state}


def test_ddp_template_trains_a_fold_on_two_nodes_from_node_local_copies(multinode_cluster, store, reference):
    log = reference["log"].read_text(errors="replace")
    assert reference["state"] == "COMPLETED", log[-4000:]
    # one rank per node, the two hostnames of the two namespaces, started by srun + torchrun
    assert re.search(r"2 rank\(s\) on node1 x1, node2 x1 \(srun\+torchrun, Slurm job \d+\)", log), log[-4000:]
    check_every_sample_once(store, reference["run"], "ddp")
    # The .out file is for reading later: no progress-bar carriage returns, and log lines carry the date
    assert b"\r" not in reference["log"].read_bytes(), "a progress bar wrote carriage returns into the Slurm log"
    assert re.search(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[rank 0\] INFO stroke_tss\.loop: lesion epoch 0:", log,
                     re.MULTILINE), log[-4000:]
    # The ranks read data.store = <node-local tmp>/stroke-tss-store-JOB, a path empty outside the nodes'
    # namespaces: each read its own node's copy; the copies are gone after the job.
    used = yaml.safe_load((reference["run"] / "config.yaml").read_text())
    assert used["data"]["store"] == f"{multinode_cluster.node_tmp}/stroke-tss-store-{reference['job']}"
    for node in ("node1", "node2"):
        left = list(multinode_cluster.node_folder(node).glob("stroke-tss-store-*"))
        assert not left, f"{node}: store copy left behind: {left}"


def test_deepspeed_template_trains_a_fold_on_two_nodes_with_zero2(multinode_cluster, store, tmp_path):
    run = tmp_path / "run"
    job, log = submit(multinode_cluster, "deepspeed", tmp_path, write_config(tmp_path, store, run),
                      DS_CONFIG=str(REPO / "configs" / "deepspeed" / "zero2.json"))
    state = wait_done(multinode_cluster, job, log)
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", text[-4000:]
    # srun starts both ranks itself: DeepSpeed runs only because hpc.env exported LOCAL_RANK and friends
    assert re.search(r"2 rank\(s\) on node1 x1, node2 x1 \(slurm, Slurm job \d+\)", text), text[-4000:]
    check_every_sample_once(store, run, "deepspeed")
    assert json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())["zero_optimization"]["stage"] == 2


def test_preempted_and_requeued_on_two_nodes_ends_with_the_uninterrupted_weights(multinode_cluster, store,
                                                                                 reference, tmp_path):
    """USR2 to the job's steps once the ranks run: they save at the next step and the template requeues the job
    (the flag file, not torchrun's exit 1); in the second attempt `scontrol requeue` kills it without warning,
    and the third resumes from the newest complete checkpoint. Same job id, one log with all three attempts."""
    run = tmp_path / "run"
    job, log = submit(multinode_cluster, "ddp_multinode", tmp_path, write_config(tmp_path, store, run))
    wait_for(lambda: in_log(log, r"2 rank\(s\) on node1"), "the ranks to start", 180, log)
    multinode_cluster.run("scancel", "--signal=USR2", job)
    wait_for(lambda: in_log(log, r"attempt 2 on") and in_log(log, r"resumed .* at epoch \d+, step \d+"),
             "the second attempt to resume", 240, log)
    multinode_cluster.run("scontrol", "requeue", job)
    state = wait_done(multinode_cluster, job, log, timeout=300)
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", text[-4000:]
    assert re.findall(rf"job {job} attempt (\d) on node\[1-2\]", text) == ["1", "2", "3"], text[-4000:]
    assert re.search(r"stroke-tss train: preempted at epoch \d+, step \d+; checkpoint saved", text), text[-4000:]
    assert re.search(rf"preempted \(exit \d+\): requeueing job {job}", text), text[-4000:]
    first_resume = re.search(r"resumed \S+ at epoch (\d+), step (\d+)", text)
    assert first_resume and first_resume.groups() != ("0", "0"), "the second attempt resumed at the saved step"
    assert not list(tmp_path.glob(".preempt-*")), "the flag file outlived the job"
    assert_same_weights(run, reference["run"])


def test_a_lost_node_ends_the_job_with_one_line_and_the_requeue_resumes(multinode_cluster, store, reference,
                                                                      tmp_path):
    """node2 dies mid-run (every process of its namespaces killed): rank 0 says so in one line within the
    process-group timeout; Slurm requeues the job after the node failure, and once node2 is back the job
    resumes from the last complete checkpoint and ends with the uninterrupted run's weights."""
    run = tmp_path / "run"
    job, log = submit(multinode_cluster, "ddp_multinode", tmp_path, write_config(tmp_path, store, run))
    first = run / "2d" / "fold-0" / "lesion" / "ckpt" / "epoch-0001" / "done"
    wait_for(first.is_file, "the first epoch's checkpoint", 180, log)
    multinode_cluster.node("kill", "node2")
    lost_at = time.monotonic()
    try:
        wait_for(lambda: in_log(log, r"stroke-tss train: lost contact with another rank \("), "rank 0's message",
                 60, log)
        assert time.monotonic() - lost_at < 60, "not within engine.timeout_s"
        wait_for(lambda: job_state(multinode_cluster, job) == "PENDING", "Slurm to requeue the job", 120, log)
    finally:
        multinode_cluster.node("start", "node2")
    state = wait_done(multinode_cluster, job, log, timeout=300)
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", text[-4000:]
    assert re.search(r"Node failure on node2|DUE TO NODE FAILURE", text), text[-4000:]
    assert re.findall(rf"job {job} attempt (\d)", text) == ["1", "2"]
    assert re.search(r"resumed \S+ at epoch [1-9]\d*, step \d+", text), "resumed from a checkpoint"
    assert_same_weights(run, reference["run"])


def test_a_store_copy_cut_short_is_never_read(multinode_cluster, store, reference, tmp_path):
    """The job is requeued while it copies the store to the nodes' $TMPDIR (many small files, as a Zarr store
    is): the cut copy stays under its temporary name, the next attempt copies afresh, and the run ends with
    the uninterrupted weights (a partial copy would read its missing chunks as zeros)."""
    import shutil

    padded = tmp_path / "store.zarr"
    shutil.copytree(store, padded)
    pad = padded / "zz-padding"  # not a Zarr key: read by no one, it only makes the copy take seconds
    pad.mkdir()
    for i in range(20000):
        (pad / f"f{i}").touch()
    run = tmp_path / "run"
    job, log = submit(multinode_cluster, "ddp_multinode", tmp_path, write_config(tmp_path, store, run),
                      STORE=str(padded), TMPDIR=str(multinode_cluster.node_tmp))
    partial = multinode_cluster.node_folder("node1") / f"stroke-tss-store-{job}.partial"
    wait_for(partial.is_dir, "the copy to start", 180, log)
    multinode_cluster.run("scontrol", "requeue", job)
    state = wait_done(multinode_cluster, job, log, timeout=300)
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", text[-4000:]
    assert re.findall(rf"job {job} attempt (\d)", text) == ["1", "2"] and "DUE TO JOB REQUEUE" in text
    assert_same_weights(run, reference["run"])
    for node in ("node1", "node2"):
        left = list(multinode_cluster.node_folder(node).glob("stroke-tss-store-*"))
        assert not left, f"{node}: store copy left behind: {left}"
