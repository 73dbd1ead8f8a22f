"""`stroke-tss cv` / `collect` / `sweep` end to end on the tiny store: local processes and a real Slurm array,
summary.json checked against the folds' own predictions, resume without resubmission, a failed fold reported
with its log while the others land, a ranked sweep, and one-line refusals that submit nothing.

Run folders are shared through module fixtures: one cv serves several tests, and the tests that change a run
folder come after the ones that read it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.fixtures.slurm import wait_for_jobs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# One epoch per phase: the folds still run all four phases, in a fraction of the time.
FAST = ["train.stopping.max_epochs=1"]
PHASES = ["lesion", "tss3h", "tss4h5", "attention"]


def cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stroke_tss", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cv(store: Path, run_dir: Path, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return cli("cv", TINY, f"data.store={store}", f"run.dir={run_dir}", "--variant", "2d", *FAST, *extra,
               timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True, check=True,
                         timeout=60)
    return set(out.stdout.split())


def wait_for_array(array_id: str, *, num_tasks: int) -> list[str]:
    """States of the array's tasks once every one has ended (a deadline to start, another to run)."""
    states = wait_for_jobs(array_id, num_tasks=num_tasks, start_s=180, run_s=400)
    return [states[k] for k in sorted(states)]


def array_ids(run_dir: Path) -> list[str]:
    """Slurm arrays submitted for a run folder (submitit writes one submission script per sbatch call)."""
    return sorted(p.name.split("_")[0] for p in (run_dir / "jobs" / "submitit").glob("*_submission.sh"))


def store_table(store: Path) -> pd.DataFrame:
    from data_prep.store import open_store

    return open_store(store).table


def expected_n(store: Path, task: str) -> int:
    """Out-of-fold hemispheres of a task: every subject is tested in exactly one fold."""
    from stroke_tss.tasks import task_samples

    return len(task_samples(store_table(store), task)[0])


def check_summary(run_dir: Path, store: Path, *, num_folds: int) -> dict:
    """summary.json's variant/phase rows (returned) against the folds' own files: pooled test predictions, each
    binarised at its fold's validation threshold. The run-level keys beside them are the report's to check."""
    from stroke_tss.runs.summary import RUN_KEYS, rows

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) - set(rows(summary)) == set(RUN_KEYS)
    summary = rows(summary)
    assert sorted(summary) == sorted(f"2d/{p}" for p in PHASES)
    for key, entry in summary.items():
        variant, phase = key.split("/")
        frames, thresholds, one_class = [], [], False
        for k in range(num_folds):
            phase_dir = run_dir / variant / f"fold-{k}" / phase
            threshold = json.loads((phase_dir / "metrics.json").read_text())["val"]["threshold"]
            pred = pd.read_csv(phase_dir / "predictions.csv")
            frames.append(pred[pred["split"] == "test"].assign(positive=lambda f, t=threshold: f["probability"] >= t))
            thresholds.append(threshold)
            one_class |= pred.loc[pred["split"] == "val", "label"].nunique() < 2
        test = pd.concat(frames)
        m = entry["hemisphere"]
        assert entry["num_folds"] == num_folds
        assert not test.duplicated(["subject_id", "hemisphere"]).any()
        assert m["n"] == len(test) == expected_n(store, entry["task"]), key
        assert m["n_positive"] == int(test["label"].sum())
        assert m["auc"] == pytest.approx(roc_auc_score(test["label"], test["probability"]), abs=1e-12), key
        lo, hi = m["ci95"]["auc"]
        assert lo <= m["auc"] <= hi and hi - lo > 0, key
        # A fold whose validation split holds one class has no Youden threshold: then, and only then, every
        # fold's test rows are decided at 0.5, and the note says so.
        assert ("note" in m) == one_class, (key, m.get("note"))
        if one_class:
            assert "threshold 0.5" in m["note"] and m["thresholds"] == [0.5], key
            test = test.assign(positive=test["probability"] >= 0.5)
        else:
            assert m["thresholds"] == pytest.approx(thresholds, rel=5e-3), key
        pos, y = test["positive"], test["label"] == 1
        assert m["sensitivity"] == pytest.approx(pos[y].mean()), key
        assert m["specificity"] == pytest.approx((~pos[~y]).mean()), key
        assert m["accuracy"] == pytest.approx((pos == y).mean()), key
    return summary


def mtimes(run_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime for p in run_dir.glob("2d/fold-*/*/weights.pt")}


# ---------------------------------------------------------------- local processes


@pytest.fixture(scope="module")
def local_run(tiny_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cv-local") / "run"
    return run_dir, ok(cv(tiny_store, run_dir, "--executor", "local"))


def test_local_cv_writes_the_pooled_summary(local_run, tiny_store):
    run_dir, proc = local_run
    summary = check_summary(run_dir, tiny_store, num_folds=2)
    # the tiny store's 2 folds give every validation split both classes: each fold's own threshold is checked
    assert not [key for key, e in summary.items() if "note" in e["hemisphere"]]
    assert (run_dir / "splits.json").is_file() and (run_dir / "config.yaml").is_file()
    # the terminal table is the summary's
    lesion = summary["2d/lesion"]["hemisphere"]
    assert f"{lesion['auc']:.3f}" in next(line for line in proc.stdout.splitlines() if " lesion " in line)


def test_a_run_folder_made_by_another_config_is_refused(local_run, tiny_store):
    run_dir, _ = local_run
    before = sorted((run_dir / "jobs" / "submitit").iterdir())
    proc = cv(tiny_store, run_dir, "--executor", "local", "seed=3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"stroke-tss cv: error: run folder {run_dir} was made by another config (they differ at 'seed'); "
        "use a new run.dir or the original config"]
    assert sorted((run_dir / "jobs" / "submitit").iterdir()) == before, "nothing may be submitted"


def test_a_failed_fold_is_reported_with_its_log_while_the_other_lands(local_run, tiny_store):
    """Changes the run folder: the last test of local_run."""
    run_dir, _ = local_run
    for k in (0, 1):
        for phase in ("tss4h5", "attention"):
            shutil.rmtree(run_dir / "2d" / f"fold-{k}" / phase)
    # A truncated weights file (a full disk, a killed copy) bites only when fold 1's tss4h5 loads it.
    weights = run_dir / "2d" / "fold-1" / "tss3h" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:200])
    kept = mtimes(run_dir)
    proc = cv(tiny_store, run_dir, "--executor", "local")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "submitting 2 of 2" in proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert line.startswith("FAILED 2d-fold-1: ")
    log = Path(line.rpartition("(log: ")[2].rstrip(")"))
    assert log.is_file() and "weights" in log.read_text() and "Error" in log.read_text()
    assert f"log: {log}" in proc.stderr, "the failure is reported as it happens too"
    fold0 = run_dir / "2d" / "fold-0"
    assert all((fold0 / p / "metrics.json").is_file() for p in PHASES), "the other fold lands"
    assert not (run_dir / "2d" / "fold-1" / "tss4h5" / "metrics.json").exists()
    assert {k: v for k, v in mtimes(run_dir).items() if k in kept} == kept, "finished phases are not redone"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["2d/tss4h5"]["num_folds"] == 1 and summary["2d/lesion"]["num_folds"] == 2
    collect = ok(cli("collect", run_dir, "--resamples", "50"))
    assert "not finished (waiting, running or failed): 2d-fold-1; the summary pools the finished folds only" \
        in collect.stderr


def test_collect_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    proc = cli("collect", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"stroke-tss collect: error: {tmp_path} is not a run folder (no config.yaml); pass the run.dir of a "
        "`stroke-tss cv`"]


# ---------------------------------------------------------------- Slurm


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tiny_store, tmp_path_factory):
    """5 folds submitted with --no-wait, waited for in Slurm, then gathered by `collect`."""
    run_dir = tmp_path_factory.mktemp("cv-slurm") / "run"
    submit = ok(cv(tiny_store, run_dir, "--executor", "slurm", "launch.partition=debug", "cv.folds=5", "--no-wait"))
    summary_after_submit = (run_dir / "summary.json").exists()
    (array,) = array_ids(run_dir)
    states = wait_for_array(array, num_tasks=5)
    collect = ok(cli("collect", run_dir, "--resamples", "200"))
    return {"run_dir": run_dir, "submit": submit, "array": array, "states": states,
            "summary_after_submit": summary_after_submit, "collect": collect}


@pytest.mark.slurm
def test_slurm_cv_is_one_array_and_collect_gathers_it(slurm_run, tiny_store):
    run_dir, array = slurm_run["run_dir"], slurm_run["array"]
    assert f"submitted 5 items as job {array}; when they finish: stroke-tss collect {run_dir}" in slurm_run["submit"].stdout
    assert not slurm_run["summary_after_submit"], "--no-wait returns before the folds finish"
    assert slurm_run["states"] == ["COMPLETED"] * 5
    tasks = sorted(p.name.split("_submitted")[0] for p in (run_dir / "jobs" / "submitit").glob("*_submitted.pkl"))
    assert tasks == [f"{array}_{k}" for k in range(5)], "one array job, one task per fold"
    check_summary(run_dir, tiny_store, num_folds=5)
    assert f"summary: {run_dir / 'summary.json'}" in slurm_run["collect"].stdout


@pytest.mark.slurm
def test_rerun_resubmits_only_unfinished_work(slurm_run, tiny_store):
    """Changes the run folder: the last test of slurm_run."""
    run_dir = slurm_run["run_dir"]
    before_ids, before_weights = squeue_ids(), mtimes(run_dir)
    proc = ok(cv(tiny_store, run_dir, "--executor", "slurm", "launch.partition=debug", "cv.folds=5"))
    assert "every fold of every variant is done" in proc.stderr
    assert squeue_ids() == before_ids and array_ids(run_dir) == [slurm_run["array"]], "nothing resubmitted"
    assert mtimes(run_dir) == before_weights

    shutil.rmtree(run_dir / "2d" / "fold-3" / "attention")
    proc = ok(cv(tiny_store, run_dir, "--executor", "slurm", "launch.partition=debug", "cv.folds=5"))
    assert "submitting 1 of 5" in proc.stderr
    (new,) = set(array_ids(run_dir)) - {slurm_run["array"]}
    # submitit sends a single item as a plain job, not an array of one
    assert squeue_ids() - before_ids == {new}, "one job: the one unfinished fold"
    assert (run_dir / "2d" / "fold-3" / "attention" / "metrics.json").is_file()
    after = mtimes(run_dir)
    assert {k: v for k, v in after.items() if "attention" not in k or "fold-3" not in k} == \
        {k: v for k, v in before_weights.items() if "attention" not in k or "fold-3" not in k}
    check_summary(run_dir, tiny_store, num_folds=5)


@pytest.mark.slurm
def test_a_partition_slurm_rejects_is_one_line_and_nothing_runs(slurm_cluster, tiny_store, tmp_path):
    before = squeue_ids()
    proc = cv(tiny_store, tmp_path / "run", "--executor", "slurm", "launch.partition=no-such-partition")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("stroke-tss cv: error: slurm refused the submission: ") and "partition" in line
    assert "launch.partition" in line, "says what to change"
    assert squeue_ids() == before
    jobs = tmp_path / "run" / "jobs"
    assert not list(jobs.rglob("*_submitted.pkl")) and not (jobs / "2d-fold-0").exists(), "no job folders"


# ---------------------------------------------------------------- sweep and bad input


def test_sweep_ranks_its_points_and_records_the_chosen_one(tiny_store, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  train.optimizer.lr: [0.003, 0.0003]\nbase_variant: 2d\nrank_phase: tss4h5\n")
    run_dir = tmp_path / "run"
    proc = ok(cli("sweep", TINY, grid, f"data.store={tiny_store}", f"run.dir={run_dir}", *FAST, "--executor",
                  "local"))
    ranking = json.loads((run_dir / "sweep.json").read_text())
    assert ranking["rank_phase"] == "tss4h5"
    points = ranking["points"]
    assert sorted(p["point"] for p in points) == ["p00", "p01"]
    assert {p["point"]: p["params"] for p in points} == {"p00": {"train.optimizer.lr": 0.003},
                                                         "p01": {"train.optimizer.lr": 0.0003}}
    for p in points:  # each point's mean validation AUC, from its folds' own predictions
        aucs = []
        for k in range(2):
            pred = pd.read_csv(run_dir / p["point"] / f"fold-{k}" / "tss4h5" / "predictions.csv")
            val = pred[pred["split"] == "val"]
            assert val["label"].nunique() == 2, "the tiny store's 2 folds give every validation split both classes"
            aucs.append(roc_auc_score(val["label"], val["probability"]))
        assert p["val_auc_mean"] == pytest.approx(sum(aucs) / 2)
        cfg = (run_dir / p["point"] / "fold-0" / "config.yaml").read_text()
        assert f"lr: {p['params']['train.optimizer.lr']}" in cfg
    assert points[0]["val_auc_mean"] >= points[1]["val_auc_mean"]
    assert ranking["chosen"] == points[0]
    table = proc.stdout.splitlines()
    assert [line.split()[1] for line in table[1:3]] == [p["point"] for p in points]


@pytest.mark.parametrize("args, message", [
    (["--executor", "pbs"], "argument --executor: invalid choice: 'pbs'"),
    (["launch.executor=pbs"], "config key 'launch.executor'"),
])
def test_an_unknown_executor_is_one_line(tiny_store, tmp_path, args, message):
    proc = cv(tiny_store, tmp_path / "run", *args)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("stroke-tss cv: error: ") and message in line
    assert not (tmp_path / "run").exists(), "nothing written, nothing submitted"


def test_no_wait_with_throttled_local_processes_is_refused_before_any_starts(tiny_store, tmp_path):
    proc = cv(tiny_store, tmp_path / "run", "--executor", "local", "launch.array_parallelism=1", "--no-wait")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "stroke-tss cv: error: --no-wait with the local executor cannot hold items back: "
        "set launch.array_parallelism=2 (now 1) to start all at once, or leave out --no-wait")
    assert not (tmp_path / "run" / "jobs").exists(), "nothing started"


def test_a_grid_with_an_unknown_key_is_one_line(tiny_store, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  train.optimiser.lr: [0.1, 0.01]\n")
    proc = cli("sweep", TINY, grid, f"data.store={tiny_store}", f"run.dir={tmp_path / 'run'}", "--executor", "local")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("stroke-tss sweep: error: ") and "unknown config key 'train.optimiser'" in line
    assert not (tmp_path / "run").exists(), "nothing written, nothing submitted"
