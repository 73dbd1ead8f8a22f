"""Safe NIfTI loading: every way a file can be unusable becomes one InputError line.

Checked: missing file, truncated gzip, not a NIfTI, 4D where 3D is expected (a trailing axis of length 1
is squeezed, as scanners write it), a singular or non-finite affine, NaN/Inf voxels, all-zero volume
(except a lesion mask: empty = no lesion). The voxel data is read once here, so the returned image holds it
in memory.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.errors import InputError

# a voxel smaller than this (mm^3) is a collapsed axis, not a real acquisition: nothing maps it to a place
MIN_VOXEL_MM3 = 1e-6
_AFFINE_HINT = "re-convert the series (e.g. dcm2niix) or repair the sform/qform in its header"


def load_nifti(path: str | Path, *, subject_id: str, field: str, expect_3d: bool = True) -> nib.Nifti1Image:
    """Load and check one NIfTI series; raise InputError naming subject, file and field."""
    path = Path(path)

    def fail(problem: str, hint: str) -> InputError:
        return InputError(problem, subject_id=subject_id, file=path, field=field, hint=hint)

    if not path.is_file():
        raise fail("file not found", "fix the path in the manifest or restore the file")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise fail(f"truncated or corrupt gzip ({exc.__class__.__name__})",
                   "re-export or re-copy the file") from None
    except nib.filebasedimages.ImageFileError:
        raise fail("not a NIfTI file", "convert it to .nii/.nii.gz (e.g. dcm2niix)") from None
    except (OSError, ValueError) as exc:
        # nibabel reports a short read of the voxel block as a ValueError ("buffer is too small")
        raise fail(f"unreadable NIfTI ({exc})", "re-export or re-copy the file") from None
    affine = img.affine
    if not np.isfinite(affine).all():
        raise fail("the header's affine holds NaN/Inf", _AFFINE_HINT)
    if abs(np.linalg.det(affine[:3, :3])) < MIN_VOXEL_MM3:
        # an all-zero or rank-deficient sform: no voxel has a place in the head, so nothing can be registered
        raise fail(f"the header's affine is singular (voxel volume {np.linalg.det(affine[:3, :3]):.3g} mm^3)",
                   _AFFINE_HINT)
    if expect_3d:
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise fail(f"expected a 3D volume, got shape {tuple(data.shape)}",
                       "split the 4D series and give the 3D volume this field needs")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(data.size - np.isfinite(data).sum())
        raise fail(f"{bad} NaN/Inf voxels", "fix the export or replace non-finite voxels with 0")
    if not np.any(data) and field != "lesion_mask":  # an empty lesion mask is a subject without a lesion
        raise fail("all-zero volume", "check the export; this series holds no signal")
    header = img.header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)  # the data is already scaled
    return nib.Nifti1Image(np.asarray(data), affine, header)


def world_coords(img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    """RAS mm coordinates (N, 3) of the voxels where `mask` is true."""
    ijk = np.argwhere(mask)
    return nib.affines.apply_affine(img.affine, ijk)
