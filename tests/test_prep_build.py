"""`stroke-tss prep` end to end: killed mid-run and re-run equals a clean build; Dask workers as Slurm jobs give
the same store; the ISLES'22 case goes through `scan` + `prep` with its lesion in the left hemisphere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.store import open_store
from stroke_tss.cli import main as cli_main
from tests.fixtures.data import TINY_PREP

pytestmark = pytest.mark.integration


def _config_file(folder: Path) -> Path:
    path = folder / "prep.yaml"
    path.write_text("prep:\n" + "".join(f"  {k}: {list(v) if isinstance(v, tuple) else v}\n"
                                        for k, v in TINY_PREP.items()))
    return path


def assert_same_store(got: Path, want: Path, subject_ids: list[str]) -> None:
    a, b = open_store(got), open_store(want)
    assert a.subject_ids == subject_ids
    for key in ("prep_config", "config_hash", "affine", "channels", "reference_histogram"):
        assert a.attrs[key] == b.attrs[key], key
    for sid in subject_ids:
        np.testing.assert_array_equal(a.volume(sid), b.volume(sid), err_msg=sid)
        np.testing.assert_array_equal(a.brain(sid), b.brain(sid), err_msg=sid)
        np.testing.assert_array_equal(a.lesion(sid), b.lesion(sid), err_msg=sid)
    columns = [c for c in a.table.columns if c != "index"]
    pd.testing.assert_frame_equal(a.table[columns].reset_index(drop=True),
                                  b.table.set_index("subject_id").loc[subject_ids].reset_index()[columns])


@pytest.mark.timeout(900)
def test_killed_prep_reruns_to_the_clean_build(tiny_cohort: Path, tiny_store: Path, tmp_path: Path) -> None:
    store, config = tmp_path / "store.zarr", _config_file(tmp_path)
    cmd = [sys.executable, "-m", "stroke_tss.cli", "prep", str(tiny_cohort), str(store), "--config", str(config),
           "--workers", "2", "--no-progress"]
    # its own session, so the Dask workers it leaves behind can be found and stopped by its group id
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while len(list((store / "records").glob("*.json"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no two subjects done in 10 minutes"
            time.sleep(0.2)
        proc.kill()  # SIGKILL the CLI: no clean-up of its own runs
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned workers it started
        except ProcessLookupError:
            pass
    done_at_kill = len(list((store / "records").glob("*.json")))
    assert 2 <= done_at_kill < len(open_store(tiny_store).subject_ids)
    assert cli_main(["prep", str(tiny_cohort), str(store), "--config", str(config), "--workers", "2",
                     "--no-progress"]) == 0
    assert_same_store(store, tiny_store, open_store(tiny_store).subject_ids)


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_prep_on_slurm_workers_gives_the_same_store(slurm_cluster, tiny_cohort: Path, tiny_store: Path,
                                                     tmp_path: Path) -> None:
    table = pd.read_csv(tiny_cohort, dtype=str, keep_default_na=False).iloc[:4]
    for col in ("dwi", "b0", "flair", "adc", "lesion_mask", "brain_mask"):
        table[col] = [str(tiny_cohort.parent / v) if v else "" for v in table[col]]
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    store = tmp_path / "store.zarr"
    assert cli_main(["prep", str(manifest), str(store), "--config", str(_config_file(tmp_path)), "--cluster",
                     "slurm", "--partition", "debug", "--memory", "1GB", "--walltime", "00:15:00",
                     "--workers", "2", "--no-progress"]) == 0
    assert_same_store(store, tiny_store, list(table["subject_id"]))


@pytest.mark.timeout(900)
def test_isles_case_scan_prep_lesion_in_left_hemisphere(isles: Path, tmp_path: Path) -> None:
    manifest, store = tmp_path / "manifest.csv", tmp_path / "store.zarr"
    assert cli_main(["scan", str(isles), "-o", str(manifest)]) == 0
    assert cli_main(["prep", str(manifest), str(store), "--workers", "1", "--no-progress"]) == 0
    s = open_store(store)
    (sid,) = s.subject_ids
    z, y, x = np.nonzero(s.lesion(sid))
    assert len(x) > 50
    centroid = s.affine @ [x.mean(), y.mean(), z.mean(), 1.0]
    assert centroid[0] < -10, centroid  # RAS: the patient's left is x < 0, clear of the midline
    row = s.table.iloc[0]
    assert row["lesion_left"] and not row["lesion_right"] and row["derived"] == "b0=dwi*exp(b*adc)"
    # robust z-scores (median 0, the IQR of a unit normal), kept as they are by matching to its own histogram
    q1, median, q3 = np.percentile(s.volume(sid)[:, s.brain(sid) > 0], (25, 50, 75), axis=1)
    assert median == pytest.approx(0.0, abs=0.01) and q3 - q1 == pytest.approx(1.349, rel=0.01), (q1, median, q3)
