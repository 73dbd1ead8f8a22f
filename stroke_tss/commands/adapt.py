"""Search the layer-freezing depth of a transferred model (depths as one job array), then train at the best."""

from __future__ import annotations

import argparse

from stroke_tss.adaptive import format_table, read_table
from stroke_tss.commands.common import add_config_arguments, load_with_executor
from stroke_tss.runs.adapt import run_adapt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--source", required=True, metavar="PHASE_OR_WEIGHTS",
                        help="what to transfer: a phase of the config (its RUN/<variant>/fold-<k>/<phase>/weights.pt) "
                             "or a weights file")
    parser.add_argument("--phase", default=None,
                        help="phase to adapt (default: the first with `freeze: auto`, else the last without train_only)")
    parser.add_argument("--fold", type=int, default=0, help="fold index in RUN/splits.json (default 0)")
    parser.add_argument("--variant", default=None, help="variant (default: the config's first)")


def main(args: argparse.Namespace) -> int:
    cfg = load_with_executor(args)
    rows, metrics, out_dir = run_adapt(cfg, source=args.source, phase=args.phase, fold=args.fold,
                                       variant=args.variant)
    chosen = next(r for r in rows if r["chosen"])
    table = read_table(out_dir)
    print(f"freezing depth search (f = {table['w1']:g} * L(first) + {table['w2']:g} * mean L over "
          f"{table['epochs']} epochs, validation BCE; * = chosen):")
    print(format_table(rows))
    test = metrics.get("test") or {}
    auc = test.get("auc")
    print(f"trained {out_dir} at depth {chosen['depth']} (frozen: {'+'.join(chosen['frozen']) or 'none'}); "
          f"test AUC {'-' if auc is None else f'{auc:.3f}'}")
    print(f"table: {out_dir / 'adapt' / 'table.csv'}")
    return 0
