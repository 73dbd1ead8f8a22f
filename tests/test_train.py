"""End to end on a small real store: the 2D schedule through the CLI, exact resume after a kill, 3D with
Models Genesis pretraining."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.test_data import make_store

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.options.base_channels=4", "train.num_workers=0", "train.threads=1", "train.batch_size=2",
         "train.stopping.max_epochs=2", "train.stopping.min_epochs=1", "cv.folds=2", "train.augment.noise_std=0.1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train") / "store.zarr", num_subjects=16)


def _cli(*args: str) -> int:
    from stroke_tss.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def two_rank_runs(store, tmp_path_factory) -> dict[str, Path]:
    """`stroke-tss train` under torchrun with 2 gloo ranks, once per engine, on the cosine schedule."""
    from tests.fixtures.dist import torchrun

    runs = {}
    for engine, engine_args in (("ddp", ["engine.kind=ddp"]),
                                ("deepspeed", ["engine.kind=deepspeed",
                                               "engine.deepspeed_config=configs/deepspeed/zero2.json"])):
        run = tmp_path_factory.mktemp(f"two-ranks-{engine}") / "run"
        cmd = [*torchrun(2), "-m", "stroke_tss", "train", "configs/tss2d.yaml", "--fold", "0", "--variant", "2d",
               f"data.store={store}", f"run.dir={run}", *SMALL, "train.optimizer.schedule=cosine", *engine_args]
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, f"{engine}: {proc.stderr[-3000:]}"
        runs[engine] = run
    return runs


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_ranks_run_the_schedule_and_predict_every_sample_once(store, two_rank_runs, engine):
    """Each phase's predictions are gathered from both ranks with the sampler's padding dropped, so every
    validation and test sample appears exactly once."""
    from data_prep.store import open_store
    from stroke_tss.splits import fold_of, read_splits
    from stroke_tss.tasks import task_samples

    run = two_rank_runs[engine]
    table = open_store(store).table
    roles = fold_of(read_splits(run / "splits.json"), 0)
    for phase, task in (("lesion", "lesion_present"), ("tss3h", "tss_lt_3h"), ("tss4h5", "tss_lt_4h5")):
        pred = pd.read_csv(run / "2d" / "fold-0" / phase / "predictions.csv")
        for split in ("val", "test"):
            want = sorted((s.subject_id, s.hemisphere) for s in task_samples(table, task, roles[split])[0])
            got = sorted(pred.query("split == @split")[["subject_id", "hemisphere"]].itertuples(index=False, name=None))
            assert got == want, (phase, split)
        done = json.loads(next((run / "2d" / "fold-0" / phase / "ckpt").glob("epoch-*/done")).read_text())
        assert done == {"world_size": 2, "engine": engine}


@pytest.mark.integration
def test_deepspeed_follows_the_cosine_schedule_as_ddp_does(two_rank_runs):
    """DeepSpeed's ZeRO wrapper holds its own parameter groups; the schedule must scale those too. The same
    data, seeds and averaged gradients under both engines then give the same weights, up to summation order."""
    for phase in ("lesion", "tss3h"):
        ddp, ds = (torch.load(two_rank_runs[e] / "2d/fold-0" / phase / "weights.pt", weights_only=True)["state_dict"]
                   for e in ("ddp", "deepspeed"))
        gaps = {k: (ddp[k] - ds[k]).abs().max().item() for k in ddp if ddp[k].is_floating_point()
                and "running" not in k}  # BatchNorm statistics: DDP broadcasts rank 0's, DeepSpeed keeps each rank's
        # measured: equal to the bit on CPU; DeepSpeed at a constant rate is 3e-3 away after these steps
        assert max(gaps.values()) < 1e-5, (phase, sorted(gaps.items(), key=lambda kv: -kv[1])[:3])


@pytest.mark.integration
def test_2d_schedule_writes_every_phase_and_weights_rebuild_the_model(store, tmp_path):
    from stroke_tss.models import build_model

    run = tmp_path / "run"
    assert _cli("train", "configs/tss2d.yaml", "--fold", "0", "--variant", "2d", f"data.store={store}",
                f"run.dir={run}", *SMALL) == 0
    for phase in ("lesion", "tss3h", "tss4h5", "attention"):
        out = run / "2d" / "fold-0" / phase
        pred = pd.read_csv(out / "predictions.csv")
        assert list(pred.columns) == ["subject_id", "hemisphere", "task", "label", "probability", "split"]
        assert set(pred.split) == {"val", "test"} and pred.probability.between(0, 1).all()
        assert len(list((out / "ckpt").glob("epoch-*"))) >= 1
        assert len((out / "log.jsonl").read_text().splitlines()) == 2
        weights = torch.load(out / "weights.pt", weights_only=True)
        model = build_model(weights["model"], **weights["init_args"])
        model.load_state_dict(weights["state_dict"])
    splits = (run / "splits.json").read_text()
    test_ids = set(pd.read_csv(run / "2d/fold-0/lesion/predictions.csv").query("split == 'test'").subject_id)
    assert test_ids and all(s in splits for s in test_ids)
    # frozen groups kept the previous phase's values
    lesion = torch.load(run / "2d/fold-0/lesion/weights.pt", weights_only=True)["state_dict"]
    tss3h = torch.load(run / "2d/fold-0/tss3h/weights.pt", weights_only=True)["state_dict"]
    stem = [k for k in lesion if k.startswith("backbone.conv1")]
    assert stem and all(torch.equal(lesion[k], tss3h[k]) for k in stem)
    # a second call finds every phase done and leaves the results alone
    before = (run / "2d/fold-0/attention/weights.pt").stat().st_mtime_ns
    assert _cli("train", "configs/tss2d.yaml", "--fold", "0", "--variant", "2d", f"data.store={store}",
                f"run.dir={run}", *SMALL) == 0
    assert (run / "2d/fold-0/attention/weights.pt").stat().st_mtime_ns == before


@pytest.mark.integration
@pytest.mark.parametrize("restore_best", [True, False])
def test_phase_weights_come_from_the_best_or_the_last_epoch(store, tmp_path, restore_best):
    run = tmp_path / "run"
    assert _cli("train", "configs/tss2d.yaml", "--fold", "0", "--variant", "2d", f"data.store={store}",
                f"run.dir={run}", *SMALL, "train.stopping.max_epochs=3", "train.stopping.min_epochs=3",
                "train.stopping.monitor=val_auc", f"train.stopping.restore_best={str(restore_best).lower()}") == 0
    out = run / "2d/fold-0/lesion"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    kept = torch.load(out / "weights.pt", weights_only=True)["state_dict"]
    best = torch.load(out / "ckpt/best-weights.pt", weights_only=True)
    last = torch.load(out / "ckpt/epoch-0003/state.pt", weights_only=True)["model"]
    assert best.keys() == last.keys() == kept.keys()
    # the run is seeded: its best epoch is not the last, so the two choices are different weights
    assert log[-1]["best_epoch"] < 2 and not all(torch.equal(best[k], last[k]) for k in kept)
    assert all(torch.equal(kept[k], (best if restore_best else last)[k]) for k in kept)


def _train_cmd(store: Path, run: Path) -> list[str]:
    # batch 1: a dozen steps per epoch, so the kill can land well inside one
    return [sys.executable, "-m", "stroke_tss", "train", "configs/tss2d.yaml", "--fold", "0", "--variant", "2d",
            f"data.store={store}", f"run.dir={run}", *SMALL, "train.batch_size=1", "train.ckpt_every_steps=1",
            "train.stopping.max_epochs=3", "phases.tss3h.task=tss_lt_3h",
            "train.optimizer.schedule=cosine"]  # the learning rate must follow the same curve after a resume


def test_cosine_schedule_runs_from_lr_to_its_floor_over_max_epochs():
    from hpc.engine import Engine
    from stroke_tss.config.training import OptimizerSection
    from stroke_tss.loop import lr_schedule

    assert lr_schedule(OptimizerSection(), 100) is None  # constant by default
    curve = lr_schedule(OptimizerSection(schedule="cosine", min_lr_factor=0.05), 100)
    factors = [curve(step) for step in range(100)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    model = torch.nn.Linear(2, 1)
    engine = Engine(model, torch.optim.Adam(model.parameters(), lr=0.004))
    engine.scale_lr(curve(50))
    engine.scale_lr(curve(99))  # from the rate it was built with, not the last one set
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.004 * 0.05)


@pytest.mark.integration
def test_a_killed_run_resumes_bit_identically(store, tmp_path):
    """SIGKILL mid-epoch, no chance to save: the next run resumes from the last complete step checkpoint, at
    its epoch and step (seeded training from scratch would end the same, so the resume itself is checked), and
    ends with the uninterrupted run's logs, weights and predictions."""
    from hpc.checkpoint import Checkpoints

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(store, straight), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    steps_per_epoch = json.loads((straight / "2d/fold-0/lesion/log.jsonl").read_text().splitlines()[0])["steps"]
    assert steps_per_epoch >= 8, "too few steps per epoch to kill the run inside one"
    ckpt = killed / "2d/fold-0/lesion/ckpt"
    target = ckpt / f"step-{steps_per_epoch + 2:08d}" / "done"  # epoch 1, step 2
    proc = subprocess.Popen(_train_cmd(store, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not target.exists():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before reaching {target.parent.name}"
            assert time.monotonic() < deadline, f"no checkpoint {target.parent.name} within 300 s"
            time.sleep(0.01)
        # Stopped first, so the checkpoint the resume must start from is read while nothing moves; it may be a
        # step or two past the target, and a later tag may be half written (no `done`): both as in a real kill.
        proc.send_signal(signal.SIGSTOP)
        latest = Checkpoints(ckpt).latest()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    position = torch.load(ckpt / latest / "state.pt", weights_only=True)["client"]["loop"]
    assert position["epoch"] == 1 and 0 < position["step_in_epoch"] < steps_per_epoch, (latest, position)
    assert not (killed / "2d/fold-0/lesion/weights.pt").exists()
    # as if the kill had landed between an epoch's log line and its checkpoint: the resumed run redoes that
    # epoch and must not log it twice
    log_path = killed / "2d/fold-0/lesion/log.jsonl"
    with open(log_path, "a") as fh:
        fh.write(json.dumps({"epoch": position["epoch"], "train_loss": -1.0}) + "\n")
    resumed = subprocess.run(_train_cmd(store, killed), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = re.findall(r"resumed (\S+) at epoch (\d+), step (\d+)", resumed.stderr)
    assert found == [(str(killed / "2d/fold-0/lesion"), str(position["epoch"]), str(position["step_in_epoch"]))], \
        resumed.stderr[-3000:]
    for phase in ("lesion", "tss3h", "tss4h5", "attention"):
        assert _epochs(straight / "2d/fold-0" / phase / "log.jsonl") == \
            _epochs(killed / "2d/fold-0" / phase / "log.jsonl"), phase
    for phase in ("lesion", "tss3h", "tss4h5", "attention"):
        a = torch.load(straight / "2d/fold-0" / phase / "weights.pt", weights_only=True)["state_dict"]
        b = torch.load(killed / "2d/fold-0" / phase / "weights.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), phase
        assert (straight / "2d/fold-0" / phase / "predictions.csv").read_text() == \
            (killed / "2d/fold-0" / phase / "predictions.csv").read_text()


def _epochs(path: Path) -> list:
    return [(r["epoch"], r["train_loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.integration
def test_3d_schedule_after_genesis_pretraining(store, tmp_path, capsys):
    """The lesion phase of `init: genesis` starts from the run's Genesis U-Net encoder: with the encoder frozen
    (BatchNorm statistics included), the phase's weights.pt holds exactly Genesis' down_tr* tensors."""
    from stroke_tss.models import build_model

    run = tmp_path / "run3d"
    common = [f"data.store={store}", f"run.dir={run}", *SMALL, "genesis.base_channels=4", "genesis.epochs=1",
              "genesis.crop=[16,16,8]", "genesis.crops_per_subject=1", "genesis.batch_size=4",
              "phases.lesion.train_only=[attention,head]"]
    assert _cli("train", "configs/tss3d.yaml", "--fold", "0", "--variant", "3d", *common) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stroke-tss train: error: init: genesis needs {run / 'genesis' / 'fold-0' / 'weights.pt'} (fold 0's own "
        "pretraining); run `stroke-tss pretrain CONFIG --fold 0` first")
    assert _cli("pretrain", "configs/tss3d.yaml", "--fold", "0", *common) == 0
    genesis = torch.load(run / "genesis/fold-0/weights.pt", weights_only=True)
    assert genesis["model"] == "unet3d"
    # every encoder tensor but BatchNorm's step counters, which count on while the statistics are held
    encoder = {k: v for k, v in genesis["state_dict"].items()
               if k.startswith("down_tr") and not k.endswith("num_batches_tracked")}
    torch.manual_seed(0)  # the phase's seed: what a random start of the same encoder would hold
    scratch = build_model("encoder3d", in_channels=3, base_channels=4).state_dict()
    assert any(not torch.equal(v, scratch[k]) for k, v in encoder.items() if v.is_floating_point()), \
        "Genesis left its encoder at the random init: the check below could not tell the two apart"
    assert _cli("train", "configs/tss3d.yaml", "--fold", "0", "--variant", "3d", *common) == 0
    lesion = torch.load(run / "3d/fold-0/lesion/weights.pt", weights_only=True)
    assert lesion["model"] == "encoder3d"
    assert all(torch.equal(lesion["state_dict"][k], v) for k, v in encoder.items()), \
        [k for k, v in encoder.items() if not torch.equal(lesion["state_dict"][k], v)]
    assert (run / "3d/fold-0/attention/metrics.json").exists()


@pytest.mark.integration
def test_genesis_pretraining_preempted_mid_epoch_resumes_at_its_step(store, tmp_path, monkeypatch, capsys):
    """Genesis runs through the phases' loop: the preemption flag makes it save at the next step and exit
    with hpc's code, and the next run resumes at that step and ends with the uninterrupted run's weights."""
    from hpc import preempt

    def pretrain(run: Path) -> int:
        return _cli("pretrain", "configs/tss3d.yaml", "--fold", "0", f"data.store={store}", f"run.dir={run}", *SMALL,
                    "genesis.base_channels=4", "genesis.epochs=2", "genesis.crop=[16,16,8]",
                    "genesis.crops_per_subject=2", "genesis.batch_size=4")

    assert pretrain(tmp_path / "straight") == 0
    flag = tmp_path / "preempt-now"
    flag.touch()
    monkeypatch.setenv("STROKE_TSS_PREEMPT_FILE", str(flag))
    assert pretrain(tmp_path / "preempted") == preempt.EXIT_CODE
    assert "preempted at epoch 0, step 1; checkpoint saved; run the same command again" in capsys.readouterr().err
    assert not (tmp_path / "preempted/genesis/fold-0/weights.pt").exists()
    flag.unlink()
    assert pretrain(tmp_path / "preempted") == 0
    assert "resumed" in (err := capsys.readouterr().err) and "at epoch 0, step 1" in err, err
    a = torch.load(tmp_path / "straight/genesis/fold-0/weights.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "preempted/genesis/fold-0/weights.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _epochs(tmp_path / "straight/genesis/fold-0/log.jsonl") == \
        _epochs(tmp_path / "preempted/genesis/fold-0/log.jsonl")


@pytest.mark.integration
def test_a_genesis_checkpoint_of_the_old_loop_resumes_at_its_epoch(store, tmp_path, capsys):
    """Run folders from before Genesis joined the phases' loop saved only {"epoch": next} at epoch ends."""
    run = tmp_path / "run"
    args = ["pretrain", "configs/tss3d.yaml", f"data.store={store}", f"run.dir={run}", *SMALL,
            "genesis.base_channels=4", "genesis.crop=[16,16,8]", "genesis.batch_size=4",
            "genesis.subjects=all"]  # the layout of that time: one RUN/genesis/ shared by the folds
    assert _cli(*args, "genesis.epochs=2") == 0
    (run / "genesis/weights.pt").unlink()
    shutil.rmtree(run / "genesis/ckpt/epoch-0002")  # as if killed after epoch 1 (a run folder is one config)
    [state_file] = (run / "genesis/ckpt").glob("epoch-0001/state.pt")
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "client": {"epoch": 1}}, state_file)
    (state_file.parent / "digests.json").unlink()  # that loop recorded no digests
    capsys.readouterr()
    assert _cli(*args, "genesis.epochs=2") == 0
    assert "at epoch 1, step 0" in capsys.readouterr().err
    assert [r["epoch"] for r in map(json.loads, (run / "genesis/log.jsonl").read_text().splitlines())] == [0, 1]
