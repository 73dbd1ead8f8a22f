"""Preprocessing steps, one function each (the chain and its switches live in pipeline.py).

Load + reorient to RAS, N4 bias correction, brain mask (given, BET, or Otsu + morphology), resampling onto
the common grid, z-scoring in the brain, histogram matching to a reference, CT windowing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from data_prep.config import PrepConfig
from data_prep.nifti import load_nifti
from data_prep.register import from_ras
from data_prep.store import grid_affine


def load_ras(path: str | Path, *, subject_id: str, field: str) -> sitk.Image:
    """Checked NIfTI -> canonical RAS orientation -> float32 SimpleITK image."""
    img = nib.as_closest_canonical(load_nifti(path, subject_id=subject_id, field=field))
    return from_ras(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def head_mask(image: sitk.Image) -> sitk.Image:
    """Everything brighter than air (Otsu), holes filled: N4's fitting region."""
    smooth = sitk.SmoothingRecursiveGaussian(image, float(max(image.GetSpacing())))
    fg = sitk.OtsuThreshold(smooth, 0, 1)
    return sitk.BinaryFillhole(fg)


def n4(image: sitk.Image, *, spacing_mm: float, iterations: tuple[int, ...]) -> sitk.Image:
    """N4 fitted on the shrunk image (speed), the bias field then removed at full resolution."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = head_mask(image)
    shrink = [max(1, round(spacing_mm / s)) for s in image.GetSpacing()]
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(mask, shrink)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    # N4 works on log intensities; shift so the background's zeros do not dominate the fit
    corrector.Execute(small + 1.0, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_field), sitk.sitkFloat32)


def brain_mask_otsu(image: sitk.Image, *, erode_mm: float = 5.0) -> sitk.Image:
    """Brain of a skull-on b0/T2: Otsu foreground, eroded through the dark skull so the scalp detaches,
    the largest component kept, grown back inside the foreground, holes filled."""
    arr = sitk.GetArrayFromImage(image)
    spacing = np.array(image.GetSpacing()[::-1])
    smooth = ndimage.gaussian_filter(arr, sigma=1.0 / spacing * spacing.min())
    fg = smooth > _otsu(smooth[smooth > 0])
    radius = np.maximum(np.round(erode_mm / spacing).astype(int), 1)
    ball = _ellipsoid(radius)
    core = ndimage.binary_erosion(fg, ball)
    labels, num = ndimage.label(core)
    if num == 0:
        raise ValueError("brain mask: nothing left after erosion (image too small or too dark)")
    sizes = ndimage.sum(core, labels, range(1, num + 1))
    brain = labels == (int(np.argmax(sizes)) + 1)
    brain = ndimage.binary_dilation(brain, ball) & fg
    brain = ndimage.binary_closing(brain, ball, iterations=1)
    brain = np.stack([ndimage.binary_fill_holes(s) for s in ndimage.binary_fill_holes(brain)])
    out = sitk.GetImageFromArray(brain.astype(np.uint8))
    out.CopyInformation(image)
    return out


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    return float(centers[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def _ellipsoid(radius: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius)) <= 1.0


def brain_mask_bet(image: sitk.Image) -> sitk.Image:
    """FSL BET (when `bet` is on PATH), on a temporary copy."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.nii.gz", Path(tmp) / "brain.nii.gz"
        sitk.WriteImage(image, str(src))
        subprocess.run(["bet", str(src), str(out), "-m", "-R"], check=True, capture_output=True)
        mask = sitk.ReadImage(str(Path(tmp) / "brain_mask.nii.gz"), sitk.sitkUInt8)
    mask.CopyInformation(image)
    return mask


def bet_available() -> bool:
    return shutil.which("bet") is not None


def grid_image(config: PrepConfig) -> sitk.Image:
    """Empty SimpleITK image on the common grid (RAS axes, LPS physical space)."""
    return from_ras(np.zeros(config.shape, np.float32), grid_affine(config))


def resample(image: sitk.Image, transform: sitk.Transform, grid: sitk.Image, *, nearest: bool = False) -> np.ndarray:
    """Onto the grid through `transform` (grid point -> image point); array in store order (z, y, x)."""
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(image, grid, transform, interp, 0.0, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def zscore(volume: np.ndarray, brain: np.ndarray, tissue: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit variance inside the brain (statistics from `tissue`, default the brain); 0 outside."""
    inside = volume[(brain if tissue is None else tissue) > 0]
    std = float(inside.std()) or 1.0
    return np.where(brain > 0, (volume - float(inside.mean())) / std, 0.0).astype(np.float32)


IQR_PER_SD = 1.349  # a normal distribution's interquartile range in SDs: robust z-scores keep the usual scale


def robust_zscore(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(volume - median) / (IQR / 1.349) over the whole brain; 0 outside. Needs no lesion mask: a lesion of a
    few percent of the brain sits in one tail, where it drags the mean and SD along but barely moves the
    median and quartiles, so its contrast survives."""
    low, median, high = np.percentile(volume[brain > 0], (25, 50, 75))
    scale = float(high - low) / IQR_PER_SD or 1.0
    return np.where(brain > 0, (volume - float(median)) / scale, 0.0).astype(np.float32)


def landmarks(volume: np.ndarray, brain: np.ndarray, *, num: int,
              percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """In-brain intensity quantiles at `num` evenly spaced levels between the two percentiles."""
    return np.percentile(volume[brain > 0], np.linspace(*percentiles, num)).astype(np.float64)


def match_histogram(volume: np.ndarray, brain: np.ndarray, reference: np.ndarray, *,
                    percentiles: tuple[float, float] = (1.0, 99.0), tissue: np.ndarray | None = None) -> np.ndarray:
    """Piecewise-linear map of this volume's in-brain quantiles onto the reference's (Nyul-style).

    Outside the landmark range the map goes on linearly with the slope between the two end landmarks rather
    than clamping: the tails hold the lesion (bright on DWI, later on FLAIR), and clamping them onto the
    reference's tail would erase the contrast the classifier needs. `tissue` (default: the brain) is where
    this volume's landmarks come from, e.g. the brain without the lesion.
    """
    own = landmarks(volume, brain if tissue is None else tissue, num=len(reference), percentiles=percentiles)
    ref = np.asarray(reference, dtype=np.float64)
    # strictly increasing x for np.interp even where many voxels share a value
    own = own + np.arange(len(own)) * 1e-9 * max(1.0, float(np.abs(own).max()))
    slope = (ref[-1] - ref[0]) / (own[-1] - own[0])
    mapped = np.interp(volume, own, ref)
    mapped = np.where(volume > own[-1], ref[-1] + (volume - own[-1]) * slope, mapped)
    mapped = np.where(volume < own[0], ref[0] + (volume - own[0]) * slope, mapped)
    return np.where(brain > 0, mapped, 0.0).astype(np.float32)


def normal_tissue(brain: np.ndarray, lesion: np.ndarray | None, *, min_share: float = 0.5) -> np.ndarray:
    """The brain without the lesion dilated by one voxel: where normalisation statistics come from. The
    whole brain where there is no mask, or where less than `min_share` of the brain would be left."""
    from scipy.ndimage import binary_dilation

    if lesion is None or not lesion.any():
        return brain
    tissue = (brain > 0) & ~binary_dilation(lesion > 0)
    return tissue.astype(np.uint8) if tissue.sum() >= min_share * (brain > 0).sum() else brain


def ct_window(volume: np.ndarray, *, center: float, width: float) -> np.ndarray:
    """Clip to centre +- width/2 HU and scale to [0, 1]."""
    low = center - width / 2
    return np.clip((volume - low) / width, 0.0, 1.0).astype(np.float32)
