"""Render one phantom subject: pose, warp, lesion signal, bias field and Rician noise on a scanner grid.

Geometry, with P the 4x4 world->world pose (MNI mm -> this subject's scanner mm; rotation <= 10 deg about
a random axis, shifts <= 10 mm, scale +-5% per axis): a scanner point p shows the MNI anatomy at
q = P^-1 (p + u(p)). The warp u is smooth (cosine basis up to order 3 per axis), its best affine fit over
the head removed, so P stays the exact affine answer a registration should find, and scaled to 3-4 mm
RMS over the head. FLAIR is acquired a little later: the head has moved by a small rigid motion M
(<= 3 deg, <= 3 mm), so its pose is M P, on its own grid: the DWI grid's in-plane voxels and the 4-6 mm
slices of a clinical FLAIR protocol (4 mm times the site's slice factor), whatever the cohort's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from data_prep.phantom_anatomy import B_VALUE, Anatomy
from data_prep.phantom_clinical import Latent, Site

FOV_MM = np.array([200.0, 240.0, 200.0])
HEAD_CENTRE_MNI = np.array([0.0, -17.0, 5.0])
HEAD_RADII_MM = np.array([75.0, 95.0, 80.0])  # ellipsoid over which warp RMS is measured
DCT_ORDER = 3
FLAIR_SLICE_MM = 4.0  # times the site's slice factor (1-1.5): 4-6 mm, as clinical FLAIR protocols acquire


@dataclass
class Geometry:
    pose: np.ndarray  # 4x4 MNI world -> scanner world (DWI/b0/ADC/lesion grid)
    flair_pose: np.ndarray  # 4x4 MNI world -> scanner world for FLAIR
    warp_coef: np.ndarray  # (3, K+1, K+1, K+1) cosine coefficients, mm
    warp_linear: np.ndarray  # (3, 4): affine part removed from the cosine field
    warp_rms_mm: float
    bias_coef: dict[str, np.ndarray]  # "dwi" (shared with b0) and "flair": (2, 2, 2) log-field coefficients
    affine: np.ndarray  # voxel -> scanner world of the DWI grid
    shape: tuple[int, int, int]
    flair_affine: np.ndarray
    flair_shape: tuple[int, int, int]


def _affine(rng: np.random.Generator, *, max_deg: float, max_shift: float, scale: float) -> np.ndarray:
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(0, max_deg))
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix() @ np.diag(
        rng.uniform(1 - scale, 1 + scale, 3))
    out[:3, 3] = rng.uniform(-max_shift, max_shift, 3)
    return out


def _grid(centre: np.ndarray, voxel: np.ndarray, flip_x: bool) -> tuple[np.ndarray, tuple[int, int, int]]:
    shape = tuple(int(n) for n in np.round(FOV_MM / voxel))
    aff = np.diag([*voxel, 1.0])
    if flip_x:  # LAS storage: the x index runs from the patient's right to left
        aff[0, 0] = -voxel[0]
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return aff, shape


def _basis(x: np.ndarray, n: int, order: int) -> np.ndarray:
    """Cosine basis (len(x), order+1) on continuous index x of an axis of n voxels."""
    k = np.arange(order + 1)
    return np.cos(np.pi * np.outer(x + 0.5, k) / n).astype(np.float32)


def _separable(coef: np.ndarray, bases: list[np.ndarray]) -> np.ndarray:
    """sum_abc coef[a,b,c] Bx[i,a] By[j,b] Bz[k,c] without forming the outer products."""
    out = np.tensordot(bases[0], coef, axes=(1, 0))  # i, b, c
    out = np.tensordot(out, bases[1], axes=(1, 1))  # i, c, j
    out = np.tensordot(out, bases[2], axes=(1, 1))  # i, j, k
    return out


def make_geometry(rng: np.random.Generator, *, site: Site, spacing_mm: float) -> Geometry:
    pose = _affine(rng, max_deg=10.0, max_shift=10.0, scale=0.05)
    motion = _affine(rng, max_deg=3.0, max_shift=3.0, scale=0.0)
    voxel = spacing_mm * np.array(site.voxel)
    centre = (pose @ [*HEAD_CENTRE_MNI, 1.0])[:3] + rng.uniform(-5, 5, 3)
    affine, shape = _grid(centre, voxel, site.flip_x)
    flair_voxel = np.array([*voxel[:2], FLAIR_SLICE_MM * site.voxel[2]])
    flair_affine, flair_shape = _grid(centre, flair_voxel, site.flip_x)
    k = np.arange(DCT_ORDER + 1)
    damp = 1.0 / (1.0 + k[:, None, None] + k[None, :, None] + k[None, None, :])
    coef = (rng.standard_normal((3, *damp.shape)) * damp).astype(np.float32)
    coef[:, 0, 0, 0] = 0.0
    geo = Geometry(pose=pose, flair_pose=motion @ pose, warp_coef=coef, warp_linear=np.zeros((3, 4)),
                   warp_rms_mm=0.0, bias_coef={s: rng.normal(0, 0.12, (2, 2, 2)) for s in ("dwi", "flair")},
                   affine=affine, shape=shape, flair_affine=flair_affine, flair_shape=flair_shape)
    # fit and remove the affine part over the head (every 3rd voxel is plenty), then scale to the target RMS
    idx = [np.arange(0, n, 3, dtype=np.float32) for n in shape]
    u = warp_field(geo, idx, linear=False)
    pts = np.stack(np.meshgrid(*idx, indexing="ij"), -1).reshape(-1, 3)
    world = pts @ affine[:3, :3].T + affine[:3, 3]
    mni = (world - pose[:3, 3]) @ np.linalg.inv(pose[:3, :3]).T
    head = (((mni - HEAD_CENTRE_MNI) / HEAD_RADII_MM) ** 2).sum(1) < 1
    design = np.c_[world[head], np.ones(head.sum())]
    flat = u.reshape(3, -1)[:, head]
    lin = np.linalg.lstsq(design, flat.T, rcond=None)[0].T  # (3, 4)
    rms = float(np.sqrt(((flat - lin @ design.T) ** 2).sum(0).mean()))
    target = rng.uniform(3.0, 4.0)
    geo.warp_coef *= target / rms
    geo.warp_linear = lin * (target / rms)
    geo.warp_rms_mm = float(target)
    return geo


def warp_field(geo: Geometry, idx: list[np.ndarray], *, linear: bool = True,
               affine: np.ndarray | None = None) -> np.ndarray:
    """u (3, nx, ny, nz) in mm at the voxels of a grid axis-aligned with the DWI grid (given by `affine`)."""
    affine = geo.affine if affine is None else affine
    # continuous DWI-grid index of each axis position (grids share orientation and centre)
    scale = np.diag(affine)[:3] / np.diag(geo.affine)[:3]
    offset = (affine[:3, 3] - geo.affine[:3, 3]) / np.diag(geo.affine)[:3]
    bases = [_basis(idx[d] * scale[d] + offset[d], geo.shape[d], DCT_ORDER) for d in range(3)]
    u = np.stack([_separable(geo.warp_coef[c], bases) for c in range(3)])
    if linear:
        world = [affine[d, d] * idx[d] + affine[d, 3] for d in range(3)]
        for c in range(3):
            lin = geo.warp_linear[c]
            u[c] -= (lin[0] * world[0][:, None, None] + lin[1] * world[1][None, :, None]
                     + lin[2] * world[2][None, None, :] + lin[3])
    return u


def bias_field(coef: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    bases = [_basis(np.arange(n, dtype=np.float32), n, 1) for n in shape]
    return np.exp(_separable(coef.astype(np.float32), bases))


def _coords(geo: Geometry, anat: Anatomy, *, affine: np.ndarray, shape, pose: np.ndarray) -> np.ndarray:
    """MNI voxel coordinates (3, N) sampled by each voxel of a scanner grid."""
    idx = [np.arange(n, dtype=np.float32) for n in shape]
    u = warp_field(geo, idx, affine=affine)
    to_mni = np.linalg.inv(anat.affine) @ np.linalg.inv(pose)
    lin = to_mni @ affine
    rot = to_mni[:3, :3]
    out = np.empty((3, *shape), np.float32)
    for d in range(3):
        out[d] = (lin[d, 0] * idx[0][:, None, None] + lin[d, 1] * idx[1][None, :, None]
                  + lin[d, 2] * idx[2][None, None, :] + lin[d, 3])
        out[d] += rot[d, 0] * u[0] + rot[d, 1] * u[1] + rot[d, 2] * u[2]
    return out.reshape(3, -1)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    real = signal + rng.normal(0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def render(anat: Anatomy, geo: Geometry, lesion: np.ndarray, lat: Latent, site: Site,
           rng: np.random.Generator, *, brain_mask: bool) -> dict[str, np.ndarray]:
    """Series arrays on the scanner grids: dwi, b0, adc (1e-6 mm^2/s), flair, lesion, [brain_mask]."""
    maps = dict(anat.maps)
    if lesion.any():
        # a soft edge (partial volume), kept inside parenchyma
        soft = ndimage.gaussian_filter(lesion.astype(np.float32), 0.5) * (maps["parenchyma"] > 0.3)
        lesion_b0 = maps["b0"] * (1 + lat.t2_rel)
        lesion_dwi = lesion_b0 * np.exp(-B_VALUE * 1e-3 * maps["adc"] * lat.adc_ratio)
        maps["b0"] = maps["b0"] * (1 + lat.t2_rel * soft)
        maps["dwi"] = maps["dwi"] * (1 - soft) + lesion_dwi * soft
        maps["flair"] = maps["flair"] * (1 + lat.flair_rel * soft)
        maps["lesion"] = soft
    sigma = site.noise * site.scale
    out: dict[str, np.ndarray] = {}
    c = _coords(geo, anat, affine=geo.affine, shape=geo.shape, pose=geo.pose)
    bias = bias_field(geo.bias_coef["dwi"], geo.shape) * site.scale

    def sample(name: str, grid_coords: np.ndarray, shape) -> np.ndarray:
        return ndimage.map_coordinates(maps[name], grid_coords, order=1, mode="constant",
                                       cval=0.0, prefilter=False).reshape(shape)

    b0 = _rician(sample("b0", c, geo.shape) * bias, sigma, rng)
    dwi = _rician(sample("dwi", c, geo.shape) * bias, sigma, rng)
    # the scanner's ADC: log ratio of the noisy signals, zero where b0 is only noise
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(b0 / np.maximum(dwi, 1e-3)) / B_VALUE * 1e6
    adc = np.where(b0 > 5 * sigma, np.clip(adc, 0, 4000), 0)
    out["dwi"], out["b0"], out["adc"] = dwi, b0, adc
    out["lesion"] = np.zeros(geo.shape, np.uint8)
    if "lesion" in maps:
        soft_scan = sample("lesion", c, geo.shape)
        # a lacune smaller than a coarse voxel still marks its voxel(s), so a stroke never loses its mask
        out["lesion"] = (soft_scan >= min(0.5, 0.5 * float(soft_scan.max()))).astype(np.uint8)
    if brain_mask:
        maps["brain"] = anat.brain.astype(np.float32)
        out["brain_mask"] = (sample("brain", c, geo.shape) >= 0.5).astype(np.uint8)
    cf = _coords(geo, anat, affine=geo.flair_affine, shape=geo.flair_shape, pose=geo.flair_pose)
    flair_bias = bias_field(geo.bias_coef["flair"], geo.flair_shape) * site.scale
    out["flair"] = _rician(sample("flair", cf, geo.flair_shape) * flair_bias, sigma, rng)
    return out
