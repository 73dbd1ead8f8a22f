"""YAML files and `key.sub=value` overrides -> a validated `Config`, with errors that name key and source.

A file may start from another with `extends: other.yaml` (one path, relative to the file); mappings merge key
by key, anything else replaces. Reading is bounded, since a config may come from anyone: at most
`MAX_CONFIG_BYTES` per file, `MAX_NODES` values once YAML aliases are expanded (a kilobyte of nested aliases
would otherwise expand to gigabytes), nesting at most `MAX_DEPTH` deep. An override's value is typed by the schema: where the field declares one type
(None aside), the text goes to pydantic as a string (`launch.account=12345` stays "12345",
`train.optimizer.lr=1e-3` becomes 0.001); elsewhere (`model.options.*`, `variants.*`, a union such as
`str | int | bool`) plain scalars resolve as in JSON (ints, floats, true/false, null, else a string).
`[a, b]` and `{k: v}` are YAML flow collections, typed the same way inside; quoted text stays a string;
`null` is None, and on a mapping removes it.
"""

from __future__ import annotations

import copy
import functools
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from stroke_tss.config.schema import Config
from stroke_tss.errors import UserError


def load_config(path: str | Path | None, overrides: list[str] = (), *, schema: type[BaseModel] = Config):
    """Load `path` (or start empty), apply overrides in order, validate against `schema`."""
    source = str(path) if path is not None else "<overrides>"
    raw = read_yaml_tree(Path(path)) if path is not None else {}
    applied = {}
    for item in overrides:
        key, value = parse_override(item, schema=schema)
        set_dotted(raw, key, value)
        applied.pop(key, None)  # keep the order of the latest setting
        applied[key] = item
    return validate(raw, schema=schema, source=source, overrides=applied)


def validate(raw: dict, *, schema: type[BaseModel] = Config, source: str = "<config>",
             overrides: dict[str, str] | None = None):
    """`raw` as a `schema` instance, or a one-line `UserError`; `overrides` (dotted key -> `key=value` item)
    says which keys came from the command line rather than `source`."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, source, overrides)) from None


def describe_validation_error(exc: ValidationError, source: str, overrides: dict[str, str] | None = None) -> str:
    """The first problem as one line: key, what is wrong, where it came from (an override or the file)."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    source = _blame(err["loc"], source, overrides or {})
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{key}'; check its spelling against configs/ or the docs{more}"
    if err["type"] == "missing":
        return f"{source}: missing required config value '{key}'; set it in the file or as {key}=...{more}"
    return f"{source}: config key '{key}': {err['msg']} (got {err.get('input')!r}){more}"


def _blame(loc: tuple, source: str, overrides: dict[str, str]) -> str:
    """The override that set the value at `loc` or a section holding it (the latest wins), else `source`; a
    check of a whole section names `source` with the override that changed something in it."""
    loc = tuple(str(p) for p in loc)
    latest_first = [(tuple(key.split(".")), item) for key, item in reversed(overrides.items())]
    for parts, item in latest_first:
        if loc[:len(parts)] == parts:
            return f"override {item}"
    for parts, item in latest_first:
        if loc and parts[:len(loc)] == loc:
            return f"{source} with override {item}"
    return source


MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (1 MiB; ours are a few KB)."""
MAX_NODES = 100_000
"""Most values (scalars, lists, mappings) a YAML file may hold once its aliases are expanded."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings in a YAML file."""


class _TooBig(yaml.YAMLError):
    """A YAML document past the bounds above."""


class _Bounded(yaml.SafeLoader):
    """SafeLoader that counts what the document expands to while composing it, before anything is built:
    each alias adds the size of the node it repeats, so an alias bomb fails at its first levels."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded
        self._open: list[int] = []  # running sizes of the nodes being composed
        self._total = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            node = self.anchors.get(anchor)
            if node is not None:
                if id(node) not in self._sizes:
                    raise _TooBig(f"alias *{anchor} repeats a node that holds it (a recursive structure)")
                self._count(self._sizes[id(node)])
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_DEPTH:
            raise _TooBig(f"nesting deeper than {MAX_DEPTH} levels")
        self._open.append(0)
        node = super().compose_node(parent, index)
        size = 1 + self._open.pop()
        self._sizes[id(node)] = size
        self._count(1, own=size - 1)
        return node

    def _count(self, size: int, *, own: int = 0) -> None:
        """Add a value of ``size`` to the node being composed; ``own`` of it is already counted."""
        if self._open:
            self._open[-1] += size + own
        self._total += size
        if self._total > MAX_NODES:
            raise _TooBig(f"more than {MAX_NODES} values once its aliases are expanded")


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``, read within the bounds above; one-line `UserError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a YAML file such as configs/tss2d.yaml")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes, more than a config may hold ({MAX_CONFIG_BYTES}); "
                        "pass the YAML config itself")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); pass a YAML config") from None
    try:
        return yaml.load(text, Loader=_Bounded)  # a SafeLoader: no tags beyond plain data
    except _TooBig as exc:
        raise UserError(f"{path}: refused as a config: {exc}; a config is a few hundred values, write them out "
                        "plainly") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file with the files it `extends` merged under it."""
    path = path.resolve()
    if path in _seen:
        raise UserError(f"{path}: 'extends' forms a cycle through {', '.join(map(str, _seen))}")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of config keys")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        got = f"a {type(parent).__name__}" if not isinstance(parent, str) else "an empty string"
        raise UserError(f"{path}: 'extends' takes one file path (a string such as 'extends: tss2d.yaml'), got {got}; "
                        "to combine several files, let each extend the one before")
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


def parse_override(item: str, *, schema: type[BaseModel] = Config) -> tuple[str, Any]:
    """`key.sub=value` -> (key, value typed as `schema` declares the key; see the module docstring)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} is not of the form key.sub=value")
    return key, _typed(_read_value(text), field_type(schema, key))


def field_type(schema: type[BaseModel], key: str) -> Any:
    """The annotation of dotted `key` in `schema` (through sections and dicts of them); None if it has none."""
    return functools.reduce(_child, key.split("."), schema)


class _Plain(str):
    """An unquoted scalar of an override, still to be typed."""


class _ValueLoader(_Bounded):
    """YAML flow collections whose scalars all stay strings, unquoted ones marked `_Plain` (bounded like a file:
    an override may hold aliases too)."""


_ValueLoader.yaml_implicit_resolvers = {}  # no YAML 1.1 guessing (1e-3 a string, 0755 octal, yes a bool)
_ValueLoader.add_constructor(
    "tag:yaml.org,2002:str",
    lambda loader, node: (_Plain if node.style is None else str)(loader.construct_scalar(node)),
)

_NULLS = {"", "~", "null", "Null", "NULL"}
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _read_value(text: str) -> Any:
    if text[:1] in ("[", "{", "'", '"'):
        try:
            return yaml.load(text, Loader=_ValueLoader)  # a SafeLoader
        except yaml.YAMLError:
            pass  # e.g. a name with an unbalanced bracket: the text as it is, like any other
    return _Plain(text)


def _typed(value: Any, annotation: Any) -> Any:
    """Plain scalars stay strings where the schema types them (pydantic converts); elsewhere they resolve."""
    if isinstance(value, dict):
        return {str(k): _typed(v, _child(annotation, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v, _item(annotation)) for v in value]
    if not isinstance(value, _Plain):
        return value  # quoted, or a YAML null
    if value in _NULLS:
        return None
    if annotation not in (None, Any) and len(_members(annotation)) == 1:
        return str(value)  # a union such as `str | int | bool` is no single type: resolve, pydantic picks
    if value in _BOOLS:
        return _BOOLS[value]
    if _INT.fullmatch(value):
        return int(value)
    return float(value) if _FLOAT.fullmatch(value) else str(value)


def _members(annotation: Any) -> tuple:
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _child(annotation: Any, key: str) -> Any:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            field = member.model_fields.get(key)
            return field.annotation if field else None
        if get_origin(member) is dict:
            return get_args(member)[1]
    return None


def _item(annotation: Any) -> Any:
    for member in _members(annotation):
        if get_origin(member) in (list, tuple, set) and get_args(member):
            return get_args(member)[0]
    return None


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set dotted `key` in nested `tree`; None on a mapping removes it, as in `merge`."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key}=...: '{part}' holds a value, not a section")
        node = child
    if value is None and isinstance(node.get(parts[-1]), dict):
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


def config_yaml(config: BaseModel) -> str:
    """The resolved config as YAML text (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def dump_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (what a run folder keeps next to its checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(config))
    return path
