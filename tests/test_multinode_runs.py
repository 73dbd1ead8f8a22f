"""The run level on two nodes: `prep --cluster slurm` with Dask workers on both nodes, `cv --executor slurm`
with 2-node fold jobs behind the Genesis array (one pretraining per fold) they wait for, and a resume on another
number of ranks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from stroke_tss.runs.summary import rows
from tests.test_data import make_store
from tests.test_multinode_templates import job_state, wait_for
from tests.test_prep_build import _config_file, assert_same_store

pytestmark = [pytest.mark.multinode, pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]


def stroke_tss(cluster, *args, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stroke_tss", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=cluster.environ(OMP_NUM_THREADS="1", **env))


def srun(cluster, nodes: int, *args, **env: str) -> subprocess.CompletedProcess:
    """`stroke-tss ARGS` as one rank per node of a `srun -N nodes` step (the ranks start from here)."""
    cmd = ["srun", "--partition=debug", f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1",
           "--time=10", sys.executable, "-m", "stroke_tss", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=cluster.environ(OMP_NUM_THREADS="1", **env))


def jobs_on(cluster, name: str) -> dict[str, str]:
    """job id -> nodes of every job (running or done) named `name`."""
    out = cluster.run("squeue", "-h", "--states=all", "-n", name, "-o", "%i %N").stdout
    return dict(line.split(maxsplit=1) for line in out.splitlines() if len(line.split()) == 2)


def test_prep_on_slurm_workers_on_both_nodes_gives_the_local_store(multinode_cluster, tiny_cohort, tiny_store,
                                                                    tmp_path):
    """dask-jobqueue workers as Slurm jobs in the nodes' namespaces reach the scheduler here on the bridge
    address (the user's Dask config names the interface), and the store equals the local build."""
    table = pd.read_csv(tiny_cohort, dtype=str, keep_default_na=False).iloc[:4]
    for col in ("dwi", "b0", "flair", "adc", "lesion_mask", "brain_mask"):
        table[col] = [str(tiny_cohort.parent / v) if v else "" for v in table[col]]
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    store = tmp_path / "store.zarr"
    bridge = f"sttss-br{multinode_cluster.env['STROKE_TSS_SLURM_NET_INDEX']}"
    before = set(jobs_on(multinode_cluster, "dask-worker"))
    proc = stroke_tss(multinode_cluster, "prep", manifest, store, "--config", _config_file(tmp_path),
                      "--cluster", "slurm", "--partition", "debug", "--memory", "1GB", "--walltime", "00:15:00",
                      "--workers", "2", "--no-progress",
                      DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS=json.dumps({"interface": bridge}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_store(store, tiny_store, list(table["subject_id"]))
    workers = {job: nodes for job, nodes in jobs_on(multinode_cluster, "dask-worker").items() if job not in before}
    # prep's workers adapt (1..N jobs): 4 subjects may all be served by the first job, on either node, so
    # which nodes ran workers varies from run to run (both in one CI run, node1 alone in the next)
    assert workers and set(workers.values()) <= {"node1", "node2"}, workers


def _config_3d(folder: Path, store: Path, run: Path) -> Path:
    """tss3d.yaml at test size, two phases: Models Genesis, then lesion (init: genesis) and tss3h."""
    path = folder / "tss3d-small.yaml"
    path.write_text("\n".join([
        f"extends: {REPO / 'configs' / 'tss3d.yaml'}", f"data: {{store: {store}}}", f"run: {{dir: {run}}}",
        "cv: {folds: 2}", "model: {options: {base_channels: 4}}",
        "train: {num_workers: 0, threads: 1, batch_size: 2, stopping: {max_epochs: 2, min_epochs: 1}}",
        # enough Genesis epochs (a few seconds) for the USR2 to land while it trains
        "genesis: {base_channels: 4, epochs: 40, crop: [16, 16, 8], crops_per_subject: 2, batch_size: 2}",
        "phases: {tss4h5: null, attention: null}", "variants: {3d_scratch: null}",
        "engine: {timeout_s: 120}",
        "launch: {executor: slurm, partition: debug, nodes: 2, tasks_per_node: 1, cpus_per_task: 1,",
        "         gpus_per_node: 0, mem_gb: null, time_min: 20, signal_delay_s: 30}"]) + "\n")
    return path


@pytest.mark.timeout(900)  # two pretrainings (one per fold) run before the folds, each on both nodes
def test_cv_no_wait_submits_genesis_and_two_node_folds_that_wait_for_it(multinode_cluster, tmp_path):
    """`cv --no-wait` returns while Models Genesis runs: Genesis is an array of its own, one 2-node task per
    fold, fold 0's preempted once (USR2) and requeued, and the fold array waits for the whole of it in Slurm
    (afterok); every fold is a 2-node job, and `collect` gathers the run."""
    store = make_store(tmp_path / "store.zarr", num_subjects=16)
    run = tmp_path / "run"
    config = _config_3d(tmp_path, store, run)
    start = time.monotonic()
    submit = stroke_tss(multinode_cluster, "cv", config, "--variant", "3d", "--no-wait")
    returned_after = time.monotonic() - start
    assert submit.returncode == 0, submit.stderr[-4000:]
    genesis = re.search(r"Models Genesis pretraining is job (\d+); the folds wait for it \(afterok\)", submit.stderr)
    array = re.search(r"submitted 2 items as job (\d+);", submit.stdout)
    assert genesis and array, submit.stdout + submit.stderr[-3000:]
    genesis, array = genesis.group(1), array.group(1)
    assert "Models Genesis items: genesis-fold-0, genesis-fold-1" in submit.stderr
    assert not list(run.glob("genesis/**/weights.pt")), "cv --no-wait returned before Genesis ended"
    assert returned_after < 60, f"cv --no-wait took {returned_after:.0f} s"
    reasons = multinode_cluster.run("squeue", "-h", "-j", array, "-o", "%T %r").stdout.split("\n")
    assert any("Dependency" in r for r in reasons), reasons

    # fold 0's Genesis preempted mid-run: it saves, submitit requeues the task under the same id, and it
    # resumes; rank 0's log of array task 0 is ARRAY_0_0_log.err (submitit's %A_%a_%t)
    genesis_log = run / "jobs" / "submitit" / f"{genesis}_0_0_log.err"
    wait_for(lambda: genesis_log.is_file() and "genesis/fold-0 epoch 0:" in genesis_log.read_text(),
             "fold 0's Genesis' first epoch", 240)
    multinode_cluster.run("scancel", "--signal=USR2", f"{genesis}_0")
    wait_for(lambda: all(job_state(multinode_cluster, f"{array}_{k}") in ("COMPLETED", "FAILED", "CANCELLED")
                         for k in (0, 1)), "the folds to end", 720)
    text = genesis_log.read_text()
    assert re.search(r"resumed \S+genesis/fold-0 at epoch \d+, step \d+", text), text[-3000:]
    assert [job_state(multinode_cluster, f"{genesis}_{k}") for k in (0, 1)] == ["COMPLETED"] * 2
    assert [job_state(multinode_cluster, f"{array}_{k}") for k in (0, 1)] == ["COMPLETED", "COMPLETED"]
    nodes = multinode_cluster.run("squeue", "-h", "--states=all", "-j", f"{genesis},{array}", "-o", "%N").stdout
    assert set(nodes.split()) == {"node[1-2]"}, nodes
    tags = [*run.glob("genesis/fold-*/ckpt/*/done"), *run.glob("3d/fold-*/*/ckpt/*/done")]
    assert {tag.parents[2].name for tag in tags if "genesis" in tag.parts} == {"fold-0", "fold-1"}, tags
    for tag in tags:
        assert json.loads(tag.read_text())["world_size"] == 2, tag
    collect = stroke_tss(multinode_cluster, "collect", run, "--resamples", "200")
    assert collect.returncode == 0, collect.stderr[-3000:]
    assert set(rows(json.loads((run / "summary.json").read_text()))) == {"3d/lesion", "3d/tss3h"}


@pytest.fixture(scope="module")
def small_2d(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("mn-ws")
    store = make_store(folder / "store.zarr", num_subjects=16)
    config = folder / "tss2d-small.yaml"
    config.write_text("\n".join([
        f"extends: {REPO / 'configs' / 'tss2d.yaml'}", f"data: {{store: {store}}}", "cv: {folds: 2}",
        "model: {options: {base_channels: 4}}",
        "train: {num_workers: 0, threads: 1, batch_size: 1, stopping: {max_epochs: 2, min_epochs: 1}}",
        "phases: {tss3h: null, tss4h5: null, attention: null}", "variants: {2d_scratch: null}",
        # DeepSpeed on both sides: with `auto`, 1 rank would be the local engine and 2 DDP, which the engine
        # check refuses anyway; ZeRO shards are where a change of world size goes wrong unnoticed
        f"engine: {{kind: deepspeed, deepspeed_config: {REPO / 'configs' / 'deepspeed' / 'zero2.json'}, "
        "timeout_s: 60}"]) + "\n")
    return config, folder


@pytest.mark.parametrize(("saved", "resumed"), [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_only_on_the_world_size_that_saved_it(multinode_cluster, small_2d, tmp_path, saved,
                                                                   resumed):
    """Preempted at its second step on `saved` nodes, the run is refused on `resumed` nodes in one line naming
    both sizes (the sampler position and the schedule length are counted in the saving world's steps), and
    nothing of the checkpoint is lost: the same world resumes it."""
    config, _ = small_2d
    run = tmp_path / "run"
    flag = tmp_path / "preempt-now"
    flag.touch()  # what the templates' USR2 trap does: every rank sees it at its first poll
    first = srun(multinode_cluster, saved, "train", config, "--fold", "0", f"run.dir={run}",
                 STROKE_TSS_PREEMPT_FILE=str(flag))
    assert "checkpoint saved; run the same command again to resume" in first.stderr, first.stderr[-3000:]
    flag.unlink()
    ckpt = run / "2d" / "fold-0" / "lesion" / "ckpt"
    (tag,) = [p.parent for p in ckpt.glob("*/done")]
    refused = srun(multinode_cluster, resumed, "train", config, "--fold", "0", f"run.dir={run}")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.startswith("stroke-tss train: error:")]
    assert lines == [f"stroke-tss train: error: checkpoint {tag} was saved by {saved} rank(s) and this run has "
                     f"{resumed}: resume it with {saved} rank(s) (its sampler position and learning-rate schedule "
                     "are counted in their steps), or train into a new run.dir"] * resumed, refused.stderr[-3000:]
    again = srun(multinode_cluster, saved, "train", config, "--fold", "0", f"run.dir={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed {ckpt.parent} at epoch 0, step" in again.stderr
