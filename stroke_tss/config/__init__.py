"""Typed, validated configuration: `load_config(path, overrides)` -> `Config`."""

from stroke_tss.config.base import Section
from stroke_tss.config.loader import (
    config_yaml,
    dump_config,
    field_type,
    load_config,
    merge,
    parse_override,
    set_dotted,
    validate,
)
from stroke_tss.config.schema import Config, CVConfig, DataConfig, RunConfig

__all__ = [
    "CVConfig",
    "Config",
    "DataConfig",
    "RunConfig",
    "Section",
    "config_yaml",
    "dump_config",
    "field_type",
    "load_config",
    "merge",
    "parse_override",
    "set_dotted",
    "validate",
]
