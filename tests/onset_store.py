"""Shared by the ceiling, report and gate tests: a small real store (data_prep's writer) whose lesion FLAIR and
b0 carry a noisy onset signal, and a run folder of made-up predictions on it in the DESIGN layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.config import PrepConfig
from data_prep.store import assemble_table, create_or_extend, open_store, write_record, write_subject
from stroke_tss.splits import make_splits, write_splits_once

SHAPE_XYZ = (24, 16, 8)
SIDES = ("left", "right", "bilateral", "none")


def _blob(shape_zyx, cx: int, rng) -> np.ndarray:
    z, y, x = np.mgrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    cy, cz, r = rng.integers(4, 12), rng.integers(2, 6), rng.uniform(1.2, 2.5)
    return ((x - cx) ** 2 + (y - cy) ** 2 + (2 * (z - cz)) ** 2) <= r ** 2


def onset_store(path: Path, *, num_subjects: int = 30, seed: int = 0, masks: bool = True):
    """Subjects with a lesion on the left, right, both or neither half; lesion FLAIR rises with onset time and
    b0 a little, both under noise; every 7th subject has no onset; sub-01's left flag is set with an empty mask
    half (a hemisphere the ceiling cannot read). ``masks=False`` writes no lesion masks (flags stay)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = SHAPE_XYZ
    sids = [f"sub-{i:02d}" for i in range(num_subjects)]
    rows = create_or_extend(path, config=PrepConfig(shape=SHAPE_XYZ, spacing_mm=4.0, qc_montage=False),
                            subject_ids=sids)
    for i, sid in enumerate(sids):
        side = SIDES[i % 4]
        onset = float(rng.uniform(30, 600)) if i % 7 else float("nan")
        left = _blob((nz, ny, nx), rng.integers(3, nx // 2 - 3), rng) if side in ("left", "bilateral") else 0
        right = _blob((nz, ny, nx), rng.integers(nx // 2 + 3, nx - 3), rng) if side in ("right", "bilateral") else 0
        lesion = np.zeros((nz, ny, nx), bool) | left | right
        volume = rng.normal(0, 1, (3, nz, ny, nx)).astype(np.float32)
        t = 0.0 if np.isnan(onset) else onset / 600
        volume[0][lesion] += 3.0
        volume[1][lesion] += 1.0 * t + rng.normal(0, 0.3)
        volume[2][lesion] += 2.0 * t + rng.normal(0, 0.5)
        ml = {s: float(np.asarray(m).sum()) * 0.064 for s, m in (("left", left), ("right", right))}
        flags = {s: ml[s] > 0 for s in ("left", "right")}
        if i == 1:
            flags["left"] = True  # flagged, but nothing in the mask's left half
        write_subject(path, rows[sid], volume=volume, brain=np.ones((nz, ny, nx), np.uint8),
                      lesion=lesion.astype(np.uint8) if masks else None)
        write_record(path, {"subject_id": sid, "index": rows[sid], "has_lesion_mask": masks,
                            "stroke_side": side, "onset_to_mri_min": onset,
                            "lesion_left": flags["left"], "lesion_right": flags["right"],
                            "lesion_left_ml": ml["left"], "lesion_right_ml": ml["right"]})
    assemble_table(path)
    return open_store(path)


def fake_run(run: Path, store: Path, *, num_folds: int = 3, seed: int = 0, phases: dict[str, dict[str, str]],
             channels: list[str] | None = None) -> dict:
    """RUN/config.yaml naming `store`, RUN/splits.json, and per variant its phases' predictions.csv (val and test
    hemispheres of the phase's task, scores = label + noise of a strength per phase). ``phases``: variant ->
    {phase: task}. Returns the splits."""
    from stroke_tss.tasks import task_samples

    table = open_store(store).table
    splits = write_splits_once(run / "splits.json", make_splits(list(table["subject_id"]), num_folds=num_folds,
                                                                seed=seed))
    data = {"store": str(store), **({"channels": channels} if channels else {})}
    (run / "config.yaml").write_text(json.dumps({"data": data, "phases": {p: {} for v in phases.values() for p in v}}))
    rng = np.random.default_rng(seed)
    for variant, schedule in phases.items():
        for k, fold in enumerate(splits["folds"]):
            for n, (phase, task) in enumerate(schedule.items()):
                rows = []
                for split in ("val", "test"):
                    for s in task_samples(table, task, fold[split])[0]:
                        z = (1 + n) * 0.5 * (2 * s.label - 1) + rng.normal()
                        rows.append({"subject_id": s.subject_id, "hemisphere": s.hemisphere, "task": task,
                                     "label": s.label, "probability": 1 / (1 + np.exp(-z)), "split": split})
                folder = run / variant / f"fold-{k}" / phase
                folder.mkdir(parents=True)
                pd.DataFrame(rows).to_csv(folder / "predictions.csv", index=False)
    return splits
