"""Build a cohort manifest from a BIDS or ISLES'22-style tree."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data_prep.cohort import read_manifest, scan_tree, write_manifest

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="dataset root (BIDS rawdata/ + derivatives/, or a folder per subject)")
    parser.add_argument("-o", "--output", type=Path, default=Path("manifest.csv"), help="manifest CSV to write")
    parser.add_argument("--clinical", type=Path, help="CSV/TSV with subject_id (or participant_id) and clinical columns")
    parser.add_argument("--channels", default="dwi,b0,flair",
                        help="channels the manifest must provide, comma-separated (checked after writing)")


def main(args: argparse.Namespace) -> int:
    table = scan_tree(args.root, clinical=args.clinical)
    path = write_manifest(table, args.output)
    manifest = read_manifest(path, channels=tuple(c.strip() for c in args.channels.split(",") if c.strip()))
    print(f"wrote {path}: {len(table)} subject(s), {len(manifest.rows)} valid for channels {args.channels}")
    for row in manifest.rows:
        if row.derived:
            print(f"  {row.subject_id}: " + ", ".join(f"{k} derived as {v} (b={row.b_value:g})"
                                                   for k, v in row.derived.items()))
    for line in manifest.errors:
        print(f"  invalid: {line}")
    return 0 if not manifest.errors else 1
