"""Probability of TSS < 4.5 h (and < 3 h), the lesion hemisphere and the decision, per subject of new data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.store import open_store
from stroke_tss.errors import UserError
from stroke_tss.predict import predict_store, prep_like_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="trained run folder")
    parser.add_argument("data", type=Path, metavar="MANIFEST_OR_STORE",
                        help="a preprocessed store, or a manifest CSV to preprocess like the training store")
    parser.add_argument("--variant", default=None, help="variant (default: the only one in RUN)")
    parser.add_argument("--fold", type=int, default=None, help="one fold's weights (default: fold ensemble)")
    parser.add_argument("--subjects", nargs="*", default=None, help="only these subject ids")
    parser.add_argument("--out", type=Path, default=None, help="CSV to write (default: print)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing workers for a manifest")


def main(args: argparse.Namespace) -> int:
    data, failed = args.data, {}
    if data.suffix.lower() == ".csv":
        data, failed = prep_like_training(args.run, data, workers=args.workers)
    store = open_store(data)
    if not store.subject_ids:
        raise UserError(f"{args.data}: no subject could be preprocessed: {'; '.join(list(failed.values())[:3])}")
    missing = [s for s in args.subjects or [] if s not in store.subject_ids]
    if missing:
        raise UserError(f"subject(s) {', '.join(missing)} not in {data}; it holds {len(store.subject_ids)} subjects")
    table = predict_store(args.run, store, variant=args.variant, fold=args.fold, subjects=args.subjects)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(args.out)
    else:
        print(table.to_csv(index=False), end="")
    # the subjects that could not be scored are said, not dropped: the table holds the others
    for line in failed.values():
        print(f"not predicted: {line}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} subject(s) not predicted; see {data / 'failures.csv'}", file=sys.stderr)
    return 1 if failed else 0
