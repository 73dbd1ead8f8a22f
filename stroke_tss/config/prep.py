"""Preprocessing configs from YAML: data_prep's PrepConfig, loaded with the same rules as experiments."""

from __future__ import annotations

from pathlib import Path

from data_prep.config import PrepConfig
from stroke_tss.config.loader import read_yaml_tree, validate


def load_prep_config(path: Path | None) -> PrepConfig:
    """PrepConfig from a YAML file (top-level keys, or the `prep:` section of an experiment file)."""
    if path is None:
        return PrepConfig()
    raw = read_yaml_tree(path)
    return validate(raw.get("prep", raw), schema=PrepConfig, source=str(path))
