"""Models Genesis per fold: no fold's encoder has seen its test subjects, and each fold's phases start from its
own pretraining. `cv` of the 3D schedule (its lesion phase, encoder frozen) on a 16-subject store, 2 folds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stroke_tss.config import load_config
from stroke_tss.errors import UserError
from stroke_tss.runs.pretrain import genesis_subjects, genesis_todo
from tests.test_data import make_store

REPO = Path(__file__).resolve().parents[1]
TSS3D = str(REPO / "configs" / "tss3d.yaml")
SMALL = ["model.options.base_channels=4", "train.num_workers=0", "train.threads=1", "train.batch_size=4",
         "train.stopping.max_epochs=1", "train.stopping.min_epochs=1", "cv.folds=2", "launch.executor=debug",
         "genesis.base_channels=4", "genesis.epochs=1", "genesis.crop=[16,16,8]", "genesis.crops_per_subject=1",
         "genesis.batch_size=4"]
# the lesion phase alone, with the encoder held fixed: its weights.pt then holds the encoder it started from
LESION_ONLY = ["phases.lesion.train_only=[attention,head]", "phases.tss3h=null", "phases.tss4h5=null",
               "phases.attention=null", "variants.3d_scratch=null"]
RECORD_KEYS = {"mode", "fold", "subjects", "test_subjects_seen"}


def _cli(*args: str) -> int:
    from stroke_tss.cli import main

    return main(list(args))


def _encoder(path: Path) -> dict[str, torch.Tensor]:
    """The U-Net encoder's tensors of a weights.pt (BatchNorm's step counters aside: they count on when frozen)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("down_tr") and not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("genesis-folds") / "store.zarr", num_subjects=16)


@pytest.fixture(scope="module")
def fold_run(store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("genesis-folds") / "run"
    assert _cli("cv", TSS3D, f"data.store={store}", f"run.dir={run}", "--variant", "3d", *SMALL, *LESION_ONLY) == 0
    return run


def check_own_subjects(run: Path) -> None:
    """Each fold's Genesis saw exactly its own train and val subjects, and subjects.json says so."""
    splits = json.loads((run / "splits.json").read_text())["folds"]
    assert not (run / "genesis" / "weights.pt").exists(), "no pretraining shared by the folds"
    for k, fold in enumerate(splits):
        record = json.loads((run / "genesis" / f"fold-{k}" / "subjects.json").read_text())
        assert set(record) == RECORD_KEYS  # what the report reads
        assert record["mode"] == "fold" and record["fold"] == k
        seen = set(record["subjects"])
        assert not seen & set(fold["test"]), f"fold {k}'s Genesis saw its test subjects {seen & set(fold['test'])}"
        assert record["test_subjects_seen"] == 0
        assert seen == set(fold["train"]) | set(fold["val"])  # everything else it may use
    # with 2 folds each fold's test subjects are the other fold's pretraining subjects: two different sets
    assert set(splits[0]["test"]) <= set(json.loads((run / "genesis/fold-1/subjects.json").read_text())["subjects"])


def check_starts_from_own(run: Path) -> None:
    """Each fold's lesion phase (encoder frozen) holds exactly its own fold's Genesis encoder."""
    genesis = [_encoder(run / "genesis" / f"fold-{k}" / "weights.pt") for k in range(2)]
    assert any(not torch.equal(v, genesis[1][k]) for k, v in genesis[0].items() if v.is_floating_point()), \
        "the two folds' pretrainings are identical: the check below could not tell them apart"
    for k in range(2):
        lesion = torch.load(run / "3d" / f"fold-{k}" / "lesion" / "weights.pt", weights_only=True)["state_dict"]
        differ = [name for name, v in genesis[k].items() if not torch.equal(lesion[name], v)]
        assert not differ, f"fold {k}'s lesion phase did not start from genesis/fold-{k}: {differ[:3]}"


@pytest.mark.integration
def test_each_fold_pretrains_on_its_own_subjects_and_never_on_its_test_ones(fold_run):
    check_own_subjects(fold_run)


@pytest.mark.integration
def test_each_folds_lesion_phase_starts_from_its_own_genesis(fold_run):
    check_starts_from_own(fold_run)


@pytest.mark.integration
def test_a_finished_pretraining_is_not_redone_and_a_missing_one_is_found(fold_run, store):
    weights = [fold_run / "genesis" / f"fold-{k}" / "weights.pt" for k in range(2)]
    before = [w.stat().st_mtime_ns for w in weights]
    assert _cli("cv", TSS3D, f"data.store={store}", f"run.dir={fold_run}", "--variant", "3d", *SMALL,
                *LESION_ONLY) == 0
    assert [w.stat().st_mtime_ns for w in weights] == before
    cfg = load_config(TSS3D, [f"data.store={store}", f"run.dir={fold_run}", *SMALL, *LESION_ONLY])
    assert genesis_todo(cfg) == []
    weights[1].rename(weights[1].with_name("kept.pt"))
    try:
        assert genesis_todo(cfg) == [1]
    finally:
        weights[1].with_name("kept.pt").rename(weights[1])


@pytest.mark.integration
def test_pretrain_verb_trains_one_fold_and_train_names_the_folds_file(store, tmp_path, capsys):
    run = tmp_path / "run"
    common = [f"data.store={store}", f"run.dir={run}", *SMALL, *LESION_ONLY]
    assert _cli("train", TSS3D, "--fold", "1", "--variant", "3d", *common) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stroke-tss train: error: init: genesis needs {run / 'genesis' / 'fold-1' / 'weights.pt'} (fold 1's own "
        "pretraining); run `stroke-tss pretrain CONFIG --fold 1` first")
    assert _cli("pretrain", TSS3D, "--fold", "0", *common) == 0
    assert sorted(p.parent.name for p in run.glob("genesis/*/weights.pt")) == ["fold-0"]
    done = (run / "genesis/fold-0/weights.pt").stat().st_mtime_ns
    assert _cli("pretrain", TSS3D, *common) == 0  # without --fold: every fold, the finished one skipped
    assert sorted(p.parent.name for p in run.glob("genesis/*/weights.pt")) == ["fold-0", "fold-1"]
    assert (run / "genesis/fold-0/weights.pt").stat().st_mtime_ns == done
    other = [f"data.store={store}", f"run.dir={tmp_path / 'all'}", *SMALL, *LESION_ONLY, "genesis.subjects=all"]
    assert _cli("pretrain", TSS3D, "--fold", "0", *other) == 2
    assert "--fold 0: genesis.subjects is all, one pretraining for the whole run" in capsys.readouterr().err


def test_all_records_the_most_test_subjects_a_fold_has_among_them(tmp_path):
    cfg = load_config(TSS3D, [f"run.dir={tmp_path}", "genesis.subjects=all"])
    splits = {"folds": [{"train": ["a", "b"], "val": ["c"], "test": ["d"]},
                        {"train": ["c", "d"], "val": ["a"], "test": ["b", "e"]}]}
    subjects, record = genesis_subjects(cfg, splits, ["a", "b", "c", "d", "e", "f"], None)
    assert subjects == ["a", "b", "c", "d", "e", "f"]  # the store's unlabelled "f" too
    assert record == {"mode": "all", "fold": None, "subjects": ["a", "b", "c", "d", "e", "f"],
                      "test_subjects_seen": 2}


def test_train_is_refused_for_a_new_pretraining_but_an_old_run_folder_resumes(tmp_path):
    cfg = load_config(TSS3D, [f"run.dir={tmp_path}", "genesis.subjects=train"])
    with pytest.raises(UserError, match=r"saw their test subjects; set genesis.subjects=fold"):
        genesis_todo(cfg)
    (tmp_path / "genesis").mkdir()
    (tmp_path / "genesis" / "weights.pt").touch()  # what such a run wrote before `fold` existed
    assert genesis_todo(cfg) == []


@pytest.mark.slurm
@pytest.mark.integration
def test_slurm_runs_one_genesis_per_fold_as_an_array_the_folds_wait_for(slurm_cluster, store, tmp_path):
    """`cv --no-wait` on Slurm: the Genesis items are one array, the fold array depends on it (afterok), and
    each fold still starts from its own pretraining."""
    from tests.fixtures.slurm import wait_for_jobs

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "stroke_tss", "cv", TSS3D, f"data.store={store}", f"run.dir={run}", "--variant", "3d",
         *SMALL, *LESION_ONLY, "--executor", "slurm", "--no-wait", "launch.partition=debug", "launch.gpus_per_node=0",
         "launch.cpus_per_task=1", "launch.mem_gb=null", "launch.time_min=20", "launch.signal_delay_s=30"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    genesis = re.search(r"Models Genesis pretraining is job (\d+); the folds wait for it \(afterok\)", proc.stderr)
    array = re.search(r"submitted 2 items as job (\d+);", proc.stdout)
    assert genesis and array, proc.stdout + proc.stderr[-3000:]
    genesis, array = genesis.group(1), array.group(1)
    assert "Models Genesis items: genesis-fold-0, genesis-fold-1" in proc.stderr
    assert f"--dependency=afterok:{genesis}" in (run / "jobs" / "submitit" / f"{array}_submission.sh").read_text()
    assert sorted(wait_for_jobs(genesis, num_tasks=2, start_s=180, run_s=400).values()) == ["COMPLETED"] * 2
    assert sorted(wait_for_jobs(array, num_tasks=2, start_s=180, run_s=400).values()) == ["COMPLETED"] * 2
    check_own_subjects(run)
    check_starts_from_own(run)
