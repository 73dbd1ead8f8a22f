"""One subject through the chain: manifest row -> volumes, masks, derived columns and QC on the common grid.

Order follows the paper: N4, skull strip, anchor (b0/T2) -> MNI template, other series -> anchor (FLAIR by
its own registration), resample, z-score in the brain, histogram matching to the reference subject.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from data_prep import preprocess as pp
from data_prep import register as rg
from data_prep.config import PrepConfig
from data_prep.diffusion import b_value_from_sidecar, derive_b0
from data_prep.errors import InputError
from data_prep.nifti import load_nifti
from data_prep.store import half, lesioned

FOV_RATIO_MAX = 2.5  # series of one subject whose head extents differ more than this are not one scan session


@dataclass
class SubjectResult:
    volume: np.ndarray  # (C, Z, Y, X) float32
    brain: np.ndarray  # (Z, Y, X) uint8
    lesion: np.ndarray | None
    derived: dict = field(default_factory=dict)
    qc: dict = field(default_factory=dict)
    landmarks: dict[str, list[float]] = field(default_factory=dict)


def _path(row: Mapping, key: str) -> Path | None:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return Path(value)


def load_series(row: Mapping, name: str, *, sid: str) -> sitk.Image:
    """A channel's image; b0 is derived from DWI and ADC when the manifest has none."""
    path = _path(row, name)
    if path is not None:
        return pp.load_ras(path, subject_id=sid, field=name)
    dwi, adc = _path(row, "dwi"), _path(row, "adc")
    if name == "b0" and dwi is not None and adc is not None:
        b = b_value_from_sidecar(dwi, subject_id=sid)
        if b is None:
            raise InputError("no b-value to derive b0 from DWI and ADC", subject_id=sid, file=dwi, field="b0",
                             hint="add DiffusionBValue to the DWI's JSON sidecar or give a b0 series")
        dwi_img = nib.as_closest_canonical(load_nifti(dwi, subject_id=sid, field="dwi"))
        adc_img = nib.as_closest_canonical(load_nifti(adc, subject_id=sid, field="adc"))
        s0 = derive_b0(dwi_img, adc_img, b_value=b, subject_id=sid, adc_file=adc)
        return rg.from_ras(np.asarray(s0.dataobj, np.float32), s0.affine)
    raise InputError("series missing", subject_id=sid, field=name,
                     hint=f"give a {name} path in the manifest or drop {name} from prep channels")


def _extent_mm(image: sitk.Image) -> float:
    return float(np.prod(np.array(image.GetSize()) * np.array(image.GetSpacing())) ** (1 / 3))


def check_fields_of_view(images: dict[str, sitk.Image], row: Mapping, *, sid: str) -> None:
    sizes = {name: _extent_mm(img) for name, img in images.items()}
    small, large = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    if sizes[large] > FOV_RATIO_MAX * sizes[small]:
        raise InputError(f"field of view {sizes[large]:.0f} mm vs {sizes[small]:.0f} mm of {small}: not one "
                         "session's series", subject_id=sid, file=_path(row, large), field=large,
                         hint="check the path points at this subject's series")


def brain_mask(anchor: sitk.Image, row: Mapping, *, config: PrepConfig, sid: str) -> sitk.Image | None:
    """Mask in the anchor's space; None means 'use the template's mask on the grid'."""
    mode = config.skull_strip
    given = _path(row, "brain_mask")
    if mode == "auto":
        mode = "given" if given is not None else "bet" if pp.bet_available() else "otsu"
    if mode == "given":
        if given is None:
            raise InputError("skull_strip=given but no brain mask", subject_id=sid, field="brain_mask",
                             hint="add a brain_mask path or set skull_strip to auto")
        mask = pp.load_ras(given, subject_id=sid, field="brain_mask")
        return sitk.Resample(sitk.Cast(mask > 0.5, sitk.sitkUInt8), anchor, sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0)
    if mode == "bet":
        return pp.brain_mask_bet(anchor)
    if mode == "otsu":
        return pp.brain_mask_otsu(anchor)
    return None  # template / none


def preprocess_subject(row: Mapping, *, config: PrepConfig, reference: Mapping | None = None) -> SubjectResult:
    """Run the chain on one manifest row (paths absolute); `reference` = store's reference histogram."""
    rg.single_thread()
    sid = str(row["subject_id"])
    images = {name: load_series(row, name, sid=sid) for name in config.channels}
    check_fields_of_view(images, row, sid=sid)
    if config.n4:
        for name in images:
            if name not in ("adc", "ct") and name not in config.ct_window:
                images[name] = pp.n4(images[name], spacing_mm=config.n4_spacing_mm, iterations=config.n4_iterations)
    anchor = images[config.anchor]
    brain_native = brain_mask(anchor, row, config=config, sid=sid)
    reg = rg.to_template(anchor, brain_native, kind=config.registration, seed=config.registration_seed,
                         sampling=config.sampling_fraction, finest_mm=config.spacing_mm)
    transforms = {config.anchor: reg.transform}
    for name, image in images.items():
        if name == config.anchor:
            continue
        header = config.coregistration == "header" or (
            config.coregistration == "auto" and name != "flair" and rg.same_grid(image, anchor))
        if header:
            transforms[name] = reg.transform
        else:
            co = rg.coregister(anchor, image, brain_native, seed=config.registration_seed,
                               sampling=config.sampling_fraction, finest_mm=config.spacing_mm)
            transforms[name] = rg.compose(reg.transform, co.transform)
    grid = pp.grid_image(config)
    if brain_native is None:
        brain = pp.resample(rg.template()[1], sitk.Transform(), grid, nearest=True)
    else:
        brain = pp.resample(brain_native, reg.transform, grid, nearest=True)
    if not brain.any():
        raise InputError("brain mask is empty on the common grid (registration failed?)", subject_id=sid,
                         file=_path(row, config.anchor), field=config.anchor,
                         hint="look at the QC montage; try skull_strip=template or check the series")
    lesion_path = _path(row, "lesion_mask")
    lesion = None
    if lesion_path is not None:
        lesion_img = sitk.Cast(pp.load_ras(lesion_path, subject_id=sid, field="lesion_mask") > 0.5, sitk.sitkUInt8)
        lesion = pp.resample(lesion_img, transforms.get("dwi", reg.transform), grid, nearest=True)
    channels, qc, marks = [], {"registration_mi": reg.metric}, {}
    region = statistics_region(brain, lesion, config=config)
    for name in config.channels:
        vol = pp.resample(images[name], transforms[name], grid).astype(np.float32)
        inside = vol[brain > 0]
        qc.update({f"{name}_mean": float(inside.mean()), f"{name}_std": float(inside.std()),
                   f"{name}_p1": float(np.percentile(inside, 1)), f"{name}_p99": float(np.percentile(inside, 99))})
        vol, marks[name] = normalize_channel(vol, brain, region, name=name, config=config, reference=reference)
        channels.append(vol)
    marks = {name: m for name, m in marks.items() if m is not None}
    derived = derived_columns(brain, lesion, config=config)
    qc["brain_volume_ml"] = derived["brain_volume_ml"]
    return SubjectResult(volume=np.stack(channels).astype(np.float32), brain=brain.astype(np.uint8),
                         lesion=None if lesion is None else lesion.astype(np.uint8), derived=derived, qc=qc,
                         landmarks=marks)


def statistics_region(brain: np.ndarray, lesion: np.ndarray | None, *, config: PrepConfig) -> np.ndarray:
    """Voxels the intensity statistics come from. Only the legacy `normal_tissue` mode looks at the lesion
    mask; every other mode takes the brain, so a subject normalises the same with or without its mask."""
    if config.normalize_on == "normal_tissue":
        return pp.normal_tissue(brain, lesion)
    return brain


def normalize_channel(vol: np.ndarray, brain: np.ndarray, region: np.ndarray, *, name: str, config: PrepConfig,
                      reference: Mapping | None) -> tuple[np.ndarray, list[float] | None]:
    """One resampled channel -> its stored intensities, and its histogram landmarks (None when not z-scored).

    The one normalisation path of `prep`, and so of `predict`, which preps new subjects with the store's config
    and reference histogram."""
    if name in config.ct_window:
        center, width = config.ct_window[name]
        return pp.ct_window(vol, center=center, width=width), None
    if not config.zscore:
        return vol, None
    if config.normalize_on == "robust":
        vol = pp.robust_zscore(vol, brain)
    else:
        vol = pp.zscore(vol, brain, region)
    marks = pp.landmarks(vol, region, num=config.histogram_landmarks, percentiles=config.histogram_percentiles)
    if config.histogram_match and reference is not None:
        vol = pp.match_histogram(vol, brain, np.asarray(reference["channels"][name]),
                                 percentiles=config.histogram_percentiles, tissue=region)
    return vol, marks.tolist()


def derived_columns(brain: np.ndarray, lesion: np.ndarray | None, *, config: PrepConfig) -> dict:
    """Table columns computed on the grid: volumes in mL and per-hemisphere lesion flags (left = low x)."""
    ml = config.spacing_mm**3 / 1000.0
    out = {"brain_volume_ml": round(float(brain.sum()) * ml, 3), "has_lesion_mask": lesion is not None}
    if lesion is None:
        out.update(lesion_volume_ml=float("nan"), lesion_left_ml=float("nan"), lesion_right_ml=float("nan"),
                   lesion_left=None, lesion_right=None)
        return out
    voxels = {side: float(half(lesion, side, mirrored=False).sum()) for side in ("left", "right")}
    left, right = voxels["left"] * ml, voxels["right"] * ml
    out.update(lesion_volume_ml=round(left + right, 3), lesion_left_ml=round(left, 3),
               lesion_right_ml=round(right, 3), lesion_left=lesioned(voxels["left"], config.spacing_mm),
               lesion_right=lesioned(voxels["right"], config.spacing_mm))
    return out
