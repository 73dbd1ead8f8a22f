"""Bad manifests (issue 16): unsafe subject ids, files that are not UTF-8 CSV text, rows of the wrong width, a
bad histogram reference, and a re-run after the manifest was corrected. Each ends in one line naming the
subject or line, the field and what to do; the good rows land and nothing is written outside the store."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep.build import prep
from data_prep.cohort import read_manifest
from data_prep.errors import InputError
from data_prep.paths import subject_path
from data_prep.store import open_store
from data_prep.verify import verify_store
from stroke_tss.cli import main as cli_main
from stroke_tss.tasks import subject_labels
from tests.fixtures.data import TINY_PREP, tiny_prep_config

IMAGES = ("dwi", "b0", "flair", "adc", "lesion_mask", "brain_mask")


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    """Two valid subjects with tiny volumes (no preprocessing needed to read the manifest)."""
    rng = np.random.default_rng(0)
    for sid in ("s1", "s2"):
        (tmp_path / sid).mkdir()
        for series in ("dwi", "b0", "flair"):
            data = rng.uniform(1, 100, (8, 8, 8)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), str(tmp_path / sid / f"{series}.nii.gz"))
    lines = ["subject_id,dwi,b0,flair,onset_to_mri_min,site"]
    lines += [f"{sid},{sid}/dwi.nii.gz,{sid}/b0.nii.gz,{sid}/flair.nii.gz,120,Zurich" for sid in ("s1", "s2")]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "manifest.csv"


def _replace_line(manifest: Path, number: int, text: str) -> None:
    lines = manifest.read_text().splitlines()
    lines[number - 1] = text
    manifest.write_text("\n".join(lines) + "\n")


def _one_error(manifest: Path, *words: str) -> str:
    m = read_manifest(manifest)
    assert m.subject_ids == ["s2"], m.errors  # the good row lands
    assert len(m.errors) == 1 and "\n" not in m.errors[0], m.errors
    assert all(w in m.errors[0] for w in words), m.errors[0]
    return m.errors[0]


@pytest.mark.parametrize("sid", ["../../x", "a/b", "x" * 300, ".hidden", "..", "a b", "-rf", "sub\\x", "ü1",
                                 '"two\nlines"'])
def test_unsafe_subject_id_fails_its_row_naming_line_and_rule(cohort, sid) -> None:
    _replace_line(cohort, 2, f"{sid},s1/dwi.nii.gz,s1/b0.nii.gz,s1/flair.nii.gz,120,Zurich")
    line = _one_error(cohort, "field subject_id", "unsafe subject id", "A-Z a-z 0-9 . _ -", str(cohort))
    assert "line 2" in line or "line 3" in line  # a quoted newline makes the row end on line 3
    assert len(line) < 400  # a 300-character id is shown cut short


def test_subject_path_refuses_to_leave_its_folder(tmp_path: Path) -> None:
    assert subject_path(tmp_path, "sub-01", ".json") == tmp_path / "sub-01.json"
    for sid, suffix in (("../x", ""), ("a/b", ".png"), ("..", ""), ("", ".json"), ("ok", "/../../x.json")):
        with pytest.raises(InputError, match="subject"):
            subject_path(tmp_path, sid, suffix)


def test_latin1_manifest_is_one_line_naming_the_byte_and_line(cohort) -> None:
    cohort.write_bytes(cohort.read_text().replace("Zurich", "Zürich").encode("latin-1"))
    with pytest.raises(InputError) as info:
        read_manifest(cohort)
    line = str(info.value)
    assert "not UTF-8" in line and "0xfc on line 2" in line and str(cohort) in line and "iconv" in line
    # the same text as UTF-8 with a spreadsheet's byte-order mark reads fine
    cohort.write_bytes(b"\xef\xbb\xbf" + cohort.read_bytes().decode("latin-1").encode("utf-8"))
    assert read_manifest(cohort).table["site"].tolist() == ["Zürich", "Zürich"]


@pytest.mark.parametrize("content", [gzip.compress(b"subject_id,dwi\ns1,a.nii.gz\n"), bytes(range(256)) * 4])
def test_binary_manifest_is_one_line(cohort, content) -> None:
    cohort.write_bytes(content)
    with pytest.raises(InputError, match="binary file, not a CSV") as info:
        read_manifest(cohort)
    assert str(cohort) in str(info.value)


def test_semicolon_separated_manifest_says_so(cohort) -> None:
    cohort.write_text(cohort.read_text().replace(",", ";"))
    with pytest.raises(InputError, match="looks semicolon-separated") as info:
        read_manifest(cohort)
    assert "save it with commas between the fields" in str(info.value)


def test_row_with_extra_fields_is_refused_naming_its_line(cohort) -> None:
    # an unquoted comma in the site name: pandas took the first field as the index and shifted every column
    _replace_line(cohort, 2, "s1,s1/dwi.nii.gz,s1/b0.nii.gz,s1/flair.nii.gz,120,Zurich,University Hospital")
    _one_error(cohort, "subject 's1'", "line 2 has 7 fields where the header has 6", "quote values")
    # trailing empty fields (a spreadsheet's stray commas) are harmless and accepted
    _replace_line(cohort, 2, "s1,s1/dwi.nii.gz,s1/b0.nii.gz,s1/flair.nii.gz,120,Zurich,,")
    assert read_manifest(cohort).subject_ids == ["s1", "s2"]


def test_row_with_missing_fields_is_refused(cohort) -> None:
    _replace_line(cohort, 2, "s1,s1/dwi.nii.gz,s1/b0.nii.gz,s1/flair.nii.gz")
    _one_error(cohort, "subject 's1'", "line 2 has 4 fields where the header has 6")


# --- through prep: ids never become paths outside the store; the reference is validated first ---------------


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


def _absolute(tiny_cohort: Path, out: Path, rows: list[int] | None = None) -> pd.DataFrame:
    table = pd.read_csv(tiny_cohort, dtype=str, keep_default_na=False)
    table = table.iloc[rows].reset_index(drop=True) if rows is not None else table
    for col in IMAGES:
        table[col] = [str(tiny_cohort.parent / v) if v else "" for v in table[col]]
    table.to_csv(out, index=False)
    return table


def _files_outside(root: Path, store: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and store not in p.parents and p.suffix != ".csv"]


@pytest.mark.integration
def test_prep_with_unsafe_ids_writes_nothing_outside_the_store(tiny_cohort, client, tmp_path) -> None:
    table = _absolute(tiny_cohort, tmp_path / "m.csv", rows=[0, 0, 0, 0])
    table["subject_id"] = ["../../escape", "a/b", "x" * 300, "sub-001"]  # the bad rows come first
    table.to_csv(tmp_path / "m.csv", index=False)
    store = tmp_path / "deep" / "store.zarr"
    config = tiny_prep_config().model_copy(update={"qc_montage": True})  # QC PNGs are paths from ids too
    result = prep(tmp_path / "m.csv", store, config=config, cluster=client, progress=False)
    assert result.done == ["sub-001"] and len(result.failed) == 3
    # refused when the manifest is read (its line named), not after a volume was written under the id
    assert all("unsafe subject id" in line and " line " in line and "\n" not in line
               for line in result.failed.values())
    assert _files_outside(tmp_path, store) == []
    assert sorted(p.name for p in (store / "qc").iterdir()) == ["sub-001.png"]
    assert open_store(store).attrs["reference_histogram"]["subject_id"] == "sub-001"
    assert len(pd.read_csv(store / "failures.csv")) == 3


@pytest.mark.integration
def test_bad_reference_subject_is_refused_before_the_store_exists(tiny_cohort, tmp_path) -> None:
    _absolute(tiny_cohort, tmp_path / "m.csv", rows=[0, 1])
    store = tmp_path / "store.zarr"
    config = tiny_prep_config().model_copy(update={"reference_subject": "sub-01"})  # a typo of sub-001
    with pytest.raises(InputError, match="reference_subject 'sub-01' is not a valid subject") as info:
        prep(tmp_path / "m.csv", store, config=config, progress=False)
    assert "field reference_subject" in str(info.value) and str(tmp_path / "m.csv") in str(info.value)
    assert not store.exists()
    # a reference whose row is invalid: the row's own line is part of the message
    table = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False)
    table.loc[0, "onset_to_mri_min"] = "3h"
    table.to_csv(tmp_path / "m.csv", index=False)
    config = tiny_prep_config().model_copy(update={"reference_subject": "sub-001"})
    with pytest.raises(InputError, match="field onset_to_mri_min"):
        prep(tmp_path / "m.csv", store, config=config, progress=False)
    assert not store.exists()


@pytest.mark.integration
def test_a_reference_that_failed_leaves_a_store_the_corrected_config_can_use(tiny_cohort, client, tmp_path):
    table = _absolute(tiny_cohort, tmp_path / "m.csv", rows=[0, 1])
    broken = tmp_path / "flair.nii.gz"
    raw = Path(table.loc[0, "flair"]).read_bytes()
    broken.write_bytes(raw[: len(raw) // 2])  # cut short
    table.loc[0, "flair"] = str(broken)
    table.to_csv(tmp_path / "m.csv", index=False)
    store = tmp_path / "store.zarr"
    config = tiny_prep_config().model_copy(update={"reference_subject": "sub-001"})
    result = prep(tmp_path / "m.csv", store, config=config, cluster=client, progress=False)
    assert result.done == [] and "truncated or corrupt gzip" in result.failed["sub-001"]
    fixed = tiny_prep_config()  # no named reference: the first subject that works
    result = prep(tmp_path / "m.csv", store, config=fixed, cluster=client, progress=False)
    assert result.done == ["sub-002"]
    assert open_store(store).attrs["config_hash"] == fixed.config_hash()


# --- a re-run after the manifest changed (item 3) -------------------------------------------------------------


@pytest.fixture()
def store_copy(tiny_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, copy)
    return copy


@pytest.mark.integration
def test_fixed_onset_reaches_the_labels_without_reprocessing(tiny_cohort, store_copy, tmp_path, capsys) -> None:
    table = _absolute(tiny_cohort, tmp_path / "m.csv")
    before = open_store(store_copy)
    sid = next(s for s, o in zip(table["subject_id"], table["onset_to_mri_min"]) if o and float(o) >= 270)
    label_before = subject_labels(before.table, "tss_lt_4h5")[sid]
    volumes = {s: before.volume(s) for s in before.subject_ids}
    table.loc[table["subject_id"] == sid, "onset_to_mri_min"] = "90"  # the typo fixed: 90 min, not 900
    table.to_csv(tmp_path / "m.csv", index=False)
    config = tmp_path / "prep.yaml"
    config.write_text("prep:\n" + "".join(f"  {k}: {list(v) if isinstance(v, tuple) else v}\n"
                                          for k, v in TINY_PREP.items()))
    assert cli_main(["prep", str(tmp_path / "m.csv"), str(store_copy), "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"table updated from the manifest: {sid} (onset_to_mri_min)" in out and "0 re-processed" in out
    after = open_store(store_copy)
    assert after.table.set_index("subject_id").loc[sid, "onset_to_mri_min"] == 90
    assert label_before == 0 and subject_labels(after.table, "tss_lt_4h5")[sid] == 1
    for s, vol in volumes.items():
        np.testing.assert_array_equal(after.volume(s), vol)  # nothing re-processed


@pytest.mark.integration
def test_changed_input_file_is_reprocessed_and_a_copied_one_is_not(tiny_cohort, store_copy, client, tmp_path):
    table = _absolute(tiny_cohort, tmp_path / "m.csv")
    moved = tmp_path / "moved"
    shutil.copytree(tiny_cohort.parent / "sub-002", moved)  # same bytes, new path and (below) new times
    for f in moved.iterdir():
        os.utime(f)
    for col in ("dwi", "b0", "flair", "lesion_mask", "brain_mask", "adc"):
        if table.loc[1, col]:
            table.loc[1, col] = str(moved / Path(table.loc[1, col]).name)
    table.to_csv(tmp_path / "m.csv", index=False)
    before = open_store(store_copy)
    volumes = {s: before.volume(s) for s in before.subject_ids}
    result = prep(tmp_path / "m.csv", store_copy, config=tiny_prep_config(), cluster=client, progress=False)
    assert result.reprocessed == {} and set(result.updated) == {"sub-002"} and "flair" in result.updated["sub-002"]
    np.testing.assert_array_equal(open_store(store_copy).volume("sub-002"), volumes["sub-002"])

    flair = moved / Path(table.loc[1, "flair"]).name
    img = nib.load(str(flair))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 1.5 + 30, img.affine), str(flair))  # another contrast
    result = prep(tmp_path / "m.csv", store_copy, config=tiny_prep_config(), cluster=client, progress=False)
    assert result.reprocessed == {"sub-002": ["flair"]} and not result.failed
    after = open_store(store_copy)
    assert not np.array_equal(after.volume("sub-002")[2], volumes["sub-002"][2])  # flair re-made
    for s in set(volumes) - {"sub-002"}:
        np.testing.assert_array_equal(after.volume(s), volumes[s])
    assert verify_store(store_copy) == []


@pytest.mark.integration
def test_records_of_an_earlier_version_are_adopted_not_reprocessed(tiny_cohort, store_copy, tmp_path) -> None:
    record = store_copy / "records" / "sub-004.json"
    old = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in old.items() if k not in ("inputs", "manifest_keys")}))
    result = prep(tiny_cohort, store_copy, config=tiny_prep_config(), progress=False)  # starts no cluster
    assert result.reprocessed == {} and result.updated == {} and not result.failed
    assert json.loads(record.read_text())["inputs"]["files"] == old["inputs"]["files"]


@pytest.mark.integration
def test_predict_with_an_unsafe_id_scores_the_rest_and_says_which_it_did_not(trained_run, tiny_cohort, tmp_path,
                                                                              capsys) -> None:
    table = _absolute(tiny_cohort, tmp_path / "new.csv", rows=[1, 1])
    table.loc[0, "subject_id"] = "../../escape"
    table.to_csv(tmp_path / "new.csv", index=False)
    before = {p for p in trained_run.run.parent.rglob("*")}
    out = tmp_path / "pred.csv"
    assert cli_main(["predict", str(trained_run.run), str(tmp_path / "new.csv"), "--fold", "0", "--out", str(out),
                     "--workers", "1"]) == 1
    assert pd.read_csv(out)["subject_id"].tolist() == ["sub-002"]
    err = capsys.readouterr().err
    assert "not predicted: subject '../../escape', field subject_id" in err and "unsafe subject id" in err
    new = {p for p in trained_run.run.parent.rglob("*")} - before
    assert all(trained_run.run / "predict" in p.parents or p == trained_run.run / "predict" for p in new), new
    assert not any("escape" in p.name for p in tmp_path.parent.rglob("*"))
