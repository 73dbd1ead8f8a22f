"""Diffusion helpers: the b-value from a sidecar, ADC units, and b0 derived from DWI and ADC.

Mono-exponential decay S(b) = S0 exp(-b ADC) gives S0 = DWI exp(b ADC) with b in s/mm^2 and ADC in
mm^2/s. Scanners write ADC in mm^2/s (~0.0008 in brain), 1e-3 mm^2/s (~0.8; ISLES'22) or 1e-6 mm^2/s
(~800, DICOM integers); the unit is told apart by the median ADC in tissue, which is 0.6-1.2e-3 mm^2/s
in healthy and infarcted parenchyma alike, so the three ranges never overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.errors import InputError

# sidecar keys that carry the b-value, BIDS first
B_VALUE_KEYS = ("DiffusionBValue", "bvalue", "b_value", "bval", "BValue")
# ADC unit -> factor to mm^2/s, with the tissue-median range that identifies it
ADC_UNITS = {"mm2/s": (1.0, 1e-4, 1e-2), "1e-3 mm2/s": (1e-3, 0.1, 10.0), "1e-6 mm2/s": (1e-6, 100.0, 1e4)}


def sidecar_path(image: Path) -> Path:
    name = image.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return image.with_name(name + ".json")


def b_value_from_sidecar(dwi: Path, *, subject_id: str) -> float | None:
    """The b-value (s/mm^2) from the DWI's JSON sidecar or FSL .bval file; None when neither exists."""
    side = sidecar_path(dwi)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"sidecar is not valid JSON ({exc.msg}, line {exc.lineno})", subject_id=subject_id,
                             file=side, field="dwi", hint="fix or delete the sidecar") from None
        for key in B_VALUE_KEYS:
            if key in meta:
                return _positive_b(meta[key], subject_id=subject_id, file=side, key=key)
    bval = side.with_suffix(".bval")
    if bval.is_file():
        values = [float(v) for v in bval.read_text().split()]
        return _positive_b(max(values) if values else 0.0, subject_id=subject_id, file=bval, key="bval")
    return None


def _positive_b(value, *, subject_id: str, file: Path, key: str) -> float:
    try:
        b = float(value[0] if isinstance(value, list) else value)
    except (TypeError, ValueError, IndexError):
        b = float("nan")
    if not 50.0 <= b <= 5000.0:
        raise InputError(f"b-value {key}={value!r} is not a diffusion weighting in 50-5000 s/mm^2",
                         subject_id=subject_id, file=file, field="dwi",
                         hint="give the DWI's b-value (e.g. 1000) in the sidecar or a b_value column")
    return b


def adc_scale(adc: np.ndarray, tissue: np.ndarray, *, subject_id: str, file: str | Path) -> float:
    """Factor that converts this ADC map to mm^2/s, judged by its median over `tissue` voxels."""
    values = adc[tissue & (adc > 0)]
    median = float(np.median(values)) if values.size else 0.0
    for _unit, (factor, low, high) in ADC_UNITS.items():
        if low <= median < high:
            return factor
    raise InputError(f"ADC median {median:.4g} in tissue fits none of mm^2/s, 1e-3 mm^2/s, 1e-6 mm^2/s",
                     subject_id=subject_id, file=file, field="adc",
                     hint="check that this is an ADC map (not a trace DWI or exponential ADC)")


def derive_b0(dwi: nib.Nifti1Image, adc: nib.Nifti1Image, *, b_value: float, subject_id: str,
              adc_file: str | Path = "adc") -> nib.Nifti1Image:
    """S0 = DWI exp(b ADC) on the DWI grid (ADC must share it); float32, clipped at 4x the DWI's max."""
    if dwi.shape[:3] != adc.shape[:3] or not np.allclose(dwi.affine, adc.affine, atol=1e-3):
        raise InputError("ADC is not on the DWI grid, so b0 cannot be derived voxel by voxel",
                         subject_id=subject_id, file=adc_file, field="adc",
                         hint="give a b0/T2 series or an ADC map on the DWI grid")
    s = np.asarray(dwi.get_fdata(dtype=np.float32))
    a = np.asarray(adc.get_fdata(dtype=np.float32))
    tissue = s > 0.2 * np.percentile(s[s > 0], 99)
    a_mm2 = np.clip(a * adc_scale(a, tissue, subject_id=subject_id, file=adc_file), 0.0, 4e-3)
    # ADC is noisy (and 0) in air; clipping stops exp() from turning background noise into bright voxels
    s0 = np.clip(s, 0, None) * np.exp(b_value * a_mm2)
    s0 = np.minimum(s0, 4.0 * float(s.max())).astype(np.float32)
    return nib.Nifti1Image(s0, dwi.affine)
