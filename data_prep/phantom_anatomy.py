"""Phantom anatomy: the MNI152 2009a symmetric template in nilearn's wheel, a head shell, and lesions.

Tissue: GM and WM probability maps from nilearn; CSF = brain mask - GM - WM. Outside the brain a shell
is added by distance from the brain surface: 0-3 mm CSF, 3-8 mm skull (little signal), 8-13 mm scalp
(bright on FLAIR), so skull stripping has work to do. The template is left-right symmetric, so a lesion
mirrored through x = 0 (array axis 0 reversed) lands on matching anatomy in the other hemisphere.

Lesions: real masks (SOOP, normalised to MNI on their own 1 mm LAS grid) resampled by nearest neighbour,
or generated blobs: an ellipsoid roughened by smooth noise, centred in a vascular territory (MCA, ACA,
PCA, lacunar) and kept to GM/WM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep.errors import InputError

# series -> tissue -> relative signal (CSF on b0 = 1). ADC in 1e-3 mm^2/s for the diffusion decay.
SIGNAL = {
    "b0": {"gm": 0.60, "wm": 0.48, "csf": 1.00, "skull": 0.03, "scalp": 0.30},
    "flair": {"gm": 0.62, "wm": 0.45, "csf": 0.06, "skull": 0.03, "scalp": 0.55},
}
ADC = {"gm": 0.85, "wm": 0.72, "csf": 3.0, "skull": 1.0, "scalp": 1.0}
B_VALUE = 1000.0  # s/mm^2
# left-hemisphere territory centres (MNI mm), spread (mm) and radius range (mm); mirrored for the right
TERRITORIES = {
    "mca": ((-40, -10, 15), (8, 18, 14), (8, 24)),
    "aca": ((-8, 20, 45), (3, 14, 10), (6, 14)),
    "pca": ((-18, -76, 5), (6, 8, 8), (6, 16)),
    "lacunar": ((-22, 0, 8), (4, 8, 6), (3, 7)),
}
TERRITORY_P = (0.55, 0.15, 0.15, 0.15)


@dataclass(frozen=True)
class Anatomy:
    """Tissue maps on the MNI template grid (x, y, z index order, RAS affine)."""

    affine: np.ndarray
    tissue: dict[str, np.ndarray]  # gm, wm, csf, skull, scalp: fractions summing to <= 1
    brain: np.ndarray  # bool
    maps: dict[str, np.ndarray]  # noise-free b0, dwi, flair signal and tissue ADC (float32)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.brain.shape

    @property
    def voxel_mm(self) -> float:
        return float(abs(self.affine[0, 0]))

    def series_map(self, series: str) -> np.ndarray:
        """Noise-free relative signal of a series: b0, flair, or dwi (= sum of S0 exp(-b ADC) per tissue)."""
        if series == "dwi":
            return sum(self.tissue[t] * SIGNAL["b0"][t] * np.exp(-B_VALUE * ADC[t] * 1e-3) for t in ADC)
        return sum(self.tissue[t] * SIGNAL[series][t] for t in SIGNAL[series])

    def adc_map(self) -> np.ndarray:
        """Tissue ADC (1e-3 mm^2/s) weighted by the tissues' b0 signal."""
        w = {t: self.tissue[t] * SIGNAL["b0"][t] for t in ADC}
        return sum(w[t] * ADC[t] for t in ADC) / np.maximum(sum(w.values()), 1e-6)


@functools.lru_cache(maxsize=2)
def load_anatomy(resolution_mm: int = 2) -> Anatomy:
    """Build the tissue maps once per process (nilearn reads its packaged files; nothing downloads)."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=resolution_mm)
    gm = gm_img.get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=resolution_mm).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=resolution_mm).get_fdata() > 0.5
    gm, wm = gm * brain, wm * brain
    total = gm + wm
    over = total > 1
    gm[over], wm[over] = gm[over] / total[over], wm[over] / total[over]
    csf = np.clip(brain - gm - wm, 0, 1).astype(np.float32)
    dist = ndimage.distance_transform_edt(~brain) * resolution_mm
    rim = ((dist > 0) & (dist <= 3)).astype(np.float32)
    skull = ((dist > 3) & (dist <= 8)).astype(np.float32)
    scalp = ((dist > 8) & (dist <= 13)).astype(np.float32)
    tissue = {"gm": gm, "wm": wm, "csf": csf + rim, "skull": skull, "scalp": scalp}
    anat = Anatomy(affine=gm_img.affine.copy(), tissue=tissue, brain=brain, maps={})
    for series in ("b0", "dwi", "flair"):
        anat.maps[series] = anat.series_map(series).astype(np.float32)
    anat.maps["adc"] = anat.adc_map().astype(np.float32)
    anat.maps["parenchyma"] = (gm + wm).astype(np.float32)
    return anat


def mirror(mask: np.ndarray) -> np.ndarray:
    """Reflect through x = 0 (valid on the symmetric template: its x range is centred on 0)."""
    return mask[::-1]


def side_of(anat: Anatomy, mask: np.ndarray) -> str:
    """left/right/bilateral/none by the sign of world x (RAS+: x < 0 is the patient's left)."""
    if not mask.any():
        return "none"
    x = anat.affine[0, 0] * np.nonzero(mask)[0] + anat.affine[0, 3]
    left = float(np.mean(x < 0))
    if min(left, 1 - left) >= 0.1:
        return "bilateral"
    return "left" if left > 0.5 else "right"


def lesion_files(lesions_dir: Path) -> list[Path]:
    files = sorted(p for p in Path(lesions_dir).iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not files:
        raise InputError(f"--lesions {lesions_dir}: no .nii/.nii.gz lesion masks there (give a folder of masks)")
    return files


def real_lesion(anat: Anatomy, path: Path) -> np.ndarray:
    """A lesion mask in MNI space resampled by nearest neighbour onto the anatomy grid (bool)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj) > 0
    if not data.any():
        return np.zeros(anat.shape, bool)
    # only the lesion's bounding box of the target grid is sampled
    ijk = np.argwhere(data)
    corners = nib.affines.apply_affine(img.affine, np.array([ijk.min(0) - 1, ijk.max(0) + 1]))
    lo_hi = nib.affines.apply_affine(np.linalg.inv(anat.affine), corners)
    lo = np.clip(np.floor(lo_hi.min(0)).astype(int), 0, np.array(anat.shape) - 1)
    hi = np.clip(np.ceil(lo_hi.max(0)).astype(int) + 1, 1, anat.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    src = nib.affines.apply_affine(np.linalg.inv(img.affine) @ anat.affine, grid.reshape(-1, 3))
    vals = ndimage.map_coordinates(data.astype(np.uint8), src.T, order=0, mode="constant")
    out = np.zeros(anat.shape, bool)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = vals.reshape(grid.shape[:3]) > 0
    return out & anat.brain


def blob_lesion(anat: Anatomy, rng: np.random.Generator, *, side: str) -> np.ndarray:
    """A territory-shaped blob on one side (left/right), kept to GM and WM."""
    name = rng.choice(list(TERRITORIES), p=TERRITORY_P)
    centre, spread, (r_lo, r_hi) = TERRITORIES[name]
    c = np.array(centre, float) + rng.normal(0, 1, 3) * np.array(spread) / 2
    radius = float(np.exp(rng.uniform(np.log(r_lo), np.log(r_hi))))
    axes = radius * rng.uniform(0.6, 1.4, 3)
    vox = anat.voxel_mm
    half = np.ceil(axes.max() * 1.5 / vox).astype(int) + 2
    ci = np.round(nib.affines.apply_affine(np.linalg.inv(anat.affine), c)).astype(int)
    lo = np.clip(ci - half, 0, np.array(anat.shape) - 1)
    hi = np.clip(ci + half + 1, 1, anat.shape)
    idx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    world = [anat.affine[d, d] * idx[d] + anat.affine[d, 3] - c[d] for d in range(3)]
    r2 = sum((w / a) ** 2 for w, a in zip(world, axes))
    rough = ndimage.gaussian_filter(rng.standard_normal(r2.shape), sigma=max(radius / (3 * vox), 1.0))
    rough /= rough.std() + 1e-9
    out = np.zeros(anat.shape, bool)
    # GM/WM only, and strictly on its own side of the midline
    keep = (anat.maps["parenchyma"][lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] > 0.5) & (world[0] + c[0] < -3.0)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = (r2 + 0.35 * rough < 1.0) & keep
    if not out.any():  # a blob that fell into CSF: take the ellipsoid core
        out[tuple(np.clip(ci, 0, np.array(anat.shape) - 1))] = True
    return out if side == "left" else mirror(out)
