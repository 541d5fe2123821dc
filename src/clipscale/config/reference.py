"""The config reference, generated from the dataclasses in schema.py and their field docstrings.

`clipscale config --reference` prints it; docs/config.md is this output (`make docs` rewrites it,
and tests/test_config_reference.py fails when they differ), so the documented keys, types and
defaults cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Union

from .load import _optional_dataclass, field_type_hints, yaml_key
from .schema import Config


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal that follows it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_label(tp) -> str:
    """A short type for the table: int, float, bool, string, list of X, one of a/b/c, X or null."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_label(a) for a in args) + " or null"
    if origin is list:
        return f"list of {type_label(typing.get_args(tp)[0])}"
    if tp is Any:
        return "any"
    return {int: "int", float: "float", bool: "bool", str: "string", dict: "mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def rows(cls=Config, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, type, default, docstring) for every setting, depth first in declaration order."""
    docs = field_docs(cls)
    hints = field_type_hints(cls)
    nested = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            nested.append((type(default), prefix + yaml_key(f) + "."))
            continue
        tp = hints[f.name]
        optional = _optional_dataclass(tp)
        if optional is not None:  # a settings group that may be off
            yield prefix + yaml_key(f), "mapping or null", _show(default), docs.get(f.name, "")
            nested.append((optional, f"{prefix}{yaml_key(f)}."))
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):  # a list of settings groups, e.g. data.sources
            yield prefix + yaml_key(f), "list", _show(default), docs.get(f.name, "")
            nested.append((item, f"{prefix}{yaml_key(f)}[]."))
            continue
        yield prefix + yaml_key(f), type_label(tp), _show(default), docs.get(f.name, "")
    for sub, sub_prefix in nested:
        yield from rows(sub, sub_prefix)


def undocumented(cls=Config) -> list[str]:
    """Dotted keys without a docstring (the reference test requires none)."""
    return [key for key, _, _, doc in rows(cls) if not doc]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    """The markdown table of every setting."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | {_cell(tp)} | `{_cell(default)}` | {_cell(doc)} |" for key, tp, default, doc in rows()]
    return "\n".join(lines) + "\n"


def page() -> str:
    """docs/config.md: every key of a run config with its type, default and meaning."""
    return (
        "# Config reference\n\n"
        "Every key of a clipscale run config (YAML file + `key=value` overrides), generated from the\n"
        "dataclasses in `src/clipscale/config/schema.py` by `clipscale config --reference` (`make docs`).\n"
        "An unknown key, a wrong type or an impossible combination stops a run at start-up with one line.\n\n" + table()
    )


def update_files(repo: Path) -> list[Path]:
    """Rewrite docs/config.md under `repo`; returns the files changed."""
    docs = repo / "docs" / "config.md"
    if docs.is_file() and docs.read_text() == page():
        return []
    docs.write_text(page())
    return [docs]
