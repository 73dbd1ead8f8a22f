"""Hyperparameter sweeps: grid points become variants, grid x folds runs as one array, points are ranked.

A grid file:

    grid:                               # dotted config key -> values; the product is the grid
      train.optimizer.lr: [0.001, 0.0001]
      phases.tss3h.freeze: [[stem], [stem, block1]]
    base_variant: 2d                    # the variant every point starts from (default: the config's first)
    rank_phase: tss4h5                  # phase whose mean validation AUC ranks the points (default: the last)

Points are ranked by mean validation AUC over folds (test folds never choose); RUN/sweep.json keeps the
ranked table and the chosen point.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from stroke_tss.config import Config, Section, merge, set_dotted, validate
from stroke_tss.config.loader import read_yaml
from stroke_tss.errors import UserError


class GridFile(Section):
    grid: dict[str, list[Any]] = Field(min_length=1)
    """Dotted config key -> list of values."""
    base_variant: str | None = None
    """Variant each point starts from (default: the config's first variant)."""
    rank_phase: str | None = None
    """Phase whose mean validation AUC ranks the points (default: the last phase)."""


def read_grid(path: str | Path) -> GridFile:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file {path} does not exist")
    raw = read_yaml(path) or {}
    grid = validate(raw, schema=GridFile, source=str(path))
    for key, values in grid.grid.items():
        if not values:
            raise UserError(f"{path}: grid key '{key}' has no values")
    return grid


def grid_points(grid: GridFile) -> list[dict[str, Any]]:
    keys = list(grid.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid.grid[k] for k in keys))]


def sweep_config(cfg: Config, grid: GridFile, *, source: str = "grid") -> tuple[Config, dict[str, dict]]:
    """The config whose variants are the grid points (each validated: an unknown key names itself)."""
    base_name = grid.base_variant or next(iter(cfg.variants))
    if base_name not in cfg.variants:
        raise UserError(f"{source}: base_variant '{base_name}' is not a variant of the config "
                        f"({', '.join(cfg.variants)})")
    base_overrides = cfg.variants[base_name]
    variants: dict[str, dict] = {}
    points: dict[str, dict] = {}
    for i, point in enumerate(grid_points(grid)):
        overrides: dict = {}
        for key, value in point.items():
            set_dotted(overrides, key, value)
        name = f"p{i:02d}"
        variants[name] = merge(base_overrides, overrides)
        points[name] = point
        # Validate each point now, so a bad key fails before anything is submitted.
        validate(merge(cfg.model_dump(mode="json"), variants[name]), source=f"{source} (point {name}: {point})")
    data = cfg.model_dump(mode="json")
    data["variants"] = variants
    data.pop("ensembles", None)  # ensembles name the config's variants, which the grid points replace
    swept = validate(data, source=source)
    if grid.rank_phase is not None and grid.rank_phase not in swept.phases:
        raise UserError(f"{source}: rank_phase '{grid.rank_phase}' is not a phase ({', '.join(swept.phases)})")
    return swept, points


def rank_points(summary: dict, points: dict[str, dict], *, phase: str) -> list[dict]:
    """Points ordered by mean validation AUC of `phase` (best first); test AUC shown, never used to choose."""
    rows = []
    for name, params in points.items():
        entry = summary.get(f"{name}/{phase}", {})
        rows.append({"point": name, "params": params, "val_auc_mean": entry.get("val_auc_mean"),
                     "test_auc": entry.get("hemisphere", {}).get("auc")})
    return sorted(rows, key=lambda r: (r["val_auc_mean"] is None, -(r["val_auc_mean"] or 0.0), r["point"]))


def write_ranking(run_dir: Path, ranked: list[dict], *, phase: str) -> Path:
    path = Path(run_dir) / "sweep.json"
    chosen = ranked[0] if ranked and ranked[0]["val_auc_mean"] is not None else None
    path.write_text(json.dumps({"rank_phase": phase, "points": ranked, "chosen": chosen}, indent=2, default=str))
    return path


def format_ranking(ranked: list[dict]) -> str:
    lines = [f"{'rank':>4} {'point':<6} {'val AUC':>8} {'test AUC':>8}  params"]
    for i, r in enumerate(ranked, 1):
        val = "-" if r["val_auc_mean"] is None else f"{r['val_auc_mean']:.3f}"
        test = "-" if r["test_auc"] is None else f"{r['test_auc']:.3f}"
        lines.append(f"{i:>4} {r['point']:<6} {val:>8} {test:>8}  {r['params']}")
    return "\n".join(lines)
