"""Command-line flags generated from configuration dataclasses.

Every field of ``ModelConfig``, ``TrainConfig`` and a task's ``Options`` becomes a flag
(``init_percentage`` -> ``--init-percentage``) whose help is the field's docstring, so the flags,
the config files and the Python API can never drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from functools import cache
from typing import Any


@cache
def plain_help(text: str) -> str:
    """A docstring as argparse help: reStructuredText roles and literals as plain text
    (``:func:`x``` and double backticks -> x), ``%`` escaped for argparse's formatting."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("%", "%%")


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of a dataclass and of its dataclass bases (read
    from their source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for previous, node in zip(body, body[1:], strict=False):
        if (
            isinstance(previous, ast.AnnAssign)
            and isinstance(previous.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[previous.target.id] = " ".join(node.value.value.split())
    return docs


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def _parser_for(annotation: Any) -> Any:
    """argparse ``type`` for a field annotation (None for booleans; for ``list[X]``, X's)."""
    origin = typing.get_origin(annotation)
    if origin is list:
        annotation = typing.get_args(annotation)[0]
    elif origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if inner == [int]:
            return _optional_int
        annotation = inner[0]
    if annotation is bool:
        return None
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"no command-line parser for fields of type {annotation!r}")


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    section: str,
    exclude: frozenset[str] = frozenset(),
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """Add one flag per field of ``cls``; parsed values land in ``args.<section>.<field>`` only
    when given (defaults are left to the configuration layers)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        names = [f"--{field.name.replace('_', '-')}", *(aliases or {}).get(field.name, [])]
        default = field.default
        if default is dataclasses.MISSING:
            factory = field.default_factory
            default = None if factory is dataclasses.MISSING else factory()
        help_text = plain_help(f"{docs.get(field.name, '')} (default: {default})".strip())
        kind = _parser_for(hints[field.name])
        if kind is None:
            parser.add_argument(*names, dest=f"{section}.{field.name}",
                                action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            many = {"nargs": "+"} if typing.get_origin(hints[field.name]) is list else {}
            parser.add_argument(*names, dest=f"{section}.{field.name}", type=kind,
                                default=argparse.SUPPRESS, metavar=field.name.upper(),
                                help=help_text, **many)


def given_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{"model": {...}, "train": {...}, ...}`` from the dotted destinations actually given."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
    return sections
