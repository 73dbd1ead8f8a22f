"""Shared by the explain/predict tests: a small real Zarr store with bright DWI lesions, a few-step trainer,
and a run folder in the DESIGN layout holding the trained phases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_prep.config import PrepConfig
from data_prep.store import assemble_table, create_or_extend, open_store, write_record, write_subject
from stroke_tss.models import build_model

SHAPE_XYZ = (64, 40, 8)  # hemisphere 32 wide: the smallest the ResNet-18 strides take


def blob_store(path: Path, *, num_subjects: int = 16, seed: int = 0):
    """Ellipsoid brains, one bright DWI lesion per subject on a random side; onset decides FLAIR signal."""
    rng = np.random.default_rng(seed)
    config = PrepConfig(shape=SHAPE_XYZ, spacing_mm=4.0)
    nx, ny, nz = SHAPE_XYZ
    z, y, x = np.mgrid[:nz, :ny, :nx]
    brain = (((x - nx / 2 + 0.5) / (nx / 2 - 2)) ** 2 + ((y - ny / 2) / (ny / 2 - 2)) ** 2
             + ((z - nz / 2) / (nz / 2 + 1)) ** 2 <= 1).astype(np.uint8)
    sids = [f"sub-{i:02d}" for i in range(num_subjects)]
    index = create_or_extend(path, config=config, subject_ids=sids)
    for sid in sids:
        side = rng.choice(["left", "right"])
        cx = rng.integers(6, nx // 2 - 6) + (nx // 2 if side == "right" else 0)
        cy, cz = rng.integers(8, ny - 8), rng.integers(2, nz - 2)
        lesion = ((((x - cx) / 4.0) ** 2 + ((y - cy) / 4.0) ** 2 + ((z - cz) / 1.5) ** 2) <= 1) & (brain > 0)
        onset = float(rng.uniform(30, 600))
        vol = rng.normal(0, 0.3, (3, nz, ny, nx)).astype(np.float32) * brain
        vol[0][lesion] += 3.0  # DWI bright
        vol[2][lesion] += 1.5 * min(onset / 600, 1.0)  # FLAIR brightens with time
        write_subject(path, index[sid], volume=vol, brain=brain, lesion=lesion.astype(np.uint8))
        write_record(path, {"subject_id": sid, "index": index[sid], "has_lesion_mask": True,
                            "stroke_side": side, "onset_to_mri_min": onset,
                            "lesion_volume_ml": float(lesion.sum()) * 0.064,
                            "lesion_left": side == "left", "lesion_right": side == "right",
                            "reader_1": int(onset < 270), "reader_2": int(onset < 240), "reader_3": int(onset < 300),
                            # raw intensities before the z-score, as prep records them (FLAIR ratio needs them)
                            "qc": {f"{c}_{k}": v for c in ("dwi", "b0", "flair")
                                   for k, v in (("mean", 400.0), ("std", 100.0))}})
    assemble_table(path)
    return open_store(path)


def hemisphere_samples(store, task: str):
    """(x, y) tensors per hemisphere: lesion_present on both halves, a TSS task on lesion halves with an onset."""
    xs, ys = [], []
    table = store.table.set_index("subject_id")
    for sid in store.subject_ids:
        row = table.loc[sid]
        for side in ("left", "right"):
            has = bool(row[f"lesion_{side}"])
            if task == "lesion_present":
                label = float(has)
            elif has and pd.notna(row["onset_to_mri_min"]):
                label = float(row["onset_to_mri_min"] < {"tss_lt_3h": 180, "tss_lt_4h5": 270}[task])
            else:
                continue
            xs.append(torch.from_numpy(store.hemisphere(sid, side)))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def train_phase(store, out: Path, *, task: str, steps: int, seed: int = 0, threshold: float = 0.5):
    """A few Adam steps of the 2D model on one task; writes weights.pt, predictions.csv, metrics.json."""
    torch.manual_seed(seed)
    x, y = hemisphere_samples(store, task)
    model = build_model("slicewise2d", num_slices=x.shape[2], in_channels=x.shape[1], base_channels=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=gen)[:8]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.model_name, "init_args": model.init_args, "state_dict": model.state_dict()},
               out / "weights.pt")
    with torch.no_grad():
        p = torch.sigmoid(model(x)).numpy()
    pd.DataFrame({"subject_id": "s", "hemisphere": "left", "task": task, "label": y.numpy().astype(int),
                  "probability": p, "split": "val"}).to_csv(out / "predictions.csv", index=False)
    (out / "metrics.json").write_text(json.dumps({"val": {"threshold": threshold, "auc": None}}))
    return model
