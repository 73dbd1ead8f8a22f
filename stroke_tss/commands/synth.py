"""Generate a phantom cohort with known ground truth on the MNI152 anatomy."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_prep.phantom import synthesize_cohort
from stroke_tss.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (manifest.csv, truth.csv, oracle.json, one folder per subject)")
    parser.add_argument("--subjects", type=int, default=40, help="number of subjects")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the cohort is deterministic per seed)")
    parser.add_argument("--lesions", type=Path, help="folder of real MNI-space lesion masks (e.g. SOOP); blobs otherwise")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm before per-site factors")
    parser.add_argument("--brain-masks", action="store_true", help="also write brain_mask.nii.gz per subject")


def main(args: argparse.Namespace) -> int:
    if args.lesions is not None and not args.lesions.is_dir():
        raise UserError(f"--lesions {args.lesions}: not a folder (give the folder of lesion masks)")
    start = time.perf_counter()
    manifest = synthesize_cohort(args.out, num_subjects=args.subjects, seed=args.seed, lesions_dir=args.lesions,
                                 spacing_mm=args.spacing, brain_masks=args.brain_masks)
    oracle = json.loads((args.out / "oracle.json").read_text())
    print(f"wrote {manifest} ({args.subjects} subjects, {time.perf_counter() - start:.1f} s); oracle AUC: "
          + ", ".join(f"{k} {v:.3f}" for k, v in oracle.items()))
    return 0
