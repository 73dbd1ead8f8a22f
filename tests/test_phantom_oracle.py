"""The phantom's images carry the signal its oracle promises: measured FLAIR ratio vs onset time.

Measured on the raw phantom series (no store): lesion voxels of the DWI grid are carried into the FLAIR
grid by the stored motion (flair_pose @ pose^-1), and their contralateral mirror through MNI x = 0 by the
stored poses (the warp, 3-4 mm, is ignored). A one-feature logistic regression is monotone, so its AUC is
the AUC of the ratio itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from data_prep.phantom import pose_from_truth, synthesize_cohort


def measured_flair_ratio(folder: Path, truth: pd.Series) -> float:
    """Mean FLAIR over the lesion / mean FLAIR over its contralateral mirror, both on the FLAIR grid."""
    lesion = nib.load(str(folder / "lesion.nii.gz"))
    flair = nib.load(str(folder / "flair.nii.gz"))
    data = np.asarray(flair.dataobj, dtype=np.float32)
    pose, flair_pose = pose_from_truth(truth), pose_from_truth(truth, "flair_pose")
    ijk = np.argwhere(np.asarray(lesion.dataobj) > 0).T
    p = lesion.affine[:3, :3] @ ijk + lesion.affine[:3, 3:]
    q = np.linalg.inv(pose) @ np.vstack([p, np.ones(p.shape[1])])
    mirrored = q * np.array([[-1.0], [1.0], [1.0], [1.0]])
    to_voxel = np.linalg.inv(flair.affine) @ flair_pose
    same = ndimage.map_coordinates(data, (to_voxel @ q)[:3], order=1)
    other = ndimage.map_coordinates(data, (to_voxel @ mirrored)[:3], order=1)
    return float(same.mean() / max(other.mean(), 1e-6))


@pytest.mark.integration
def test_measured_flair_ratio_reaches_the_oracle(tmp_path: Path) -> None:
    manifest = synthesize_cohort(tmp_path, num_subjects=110, seed=4, spacing_mm=4.0)
    truth = pd.read_csv(tmp_path / "truth.csv")
    oracle = json.loads((manifest.parent / "oracle.json").read_text())
    # unilateral lesions only: a bilateral lesion's mirror is lesion too
    rows = truth[truth.stroke_side.isin(["left", "right"])]
    ratio = np.array([measured_flair_ratio(tmp_path / r.subject_id, r) for _, r in rows.iterrows()])
    y = rows.tss_lt_4h5.to_numpy()
    assert len(rows) > 80 and 0.3 < y.mean() < 0.7
    prob = LogisticRegression().fit(np.log(ratio)[:, None], y).predict_proba(np.log(ratio)[:, None])[:, 1]
    auc = roc_auc_score(y, prob)
    latent = roc_auc_score(y, -rows.flair_rel.to_numpy())  # this cohort's sampling noise, measured
    assert abs(auc - oracle["tss_lt_4h5"]) < 0.05, (auc, latent, oracle["tss_lt_4h5"])
    assert auc <= latent + 0.02  # measurement cannot beat the latent truth
