"""YAML files and `key.sub=value` overrides -> a validated `Config`, with errors that name key and file.

A file may start from another with `extends: other.yaml` (path relative to the file); mappings merge key by
key, anything else replaces. Overrides are parsed as YAML scalars, so `train.lr=1e-3` is a float and
`data.channels=[dwi,flair]` a list.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from stroke_tss.config.schema import Config
from stroke_tss.errors import UserError


def load_config(path: str | Path | None, overrides: list[str] = (), *, schema: type[BaseModel] = Config):
    """Load `path` (or start empty), apply overrides in order, validate against `schema`."""
    source = str(path) if path is not None else "<overrides>"
    raw = read_yaml_tree(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return validate(raw, schema=schema, source=source)


def validate(raw: dict, *, schema: type[BaseModel] = Config, source: str = "<config>"):
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, source)) from None


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """The first problem as one line: key, what is wrong, where it came from."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{key}'; check its spelling against configs/ or the docs{more}"
    if err["type"] == "missing":
        return f"{source}: missing required config value '{key}'; set it in the file or as {key}=...{more}"
    return f"{source}: config key '{key}': {err['msg']} (got {err.get('input')!r}){more}"


def read_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in _seen:
        raise UserError(f"{path}: 'extends' forms a cycle through {', '.join(map(str, _seen))}")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a YAML file such as configs/tss2d.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return merge(read_yaml_tree(path.parent / parent, (*_seen, path)), data)


def merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings key by key, everything else replaced by `update`; null in `update` removes a
    mapping (e.g. a variant drops a phase: `phases: {lesion: null}`)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if value is None and isinstance(out.get(key), dict):
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key}=...: '{part}' holds a value, not a section")
        node = child
    node[parts[-1]] = value


def dump_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (what a run folder keeps next to its checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
