"""Print the resolved config as YAML (what RUN/config.yaml holds), or with --schema every key documented.

`stroke-tss config CONFIG [key=value ...]` shows what a run would use, after `extends` and overrides;
`stroke-tss config --schema` lists each dotted key with its type, default and the docstring under its field.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from stroke_tss.config import Config, config_yaml, load_config
from stroke_tss.config.loader import field_type
from stroke_tss.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. cv.folds=3")
    parser.add_argument("--schema", action="store_true",
                        help="list every config key with its type, default and meaning instead")


def main(args: argparse.Namespace) -> int:
    if args.schema:
        if args.config is not None:
            raise UserError("--schema lists the keys of every config: give it no CONFIG or overrides")
        print("\n".join(schema_lines(Config)))
        return 0
    if args.config is None:
        raise UserError("give a CONFIG (e.g. configs/tiny.yaml) to resolve, or --schema to list the keys")
    print(config_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def schema_lines(model: type[BaseModel], instance: BaseModel | None = None, prefix: str = "") -> Iterator[str]:
    """`key: type = default` per field of `model` (defaults from `instance` when given), each followed by its
    docstring indented; sections and dicts of sections recurse (`train.optimizer.lr`, `phases.<name>.task`)."""
    docs = field_docs(model)
    for name, field in model.model_fields.items():
        key, doc = f"{prefix}{name}", field.description or docs.get(name)
        default = getattr(instance, name) if instance is not None else field.get_default(call_default_factory=True)
        section, entry = _model_in(field.annotation), _model_in(field_type(model, f"{name}.<name>"))
        if default is PydanticUndefined:
            shown = " (required)"
        elif section is not None and default is not None:
            shown = ""  # the keys below show the section's defaults
        elif entry is not None:
            shown = " = {" + ", ".join(f"{json.dumps(k)}: {{...}}" for k in default) + "}"
        else:
            shown = f" = {json.dumps(to_jsonable_python(default))}"
        yield f"{key}: {_type_name(field.annotation)}{shown}" + ("\n" + textwrap.indent(doc, "    ") if doc else "")
        if section is not None:
            yield from schema_lines(section, default if isinstance(default, section) else None, f"{key}.")
        elif entry is not None:
            yield from schema_lines(entry, None, f"{key}.<name>.")


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the string literal right under the field in the class source (bases first).

    pydantic's `use_attribute_docstrings` would fill `Field.description` with these, but the sections do not
    set it (config/base.py, hpc/launch_config.py); a description, where set, wins over this reading."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (issubclass(cls, BaseModel) and cls is not BaseModel):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for field, doc in zip(body, body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                docs[field.target.id] = inspect.cleandoc(doc.value.value)
    return docs


def _model_in(annotation) -> type[BaseModel] | None:
    """The section class in `annotation` (`X`, `X | None`), if any."""
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)


def _type_name(annotation) -> str:
    if get_origin(annotation) in (Union, UnionType):
        return " | ".join(_type_name(member) for member in get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and get_origin(annotation) is None:
        return annotation.__name__
    return re.sub(r"\b(?:[a-z_]\w*\.)+(?=[A-Za-z_])", "", str(annotation))  # typing.Any, pathlib.Path -> Any, Path
