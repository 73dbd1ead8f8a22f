"""Argument helpers shared by the verbs that take a config (not a verb itself)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXECUTORS = ("slurm", "local", "debug")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. cv.folds=3")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where items run (default: launch.executor of the config)")


def load_with_executor(args: argparse.Namespace):
    from stroke_tss.config import load_config

    overrides = list(args.overrides)
    if args.executor:
        overrides.append(f"launch.executor={args.executor}")
    return load_config(args.config, overrides)
