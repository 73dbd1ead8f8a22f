"""Registration with SimpleITK: anchor series (b0/T2) -> MNI152 template, other series -> anchor.

Mattes mutual information (the series differ in contrast from the T1 template and from each other), seeded
random sampling and one ITK thread, so a subject registers to the same transform whatever the scheduling.
Every transform maps fixed-space points (template, or anchor) to moving-space points: what resampling onto
the template grid needs, composed without inversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import SimpleITK as sitk

TEMPLATE_MM = 2  # nilearn ships the MNI152 (2009 sym) T1 and brain mask at 1 and 2 mm
# The optimizer stops once its step (scaled to about mm of shift) falls below this: far under a voxel, and on
# 2 mm phantoms it took registration from ~150 s to ~10 s at the same error (about 1.2 mm) as 1e-4 mm.
MIN_STEP_MM = 0.01


@dataclass
class Registration:
    transform: sitk.Transform
    metric: float
    """Final Mattes MI (negative; lower is better), the QC table's similarity."""


def single_thread() -> None:
    """One ITK thread in this process (each Dask worker is one process with one thread)."""
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def from_ras(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """NIfTI-order array (x, y, z) with its RAS affine -> SimpleITK image (LPS physical space)."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])
    image.SetOrigin([float(v) for v in np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]])
    return image


@lru_cache(maxsize=1)
def template() -> tuple[sitk.Image, sitk.Image]:
    """(MNI152 T1, brain mask) from nilearn's wheel: nothing downloads."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=TEMPLATE_MM)
    mask = datasets.load_mni152_brain_mask(resolution=TEMPLATE_MM)
    t1_img = from_ras(np.asarray(t1.dataobj, dtype=np.float32), t1.affine)
    mask_img = sitk.Cast(from_ras(np.asarray(mask.dataobj) > 0, mask.affine), sitk.sitkUInt8)
    return t1_img, mask_img


def _method(*, seed: int, sampling: float, shrink: tuple[int, ...], iterations: int,
            fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock" (sitkWallClock): shift so every seed is fixed
    reg.SetMetricSamplingPercentage(sampling, seed + 1)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    # Image gradients from the interpolator at each sample, not from ITK's gradient-filter images: with the
    # filters on, the demo cohort's FLAIR (8-10 mm slices) ended 3-90 mm (mean 20) from its b0 while the metric
    # got worse, which erased the FLAIR lesion signal the onset-time tasks need. Without: 1.1 mm, and faster.
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=MIN_STEP_MM, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([max(s - 1, 0) for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def levels(image: sitk.Image, finest_mm: float) -> tuple[int, int, int]:
    """Shrink factors of a three-level pyramid whose finest level has about `finest_mm` voxels."""
    f = max(1, round(finest_mm / min(image.GetSpacing())))
    return (4 * f, 2 * f, f)


def register(fixed: sitk.Image, moving: sitk.Image, *, kind: str, seed: int, sampling: float,
             fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
             shrink: tuple[int, ...] = (4, 2, 1), iterations: int = 100) -> Registration:
    """Rigid (moments-centred) and, for kind='affine', an affine stage on the two finest levels."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _method(seed=seed, sampling=sampling, shrink=shrink, iterations=iterations,
                  fixed_mask=fixed_mask, moving_mask=moving_mask)
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(fixed, moving)
    metric = reg.GetMetricValue()
    transform: sitk.Transform = init
    if kind == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(init.GetCenter())
        affine.SetMatrix(init.GetMatrix())
        affine.SetTranslation(init.GetTranslation())
        reg = _method(seed=seed, sampling=sampling, shrink=shrink[-2:], iterations=iterations,
                      fixed_mask=fixed_mask, moving_mask=moving_mask)
        reg.SetInitialTransform(affine, inPlace=True)
        reg.Execute(fixed, moving)
        metric = reg.GetMetricValue()
        transform = affine
    return Registration(transform=transform, metric=float(metric))


def to_template(anchor: sitk.Image, brain: sitk.Image | None, *, kind: str, seed: int,
                sampling: float, finest_mm: float = 2.0) -> Registration:
    """Anchor series (skull-stripped by `brain` when given) -> MNI152 T1; fixed = template."""
    t1, t1_mask = template()
    if kind == "none":
        return Registration(transform=sitk.Transform(3, sitk.sitkIdentity), metric=float("nan"))
    moving = anchor if brain is None else sitk.Mask(anchor, sitk.Cast(brain, sitk.sitkUInt8))
    # Both skull-stripped and sampled over the whole template: the brain's outline then counts for MI; with
    # samples confined to the template mask, MI favoured a ~10% too large scale on phantoms.
    return register(sitk.Mask(t1, t1_mask), moving, kind=kind, seed=seed, sampling=sampling,
                    shrink=levels(t1, finest_mm))


def coregister(anchor: sitk.Image, image: sitk.Image, brain: sitk.Image | None, *, seed: int, sampling: float,
               finest_mm: float) -> Registration:
    """Another series of the same session -> the anchor (rigid MI over the anchor's brain): fixed = anchor."""
    return register(anchor, image, kind="rigid", seed=seed, sampling=sampling, fixed_mask=brain,
                    shrink=levels(anchor, finest_mm)[1:])


def same_grid(a: sitk.Image, b: sitk.Image, *, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def compose(outer: sitk.Transform, inner: sitk.Transform) -> sitk.Transform:
    """x -> inner(outer(x)): template point -> anchor point -> series point."""
    composite = sitk.CompositeTransform(3)
    # ITK applies a composite's transforms last-added first.
    composite.AddTransform(inner)
    composite.AddTransform(outer)
    return composite
