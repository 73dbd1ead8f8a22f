"""The phantom cohort: realistic stroke MRI with a known ground truth, on the real MNI152 anatomy.

`synthesize_cohort(OUT, num_subjects=N, seed=S)` writes OUT/<subject_id>/{dwi,b0,adc,flair,lesion}.nii.gz
(+ brain_mask.nii.gz on request; dwi.json holds the b-value), OUT/manifest.csv (the cohort manifest),
OUT/truth.csv (latent values, poses, warp size, labels) and OUT/oracle.json (Bayes AUC per task).
The physics is documented in phantom_clinical (signal over time), phantom_anatomy (tissue, lesions) and
phantom_render (pose, warp, bias, noise). Every subject draws from its own seeded streams, so a cohort is
reproducible per seed and subject i is the same whatever N is.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from data_prep.errors import InputError
from data_prep.phantom_anatomy import (
    Anatomy,
    blob_lesion,
    lesion_files,
    load_anatomy,
    mirror,
    real_lesion,
    side_of,
)
from data_prep.phantom_clinical import SITES, draw_latent, draw_side, finish_latent, oracle_aucs
from data_prep.phantom_render import make_geometry, render

log = logging.getLogger(__name__)
SERIES_FILES = ("dwi", "b0", "flair", "adc", "lesion")
_STREAM = {"clinical": 1, "lesion": 2, "geometry": 3, "noise": 4}


def _stream(seed: int, index: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, _STREAM[name]])


def _participants(lesions_dir: Path | None) -> dict[str, tuple[float | None, float | None]]:
    """SOOP's participants table (age, NIHSS per lesion), looked for beside or above the lesion folder."""
    if lesions_dir is None:
        return {}
    for folder in (lesions_dir, lesions_dir.parent):
        for path in sorted(folder.glob("participants*.tsv")):
            df = pd.read_csv(path, sep="\t")
            if {"participant_id", "age", "nihss"} <= set(df.columns):
                return {str(r.participant_id): (None if pd.isna(r.age) else float(r.age),
                                                None if pd.isna(r.nihss) else float(r.nihss))
                        for r in df.itertuples()}
    return {}


def _lesion(anat: Anatomy, rng: np.random.Generator, side: str, files: list[Path] | None) -> tuple[np.ndarray, str]:
    """The MNI-space lesion for a declared side, and where it came from."""
    if side == "none":
        return np.zeros(anat.shape, bool), ""
    parts, sources = [], []
    for s in (("left", "right") if side == "bilateral" else (side,)):
        mask, source = None, ""
        for _ in range(20 if files else 0):  # real masks: skip empty, tiny and bilateral ones
            path = files[int(rng.integers(len(files)))]
            cand = real_lesion(anat, path)
            cand_side = side_of(anat, cand)
            if cand_side in ("left", "right") and cand.sum() * anat.voxel_mm ** 3 >= 200:
                mask, source = (cand if cand_side == s else mirror(cand)), path.name
                break
        if mask is None:
            mask, source = blob_lesion(anat, rng, side=s), "blob"
        parts.append(mask)
        sources.append(source)
    return np.logical_or.reduce(parts), "+".join(sources)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    dtype = np.uint8 if array.dtype == np.uint8 else np.int16
    data = array if dtype == np.uint8 else np.clip(np.round(array), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _matrix_columns(prefix: str, m: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_{i}{j}": float(m[i, j]) for i in range(4) for j in range(4)}


def pose_from_truth(row: pd.Series | dict, prefix: str = "pose") -> np.ndarray:
    """The 4x4 world->world matrix (MNI mm -> scanner mm) stored flattened in truth.csv."""
    return np.array([[float(row[f"{prefix}_{i}{j}"]) for j in range(4)] for i in range(4)])


def synthesize_subject(anat: Anatomy, out_dir: Path, *, seed: int, index: int, subject_id: str,
                       files: list[Path] | None, participants: dict, spacing_mm: float,
                       brain_masks: bool) -> tuple[dict, dict]:
    """Draw, render and write one subject; return its manifest row and truth row."""
    rng_c = _stream(seed, index, "clinical")
    side = draw_side(rng_c)
    lat = draw_latent(rng_c, side=side)
    lesion, source = _lesion(anat, _stream(seed, index, "lesion"), side, files)
    age = nihss = None
    m = re.match(r"bwsr(sub-\d+)_lesion", source)
    if m and m.group(1) in participants:
        age, nihss = participants[m.group(1)]
    lat = finish_latent(lat, rng_c, lesion_ml=float(lesion.sum()) * anat.voxel_mm ** 3 / 1000,
                        age=age, nihss=nihss)
    site = next(s for s in SITES if s.name == lat.site)
    geo = make_geometry(_stream(seed, index, "geometry"), site=site, spacing_mm=spacing_mm)
    arrays = render(anat, geo, lesion, lat, site, _stream(seed, index, "noise"), brain_mask=brain_masks)
    folder = out_dir / subject_id
    folder.mkdir(parents=True, exist_ok=True)
    rel = {}
    for name, array in arrays.items():
        _save(array, geo.flair_affine if name == "flair" else geo.affine, folder / f"{name}.nii.gz")
        rel[name] = f"{subject_id}/{name}.nii.gz"
    (folder / "dwi.json").write_text(json.dumps({"DiffusionBValue": 1000.0, "Modality": "MR",
                                                 "Phantom": True}, indent=1))
    readers = lat.readers or (None, None, None)
    manifest = {
        "subject_id": subject_id, "dwi": rel["dwi"], "b0": rel["b0"], "flair": rel["flair"], "adc": rel["adc"],
        "lesion_mask": rel["lesion"], "brain_mask": rel.get("brain_mask", ""),
        "onset_to_mri_min": round(lat.onset_min) if lat.onset_known else None,
        "stroke_side": side, "site": lat.site, "mrs_90d": lat.mrs_90d, "nihss": lat.nihss,
        "age": round(lat.age), "sex": lat.sex,
        **{f"reader_{k + 1}": r for k, r in enumerate(readers)},
    }
    truth = {
        "subject_id": subject_id, "site": lat.site, "stroke_side": side, "lesion_present": int(side != "none"),
        "lesion_ml": round(lat.lesion_ml, 3), "lesion_source": source, "onset_min": round(lat.onset_min, 2),
        "onset_known": int(lat.onset_known), "tss_lt_3h": int(lat.onset_min < 180),
        "tss_lt_4h5": int(lat.onset_min < 270), "flair_amplitude": lat.flair_amplitude, "tau_min": lat.tau_min,
        "flair_rel": lat.flair_rel, "t2_rel": lat.t2_rel, "adc_ratio": lat.adc_ratio, "mrs_score": lat.mrs_score,
        "mrs_gt_2": int(lat.mrs_90d > 2), "scale": site.scale, "noise_sigma": site.noise * site.scale,
        "voxel_mm": " ".join(f"{v:g}" for v in np.abs(np.diag(geo.affine)[:3])), "warp_rms_mm": geo.warp_rms_mm,
        **_matrix_columns("pose", geo.pose), **_matrix_columns("flair_pose", geo.flair_pose),
    }
    return manifest, truth


def synthesize_cohort(out_dir: str | Path, *, num_subjects: int, seed: int, lesions_dir: Path | None = None,
                      spacing_mm: float = 2.0, brain_masks: bool = False) -> Path:
    """Write a phantom cohort into `out_dir`; return the path of its manifest.csv."""
    if num_subjects < 1:
        raise InputError(f"synth: num_subjects must be >= 1, got {num_subjects}")
    if not 0.8 <= spacing_mm <= 8.0:
        raise InputError(f"synth: spacing_mm must be within 0.8-8 mm, got {spacing_mm}")
    out_dir = Path(out_dir)
    files = lesion_files(Path(lesions_dir)) if lesions_dir is not None else None
    participants = _participants(Path(lesions_dir)) if lesions_dir is not None else {}
    anat = load_anatomy(1 if spacing_mm < 1.5 else 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(num_subjects)))
    rows, truths = [], []
    for i in range(num_subjects):
        sid = f"sub-{i + 1:0{width}d}"
        if (out_dir / sid).exists():
            shutil.rmtree(out_dir / sid)
        row, truth = synthesize_subject(anat, out_dir, seed=seed, index=i, subject_id=sid, files=files,
                                        participants=participants, spacing_mm=spacing_mm,
                                        brain_masks=brain_masks)
        rows.append(row)
        truths.append(truth)
        log.info("synth: %s (%d/%d) %s", sid, i + 1, num_subjects, truth["stroke_side"])
    manifest = pd.DataFrame(rows)
    if not brain_masks:
        manifest = manifest.drop(columns="brain_mask")
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    pd.DataFrame(truths).to_csv(out_dir / "truth.csv", index=False)
    (out_dir / "oracle.json").write_text(json.dumps(oracle_aucs(), indent=1) + "\n")
    return out_dir / "manifest.csv"
