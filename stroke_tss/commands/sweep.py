"""Sweep a hyperparameter grid: points x folds as one job array, points ranked by validation AUC."""

from __future__ import annotations

import argparse
from pathlib import Path

from stroke_tss.commands.common import EXECUTORS, load_with_executor
from stroke_tss.runs.cv import run_cv
from stroke_tss.runs.summary import read_summary
from stroke_tss.runs.sweep import format_ranking, rank_points, read_grid, sweep_config, write_ranking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML the points start from")
    parser.add_argument("grid", type=Path, help="grid YAML (see stroke_tss/runs/sweep.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--executor", choices=EXECUTORS, default=None)


def main(args: argparse.Namespace) -> int:
    cfg = load_with_executor(args)
    grid = read_grid(args.grid)
    swept, points = sweep_config(cfg, grid, source=str(args.grid))
    results = run_cv(swept)
    phase = grid.rank_phase or list(swept.phases)[-1]
    ranked = rank_points(read_summary(swept.run.dir), points, phase=phase)
    path = write_ranking(Path(swept.run.dir), ranked, phase=phase)
    print(format_ranking(ranked))
    print(f"ranking: {path}")
    return 1 if any(r.state == "failed" for r in results) else 0
