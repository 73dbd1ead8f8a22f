"""Quality control: a montage PNG per subject and a QC table with outliers flagged.

Outliers by a robust z-score (median and MAD over the cohort) of registration similarity, brain volume and
each channel's in-brain mean/spread: a subject that registered badly or lost its skull strip stands out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

ROBUST_Z_MAX = 3.5  # Iglewicz-Hoaglin cut-off for the modified z-score


def montage(path: Path, result, *, channels: tuple[str, ...], title: str) -> Path:
    """Each channel at three axial levels, brain contour in cyan and lesion in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol, brain, lesion = result.volume, result.brain, result.lesion
    zs = np.linspace(0.3, 0.7, 3) * (vol.shape[1] - 1)
    fig, axes = plt.subplots(len(channels), 3, figsize=(6, 2 * len(channels)), squeeze=False)
    for c, name in enumerate(channels):
        for k, z in enumerate(zs.astype(int)):
            ax = axes[c, k]
            # origin lower: image left = low x = the subject's left... shown as radiologists would mirror it
            ax.imshow(vol[c, z], cmap="gray", origin="lower", vmin=-3, vmax=3)
            ax.contour(brain[z], levels=[0.5], colors="c", linewidths=0.5)
            if lesion is not None and lesion[z].any():
                ax.contour(lesion[z], levels=[0.5], colors="r", linewidths=0.7)
            ax.set_axis_off()
            ax.set_title(f"{name} z={z}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def robust_z(values: pd.Series) -> pd.Series:
    med = values.median()
    mad = (values - med).abs().median()
    if not np.isfinite(mad) or mad == 0:
        return pd.Series(0.0, index=values.index)
    return 0.6745 * (values - med) / mad


def qc_table(store: str | Path) -> pd.DataFrame:
    """STORE/qc.csv from the subject records: metrics, robust z per metric, `outlier` with the reasons."""
    store = Path(store)
    rows = []
    for p in sorted((store / "records").glob("*.json")):
        rec = json.loads(p.read_text())
        rows.append({"subject_id": rec["subject_id"], **(rec.get("qc") or {})})
    table = pd.DataFrame(rows)
    reasons = pd.Series("", index=table.index, dtype=object)
    if len(table) >= 5:  # a median and MAD over fewer subjects flag noise, not outliers
        for col in [c for c in table.columns if c != "subject_id"]:
            z = robust_z(pd.to_numeric(table[col], errors="coerce"))
            hit = z.abs() > ROBUST_Z_MAX
            reasons[hit] = reasons[hit] + f"{col};"
    table["outlier"] = reasons.str.len() > 0
    table["outlier_reasons"] = reasons.str.rstrip(";")
    table.to_csv(store / "qc.csv", index=False)
    return table
