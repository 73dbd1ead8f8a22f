"""Grad-CAM / attention maps of one subject: NIfTI on the store's grid, PNG montage, lesion overlap score."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_prep.paths import subject_path
from data_prep.store import open_store
from stroke_tss.errors import UserError
from stroke_tss.explain import explain_subject
from stroke_tss.predict import find_phases, fold_config, phase_order
from stroke_tss.report.collect import store_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="trained run folder")
    parser.add_argument("subject", metavar="SUBJECT", help="subject id in the store")
    parser.add_argument("--variant", default=None, help="variant (default: the only one in RUN)")
    parser.add_argument("--phase", default=None, help="phase folder (default: the last trained one)")
    parser.add_argument("--fold", type=int, default=0, help="fold whose weights to explain")
    parser.add_argument("--method", choices=("gradcam", "attention"), default="gradcam")
    parser.add_argument("--layer", default=None,
                        help="Grad-CAM layer (e.g. backbone.layer3) or attention map name (e.g. gate256)")
    parser.add_argument("--store", type=Path, default=None, help="store (default: the run's config.yaml data.store)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/explain/SUBJECT)")


def main(args: argparse.Namespace) -> int:
    phases = find_phases(args.run, variant=args.variant, fold=args.fold)
    names = phase_order(phases)
    phase = args.phase or names[-1]
    chosen = [p for p in phases if p.phase == phase]
    if not chosen:
        raise UserError(f"{args.run}: no trained phase {phase!r} in fold {args.fold}; trained: {', '.join(names)}")
    store = args.store or (fold_config(chosen[0].path).get("data") or {}).get("store") or store_path([args.run])
    if store is None:
        raise UserError(f"{args.run}/config.yaml names no data.store; pass --store")
    result = explain_subject(chosen[0].path / "weights.pt", open_store(store), args.subject, method=args.method,
                             layer=args.layer, out_dir=args.out or subject_path(args.run / "explain", args.subject))
    print(json.dumps(result, indent=2))
    return 0
