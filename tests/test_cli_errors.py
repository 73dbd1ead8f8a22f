"""One table of the CLI's user errors: each is exit 2 and one stderr line `stroke-tss VERB: error: ...` with
the words a user needs (what was wrong, what to do), and nothing is written where nothing should be. Plus the
two other exits a user meets: preemption (hpc's code, "run the same command again") and Ctrl-C (130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc import preempt
from hpc.checkpoint import Checkpoints
from stroke_tss.cli import main
from tests.test_data import make_store

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
FAST = ["train.num_workers=0", "train.threads=1", "train.batch_size=2"]

# (id, argv with {store} / {tmp} placeholders, files to write first {name: text}, key words of the message,
#  paths under tmp that must not exist afterwards)
CASES = [
    ("train-unknown-variant",
     ["train", TINY, "--fold", "0", "--variant", "nope", "data.store={store}", "run.dir={tmp}/run"], {},
     ["--variant nope: not in configs/tiny.yaml", "(variants: 2d, 2d_scratch)"], ["run"]),
    ("train-missing-store",
     ["train", TINY, "--fold", "0", "data.store={tmp}/none.zarr", "run.dir={tmp}/run"], {},
     ["data.store {tmp}/none.zarr does not exist", "build it with `stroke-tss prep`"], ["run"]),
    ("sweep-missing-grid",
     ["sweep", TINY, "{tmp}/nogrid.yaml", "data.store={store}", "run.dir={tmp}/run"], {},
     ["grid file {tmp}/nogrid.yaml does not exist"], ["run"]),
    ("sweep-empty-values",
     ["sweep", TINY, "{tmp}/grid.yaml", "data.store={store}", "run.dir={tmp}/run"],
     {"grid.yaml": "grid:\n  train.optimizer.lr: []\n"},
     ["{tmp}/grid.yaml: grid key 'train.optimizer.lr' has no values"], ["run"]),
    ("report-specificity",
     ["report", "{tmp}", "--specificity", "1.5"], {},
     ["--specificity must be between 0 and 1, got 1.5"], ["report.md"]),
    ("report-resamples",
     ["report", "{tmp}", "--resamples", "10"], {},
     ["--resamples must be at least 100 for a 95% CI, got 10"], ["report.md"]),
    ("report-no-predictions",
     ["report", "{tmp}"], {},
     ["no predictions.csv under {tmp}", "train (or finish) a run first"], ["report.md"]),
    ("report-missing-run",
     ["report", "{tmp}/nope"], {},
     ["run folder {tmp}/nope does not exist", "pass the folder `stroke-tss train` wrote"], ["nope"]),
    ("demo-too-few-subjects",
     ["demo", "--out", "{tmp}/demo", "--subjects", "5"], {},
     ["--subjects 5: cross-validation needs at least 20 subjects"], ["demo"]),
    ("cv-unknown-variant",
     ["cv", TINY, "--variant", "nope", "--executor", "debug", "data.store={store}", "run.dir={tmp}/run"], {},
     ["unknown variant(s) nope; the config defines 2d, 2d_scratch"], ["run/jobs"]),
    ("adapt-unknown-phase",
     ["adapt", TINY, "--source", "lesion", "--phase", "nope", "--executor", "debug", "data.store={store}",
      "run.dir={tmp}/run"], {},
     ["--phase nope: not a phase of the config (lesion, tss3h, tss4h5, attention)"], ["run/2d"]),
    ("adapt-train-only-phase",
     ["adapt", TINY, "--source", "lesion", "--phase", "attention", "--executor", "debug", "data.store={store}",
      "run.dir={tmp}/run"], {},
     ["--phase attention trains only ['attention', 'slice_weights']", "pick a phase without train_only"],
     ["run/2d"]),
    ("adapt-source-not-trained",
     ["adapt", TINY, "--source", "lesion", "--phase", "tss3h", "--executor", "debug", "data.store={store}",
      "run.dir={tmp}/run"], {},
     ["--source lesion:", "2d/fold-0/lesion/weights.pt does not exist", "train that phase first"], ["run/2d"]),
    ("config-extends-cycle",
     ["config", "{tmp}/a.yaml"], {"a.yaml": "extends: b.yaml\nseed: 1\n", "b.yaml": "extends: a.yaml\n"},
     ["{tmp}/a.yaml: 'extends' forms a cycle through", "b.yaml"], []),
    ("config-missing-file",
     ["config", "{tmp}/none.yaml"], {},
     ["config file {tmp}/none.yaml does not exist", "configs/tss2d.yaml"], []),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("cli-errors") / "store.zarr", num_subjects=8)


@pytest.mark.parametrize("argv, files, words, absent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_exit_2_and_writes_nothing(store, tmp_path, capsys, argv, files, words, absent):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    fill = {"store": str(store), "tmp": str(tmp_path)}
    cwd = os.getcwd()
    os.chdir(REPO)  # the configs are named relative to the checkout, as a user in it types them
    try:
        code = main([a.format(**fill) for a in argv])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"stroke-tss {argv[0]}: error: "), err
    for w in words:
        assert w.format(**fill) in err[0], (w, err[0])
    for path in absent:
        assert not (tmp_path / path).exists(), f"{path} written by a command that refused to run"


def _train_cmd(store: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stroke_tss", "train", TINY, "--fold", "0", "--variant", "2d",
            f"data.store={store}", f"run.dir={run}", *FAST, "train.ckpt_every_steps=1", *extra]


@pytest.mark.integration
def test_a_preempted_train_exits_with_hpcs_code_and_says_to_run_it_again(store, tmp_path):
    flag = tmp_path / "preempt-now"
    flag.touch()  # what the sbatch templates' USR2 trap does
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STROKE_TSS_PREEMPT_FILE": str(flag)}
    proc = subprocess.run(_train_cmd(store, tmp_path / "run"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == preempt.EXIT_CODE, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "stroke-tss train: preempted at epoch 0, step 1; checkpoint saved; run the same command again to resume")
    assert (tmp_path / "run/2d/fold-0/lesion/ckpt/step-00000001/done").is_file()
    assert not (tmp_path / "run/2d/fold-0/lesion/weights.pt").exists()


@pytest.mark.integration
def test_ctrl_c_exits_130_with_one_line_and_keeps_the_checkpoints(store, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # as a terminal's foreground job: SIGINT at its default, whatever this process inherited (a runner started
    # in the background by a non-interactive shell ignores it, and an ignored signal stays ignored across exec)
    proc = subprocess.Popen(_train_cmd(store, run, "train.stopping.max_epochs=1000", "train.stopping.patience=1000"),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ckpt = run / "2d/fold-0/lesion/ckpt"
        deadline = time.monotonic() + 240
        while not list(ckpt.glob("step-*/done")):
            assert proc.poll() is None, proc.communicate(timeout=60)[1][-3000:]
            assert time.monotonic() < deadline, "training never checkpointed a step"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    # the last line ends with it (an unfinished progress bar may stand before it on the same line)
    assert err.strip().splitlines()[-1].endswith("stroke-tss train: interrupted"), err[-3000:]
    assert "Traceback" not in err
    # what a resume reads: the newest complete tag, intact (the interrupt may land between a tag's `done` and the
    # `latest` pointer, which resume does not trust alone)
    latest = Checkpoints(ckpt).latest()
    assert latest is not None and Checkpoints(ckpt).verify(latest) == [], "the last complete checkpoint survives"
