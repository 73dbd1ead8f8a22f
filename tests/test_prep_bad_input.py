"""Every bad image of issues 3 and 16 through `prep` on top of a finished store: one line naming subject, file and
field (in the result and STORE/failures.csv), the build goes on, and no finished subject is lost."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep.build import prep
from data_prep.errors import InputError
from data_prep.store import StoreError, open_store
from stroke_tss.cli import main as cli_main
from tests.fixtures.data import TINY_PREP, tiny_prep_config

pytestmark = pytest.mark.integration  # a Dask LocalCluster for the module, prep through the CLI

BAD = "sub-bad"


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    # one worker for the module: bad subjects fail at loading, so the cluster's start is the cost to share
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


@pytest.fixture()
def store(tiny_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, copy)
    return copy


def _manifest(tiny_cohort: Path, folder: Path, **bad) -> Path:
    """The tiny cohort (absolute paths) plus one subject whose series are copies of sub-001's, edited by `bad`."""
    table = pd.read_csv(tiny_cohort, dtype=str, keep_default_na=False)
    for col in ("dwi", "b0", "flair", "adc", "lesion_mask", "brain_mask"):
        table[col] = [str(tiny_cohort.parent / v) if v else "" for v in table[col]]
    row = table.iloc[0].copy()
    (folder / BAD).mkdir(parents=True, exist_ok=True)
    for series in ("dwi", "b0", "flair"):
        shutil.copy(row[series], folder / BAD / f"{series}.nii.gz")
        row[series] = f"{BAD}/{series}.nii.gz"
    row["subject_id"] = BAD
    for key, value in bad.items():
        row[key] = value
    table = pd.concat([table, row.to_frame().T], ignore_index=True)
    table.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def _edit_image(path: Path, edit) -> None:
    img = nib.load(str(path))
    data, affine = edit(np.asarray(img.dataobj, dtype=np.float32), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _run_and_check(manifest: Path, store: Path, client, *, subject: str, field: str, file: Path | None,
                   words: str) -> str:
    before = open_store(store)
    ids, kept = before.subject_ids, before.volume(before.subject_ids[-1])
    result = prep(manifest, store, config=tiny_prep_config(), cluster=client, progress=False)
    assert len(result.failed) == 1, result.failed
    line = next(iter(result.failed.values()))
    assert "\n" not in line and f"subject {subject}" in line and f"field {field}" in line and words in line, line
    if file is not None:
        assert f"file {file}" in line, line
    failures = pd.read_csv(store / "failures.csv")
    assert list(failures["reason"]) == [line]
    after = open_store(store)
    assert after.subject_ids == ids and BAD not in after.subject_ids  # finished subjects kept, bad one absent
    np.testing.assert_array_equal(after.volume(ids[-1]), kept)
    return line


def _set_sform(path: Path, srow: np.ndarray) -> None:
    """Write the header's sform as given (nibabel refuses to build an image from a singular affine)."""
    img = nib.load(str(path))
    header = img.header.copy()
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = srow
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header=header), str(path))


@pytest.mark.parametrize(("kind", "words"), [
    ("truncated", "truncated or corrupt gzip"), ("text", "not a NIfTI"), ("nan", "NaN/Inf"),
    ("zero", "all-zero volume"), ("4d", "expected a 3D volume"),
    ("zero_affine", "affine is singular"), ("flat_affine", "affine is singular"),
])
def test_bad_image_fails_its_subject_only(kind, words, tiny_cohort, store, client, tmp_path) -> None:
    manifest = _manifest(tiny_cohort, tmp_path)
    path = tmp_path / BAD / "flair.nii.gz"
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":
        path.write_bytes(gzip.compress(b"patient,notes\n1,see report\n"))
    elif kind == "nan":
        _edit_image(path, lambda d, a: (np.where(np.arange(d.size).reshape(d.shape) == 5, np.nan, d), a))
    elif kind == "zero":
        _edit_image(path, lambda d, a: (np.zeros_like(d), a))
    elif kind == "4d":
        _edit_image(path, lambda d, a: (np.stack([d, d], -1), a))
    elif kind == "zero_affine":
        _set_sform(path, np.zeros((3, 4)))
    elif kind == "flat_affine":  # one voxel axis collapsed to 0 mm
        _set_sform(path, np.diag([4.0, 4.0, 0.0, 1.0])[:3])
    _run_and_check(manifest, store, client, subject=BAD, field="flair", file=path, words=words)


def test_series_with_wildly_different_fields_of_view(tiny_cohort, store, client, tmp_path) -> None:
    manifest = _manifest(tiny_cohort, tmp_path)
    path = tmp_path / BAD / "flair.nii.gz"
    _edit_image(path, lambda d, a: (d, np.diag([4.0, 4.0, 4.0, 1.0]) @ a))  # 4x the voxel size: another scan
    _run_and_check(manifest, store, client, subject=BAD, field="flair", file=path, words="field of view")


def test_missing_file(tiny_cohort, store, client, tmp_path) -> None:
    manifest = _manifest(tiny_cohort, tmp_path)
    (tmp_path / BAD / "dwi.nii.gz").unlink()
    _run_and_check(manifest, store, client, subject=BAD, field="dwi", file=tmp_path / BAD / "dwi.nii.gz",
                   words="file not found")


def test_path_escaping_the_manifest_folder(tiny_cohort, store, client, tmp_path) -> None:
    manifest = _manifest(tiny_cohort, tmp_path / "cohort", b0=f"../outside/{BAD}/b0.nii.gz")
    _run_and_check(manifest, store, client, subject=BAD, field="b0", file=None, words="escapes")


def test_duplicate_subject_id_keeps_the_first(tiny_cohort, store, client, tmp_path) -> None:
    manifest = _manifest(tiny_cohort, tmp_path, subject_id="sub-002")
    line = _run_and_check(manifest, store, client, subject="sub-002", field="subject_id", file=manifest,
                          words="duplicate")
    assert "duplicate of line 3" in line  # the kept one: the file's third line (header, sub-001, sub-002)


@pytest.mark.parametrize(("value", "words"), [("-30", "outside"), ("3h", "not a number"), ("50000", "outside")])
def test_bad_onset(value, words, tiny_cohort, store, client, tmp_path) -> None:
    manifest = _manifest(tiny_cohort, tmp_path, onset_to_mri_min=value)
    _run_and_check(manifest, store, client, subject=BAD, field="onset_to_mri_min", file=manifest, words=words)


def test_unknown_stroke_side(tiny_cohort, store, client, tmp_path) -> None:
    manifest = _manifest(tiny_cohort, tmp_path, stroke_side="posterior")
    _run_and_check(manifest, store, client, subject=BAD, field="stroke_side", file=manifest, words="posterior")


def test_empty_manifest_is_one_error_and_touches_nothing(store, client, tmp_path) -> None:
    (tmp_path / "m.csv").write_text("subject_id,dwi,b0,flair\n")
    ids = open_store(store).subject_ids
    with pytest.raises(InputError, match="empty manifest") as info:
        prep(tmp_path / "m.csv", store, config=tiny_prep_config(), cluster=client, progress=False)
    assert str(tmp_path / "m.csv") in str(info.value)
    assert open_store(store).subject_ids == ids


def test_store_path_that_is_not_our_store(tiny_cohort, client, tmp_path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(StoreError, match="not a stroke-tss store") as info:
        prep(tiny_cohort, folder, config=tiny_prep_config(), cluster=client, progress=False)
    assert str(folder) in str(info.value)
    assert sorted(p.name for p in folder.iterdir()) == ["table.csv"]


def test_cli_exits_nonzero_lists_failures_and_keeps_the_rest(tiny_cohort, store, tmp_path, capsys) -> None:
    manifest = _manifest(tiny_cohort, tmp_path)
    (tmp_path / BAD / "b0.nii.gz").write_bytes(b"not an image")
    config = tmp_path / "prep.yaml"
    config.write_text("prep:\n" + "".join(f"  {k}: {list(v) if isinstance(v, tuple) else v}\n"
                                          for k, v in TINY_PREP.items()))
    assert cli_main(["prep", str(manifest), str(store), "--config", str(config), "--workers", "1",
                     "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"failed: subject {BAD}, field b0, file {tmp_path / BAD / 'b0.nii.gz'}" in out
    assert str(store / "failures.csv") in out
    assert len(open_store(store).subject_ids) == len(pd.read_csv(tiny_cohort))
    # the store path given to a different build is refused with one line and exit 2
    assert cli_main(["prep", str(manifest), str(store), "--no-progress"]) == 2
    assert "another preprocessing config" in capsys.readouterr().err
