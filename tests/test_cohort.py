"""Manifest reading/validation, scan_tree, safe NIfTI loading and b0 derivation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep.cohort import load_channel, read_manifest, scan_tree, side_from_lesion, write_manifest
from data_prep.errors import InputError
from data_prep.nifti import load_nifti
from stroke_tss.cli import main as cli_main


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1]) if affine is None else affine), str(path))
    return path


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1, 100, (8, 8, 8)).astype(np.float32)


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    """Two valid subjects; tests break one field at a time."""
    for sid in ("s1", "s2"):
        (tmp_path / sid).mkdir()
        for series in ("dwi", "b0", "flair"):
            _nifti(tmp_path / sid / f"{series}.nii.gz", _volume())
    rows = [{"subject_id": sid, "dwi": f"{sid}/dwi.nii.gz", "b0": f"{sid}/b0.nii.gz", "flair": f"{sid}/flair.nii.gz",
             "onset_to_mri_min": "120", "stroke_side": "left", "site": "a"} for sid in ("s1", "s2")]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def _edit(manifest: Path, **changes) -> None:
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for key, value in changes.items():
        df.loc[0, key] = value
    df.to_csv(manifest, index=False)


def _single_error(manifest: Path, *, field: str, words: str) -> str:
    m = read_manifest(manifest)
    assert [r.subject_id for r in m.rows] == ["s2"], m.errors  # the good subject survives
    assert len(m.errors) == 1
    line = m.errors[0]
    assert "subject s1" in line and f"field {field}" in line and words in line and "\n" not in line
    return line


def test_valid_manifest_resolves_paths_and_parses_values(cohort: Path) -> None:
    m = read_manifest(cohort)
    assert m.errors == [] and m.subject_ids == ["s1", "s2"]
    row = m.rows[0]
    assert row.series["dwi"] == cohort.parent / "s1" / "dwi.nii.gz" and row.series["dwi"].is_absolute()
    assert row.onset_to_mri_min == 120.0 and row.stroke_side == "left" and row.derived == {}
    assert set(m.table.columns) >= {"subject_id", "dwi", "b0", "flair", "onset_to_mri_min", "stroke_side", "site"}


@pytest.mark.parametrize(("field", "value", "words"), [
    ("onset_to_mri_min", "-5", "outside 0-43200"),
    ("onset_to_mri_min", "2h", "not a number"),
    ("onset_to_mri_min", "50000", "30 days"),
    ("stroke_side", "L", "unknown stroke_side"),
    ("dwi", "s1/missing.nii.gz", "file not found"),
    ("flair", "../../etc/flair.nii.gz", "escapes the manifest's folder"),
    ("flair", "", "channel flair is needed but missing"),
    ("mrs_90d", "9", "outside 0-6"),
])
def test_bad_field_is_one_line_for_that_subject(cohort: Path, field: str, value: str, words: str) -> None:
    _edit(cohort, **{field: value})
    line = _single_error(cohort, field=field, words=words)
    if words == "file not found":
        assert "missing.nii.gz" in line


def test_empty_onset_is_unknown_and_empty_side_is_derived_from_lesion(cohort: Path) -> None:
    lesion = np.zeros((8, 8, 8), np.uint8)
    lesion[1:3, 3:5, 3:5] = 1  # low x index; affine below maps index 0 to the patient's left (x < 0)
    aff = np.diag([2.0, 2, 2, 1])
    aff[0, 3] = -8
    _nifti(cohort.parent / "s1" / "lesion.nii.gz", lesion, aff)
    _edit(cohort, onset_to_mri_min="", stroke_side="", lesion_mask="s1/lesion.nii.gz")
    row = read_manifest(cohort).rows[0]
    assert row.onset_to_mri_min is None and row.stroke_side == "left"
    las = aff.copy()
    las[0, 0], las[0, 3] = -2.0, 8.0  # the same voxels stored LAS now lie at x > 0: the right
    _nifti(cohort.parent / "s1" / "lesion.nii.gz", lesion, las)
    assert side_from_lesion(cohort.parent / "s1" / "lesion.nii.gz", subject_id="s1") == "right"


def test_duplicate_subject_id_keeps_first_and_names_the_line(cohort: Path) -> None:
    _edit(cohort, subject_id="s2")
    m = read_manifest(cohort)
    assert len(m.rows) == 1 and len(m.errors) == 1
    assert "subject s2" in m.errors[0] and "duplicate of line 2" in m.errors[0]


def test_empty_manifest_raises_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("subject_id,dwi,b0,flair\n")
    with pytest.raises(InputError, match="empty manifest") as info:
        read_manifest(tmp_path / "m.csv")
    assert str(tmp_path / "m.csv") in str(info.value)
    (tmp_path / "m.csv").write_text("")
    with pytest.raises(InputError, match="empty manifest"):
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize(("kind", "words"), [
    ("missing", "file not found"), ("truncated", "truncated or corrupt gzip"), ("text", "not a NIfTI"),
    ("nan", "NaN/Inf"), ("zero", "all-zero volume"), ("4d", "expected a 3D volume"),
])
def test_load_nifti_bad_files(tmp_path: Path, kind: str, words: str) -> None:
    path = tmp_path / "dwi.nii.gz"
    data = _volume()
    if kind == "truncated":
        _nifti(path, data)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":
        path.write_bytes(gzip.compress(b"subject,notes\n1,hello\n"))
    elif kind == "nan":
        data[2, 2, 2] = np.nan
        _nifti(path, data)
    elif kind == "zero":
        _nifti(path, np.zeros_like(data))
    elif kind == "4d":
        _nifti(path, np.stack([data, data], -1))
    with pytest.raises(InputError, match=words) as info:
        load_nifti(path, subject_id="sub-7", field="dwi")
    err = info.value
    assert (err.subject_id, err.field, err.file) == ("sub-7", "dwi", str(path))
    assert str(err).startswith("subject sub-7, field dwi, file ") and "\n" not in str(err)


def test_trailing_singleton_axis_is_squeezed(tmp_path: Path) -> None:
    img = load_nifti(_nifti(tmp_path / "a.nii.gz", _volume()[..., None]), subject_id="s", field="dwi")
    assert img.shape == (8, 8, 8)


def _diffusion_subject(folder: Path, adc_scale: float, *, b: float | None = 1000.0) -> dict:
    """DWI and ADC of a known S0: S0 = 500 in tissue, ADC 0.8e-3 mm^2/s written in the given unit."""
    folder.mkdir(parents=True, exist_ok=True)
    adc = np.full((8, 8, 8), 0.8e-3, np.float32)
    s0 = np.full((8, 8, 8), 500.0, np.float32)
    dwi = s0 * np.exp(-1000.0 * adc)
    _nifti(folder / "x_dwi.nii.gz", dwi)
    _nifti(folder / "x_adc.nii.gz", adc / adc_scale)
    if b is not None:
        (folder / "x_dwi.json").write_text(json.dumps({"DiffusionBValue": b}))
    return {"subject_id": folder.name, "dwi": f"{folder.name}/x_dwi.nii.gz", "adc": f"{folder.name}/x_adc.nii.gz",
            "flair": f"{folder.name}/x_dwi.nii.gz"}


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
def test_b0_derived_from_dwi_and_adc_in_any_adc_unit(tmp_path: Path, scale: float) -> None:
    rows = [_diffusion_subject(tmp_path / "p1", scale)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    m = read_manifest(tmp_path / "m.csv")
    assert m.errors == [] and m.rows[0].derived == {"b0": "dwi*exp(b*adc)"} and m.rows[0].b_value == 1000.0
    s0 = load_channel(m.rows[0], "b0").get_fdata()
    np.testing.assert_allclose(s0, 500.0, rtol=1e-3)


def test_b0_not_derivable_without_b_value(tmp_path: Path) -> None:
    rows = [_diffusion_subject(tmp_path / "p1", 1e-3, b=None)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    (line,) = read_manifest(tmp_path / "m.csv").errors
    assert "subject p1" in line and "b-value is unknown" in line and "x_dwi.nii.gz" in line


def test_scan_tree_matches_case_insensitively_and_merges_clinical(tmp_path: Path) -> None:
    for n in (1, 2):
        raw = tmp_path / "rawdata" / f"sub-{n}" / "ses-1"
        raw.mkdir(parents=True)
        for name in ("DWI", "adc", "FLAIR", "T2w"):
            _nifti(raw / f"sub-{n}_ses-1_{name}.nii.gz", _volume())
        der = tmp_path / "derivatives" / f"sub-{n}" / "ses-1"
        der.mkdir(parents=True)
        _nifti(der / f"sub-{n}_ses-1_msk.nii.gz", np.ones((8, 8, 8), np.uint8))
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tnihss\n1\t70\t12\nsub-2\t55\t3\n")
    table = scan_tree(tmp_path, clinical=tmp_path / "participants.tsv")
    assert table["subject_id"].tolist() == ["sub-1", "sub-2"]
    assert table.loc[0, "dwi"].endswith("sub-1_ses-1_DWI.nii.gz") and table.loc[1, "t2"].endswith("_T2w.nii.gz")
    assert table.loc[0, "lesion_mask"].endswith("derivatives/sub-1/ses-1/sub-1_ses-1_msk.nii.gz")
    assert table["age"].tolist() == ["70", "55"] and table["nihss"].tolist() == ["12", "3"]
    out = write_manifest(table, tmp_path / "manifest.csv")
    assert pd.read_csv(out).loc[0, "dwi"] == "rawdata/sub-1/ses-1/sub-1_ses-1_DWI.nii.gz"
    m = read_manifest(out)  # b0 channel served by the T2w column
    assert m.errors == [] and m.rows[0].path("b0").name == "sub-1_ses-1_T2w.nii.gz"


def test_scan_cli_on_a_generated_isles_layout(tmp_path: Path, capsys) -> None:
    """An ISLES'22-style BIDS tree made from phantom subjects (rawdata/sub-*/ses-0001/ with dwi, adc and flair
    and the dwi's JSON sidecar; the lesion mask under derivatives/), needing no shared data: `scan` finds every
    series, derives b0 from DWI and ADC with the sidecar's b-value, reads the stroke side from the mask, and
    writes a manifest that validates."""
    import shutil

    from data_prep.phantom import synthesize_cohort

    phantom = synthesize_cohort(tmp_path / "phantom", num_subjects=3, seed=2, spacing_mm=6.0)
    truth = pd.read_csv(phantom)
    root = tmp_path / "isles"
    for i, row in truth.iterrows():
        sid = f"sub-strokecase{i + 1:04d}"
        raw, der = root / "rawdata" / sid / "ses-0001", root / "derivatives" / sid / "ses-0001"
        raw.mkdir(parents=True)
        der.mkdir(parents=True)
        for series, name in (("dwi", "dwi"), ("adc", "adc"), ("flair", "flair")):
            shutil.copy(phantom.parent / row[series], raw / f"{sid}_ses-0001_{name}.nii.gz")
        (raw / f"{sid}_ses-0001_dwi.json").write_text(json.dumps({"DiffusionBValue": 1000.0, "Modality": "MR"}))
        shutil.copy(phantom.parent / row["lesion_mask"], der / f"{sid}_ses-0001_msk.nii.gz")
    out = tmp_path / "manifest.csv"
    assert cli_main(["scan", str(root), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 3 subject(s), 3 valid for channels dwi,b0,flair" in printed
    assert printed.count("b0 derived as dwi*exp(b*adc) (b=1000)") == 3
    m = read_manifest(out)
    assert m.errors == [] and m.subject_ids == [f"sub-strokecase{i:04d}" for i in (1, 2, 3)]
    # the phantom's sides (seed 2: right, bilateral, left), read back from the masks alone
    assert [r.stroke_side for r in m.rows] == list(truth["stroke_side"]) == ["right", "bilateral", "left"]
    for r, (_, row) in zip(m.rows, truth.iterrows()):
        assert r.b_value == 1000.0 and r.derived == {"b0": "dwi*exp(b*adc)"}
        assert r.series["lesion_mask"].name.endswith("_msk.nii.gz") and "derivatives" in r.series["lesion_mask"].parts
        # b0 from DWI and ADC is the phantom's own b0 where there is signal (int16 rounding aside)
        derived = load_channel(r, "b0").get_fdata()
        b0 = nib.load(str(phantom.parent / row["b0"])).get_fdata()
        tissue = b0 > np.percentile(b0, 80)
        assert np.median(derived[tissue] / b0[tissue]) == pytest.approx(1.0, abs=0.02)


def test_isles_scan_derives_b0_and_left_side(isles: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "isles.csv"
    assert cli_main(["scan", str(isles), "-o", str(out)]) == 0
    assert "b0 derived as dwi*exp(b*adc) (b=800)" in capsys.readouterr().out
    m = read_manifest(out)
    assert m.errors == [] and m.subject_ids == ["sub-strokecase0009"]
    row = m.rows[0]
    assert row.b_value == 800.0 and row.stroke_side == "left"  # the README's left-hemisphere infarct
    dwi = load_channel(row, "dwi").get_fdata()
    s0 = load_channel(row, "b0").get_fdata()
    tissue = dwi > np.percentile(dwi, 80)
    # S0 >= DWI where there is signal; ISLES ADC is in 1e-3 mm^2/s, so S0/DWI ~ exp(0.8 * 0.9) ~ 2 in tissue
    assert np.all(s0[tissue] >= dwi[tissue] * 0.999)
    assert 1.5 < np.median(s0[tissue] / dwi[tissue]) < 3.0
