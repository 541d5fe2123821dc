"""Reading a run config: YAML files + dotted `key=value` overrides onto the typed sections.

Every unknown key, wrong type or unparsable override is a ConfigError of one line naming the key
(with a close match when there is one). A key that was renamed still works, with a one-line warning
naming the new one; a key that was removed says why.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError
from .schema import Config

log = logging.getLogger("clipscale")

RENAMED: dict[str, str] = {}
"""Old dotted key -> its new name. Config files that use the old name keep working (with a warning)."""
REMOVED = {
    "data.augment.ratio": "open_clip's RandomResizedCrop ignores it (the aspect range stays 3/4 to 4/3)",
}
"""Dotted keys that no longer exist -> why (a one-line error)."""


def yaml_key(f: dataclasses.Field) -> str:
    """The YAML key of a dataclass field (a field may alias a Python keyword, e.g. `async`)."""
    return f.metadata.get("key", f.name)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {yaml_key(f): f for f in dataclasses.fields(cls)}


def field_type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        return " or ".join(type_name(a) for a in args) + (" or null" if nullable else "")
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp`; convert the harmless cases (int -> float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(key, value, tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"'{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            + (_suggest(str(value), map(str, choices)) if isinstance(value, str) else "")
        )
    if origin is list:
        return _coerce_list(key, value, typing.get_args(tp)[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return value
    if tp in _SCALARS:
        return _SCALARS[tp](key, value)
    raise ConfigError(f"'{key}': unsupported type {tp}")


def _coerce_union(key: str, value: Any, tp) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(key, value, arg)
        except ConfigError:
            pass
    raise ConfigError(f"'{key}' must be {type_name(tp)}, got {value!r}")


def _coerce_list(key: str, value: Any, item_tp) -> list:
    if dataclasses.is_dataclass(item_tp):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"'{key}' must be a list of mappings, got {value!r}")
        return [_new(item_tp, v, f"{key}.{i}.") for i, v in enumerate(value)]
    if isinstance(value, str) and "," in value:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        value = [value] if value is not None and not isinstance(value, dict) else value
    if not isinstance(value, list):
        raise ConfigError(f"'{key}' must be {type_name(list[item_tp])}, got {value!r}")
    return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"'{key}' must be true or false, got {value!r}")


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"'{key}' must be an integer, got {value!r}")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"'{key}' must be a number, got {value!r}")


def _as_str(key: str, value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"'{key}' must be a string, got {value!r}")


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _new(cls, data: dict, prefix: str):
    """A `cls` dataclass (a list item such as a data source) from a mapping."""
    obj = cls()
    _apply(obj, data, prefix)
    return obj


def _apply_to_items(items: list, item_tp, data: dict, prefix: str) -> None:
    """`data.sources.1.weight=0.2`: set fields of list items by index; the next index appends one."""
    for index, value in data.items():
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise ConfigError(
                f"'{prefix}{index}': expected an item number 0..{len(items)} of '{prefix[:-1]}'"
            ) from None
        if not 0 <= i <= len(items):
            raise ConfigError(
                f"'{prefix}{i}': '{prefix[:-1]}' has {len(items)} item(s); the next one is {prefix}{len(items)}"
            )
        if i == len(items):
            items.append(_new(item_tp, value if value is not None else {}, f"{prefix}{i}."))
        else:
            _apply(items[i], value if value is not None else {}, f"{prefix}{i}.")


def _apply(obj, data: dict, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from a nested mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    fields = _fields(type(obj))
    hints = field_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            if full in REMOVED:
                raise ConfigError(f"'{full}' was removed: {REMOVED[full]}")
            raise ConfigError(
                f"unknown key '{full}'{_suggest(str(key), fields, prefix)}; valid keys: "
                + ", ".join(prefix + k for k in fields)
            )
        f = fields[key]
        current = getattr(obj, f.name)
        item_tp = _dataclass_items(hints[f.name])
        optional_tp = _optional_dataclass(hints[f.name])
        if optional_tp is not None:  # a settings group that may be off (null)
            if value is None or value is False:
                setattr(obj, f.name, None)
            else:
                group = current if current is not None else optional_tp()
                _apply(group, {} if value is True else value, full + ".")
                setattr(obj, f.name, group)
        elif dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, full + ".")
        elif item_tp is not None and isinstance(value, dict):
            _apply_to_items(current, item_tp, value, full + ".")
        else:
            setattr(obj, f.name, _coerce(full, value, hints[f.name]))


def _optional_dataclass(tp):
    """The dataclass of an `X | None` annotation where X is a dataclass, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]) and type(None) in typing.get_args(tp):
            return args[0]
    return None


def _dataclass_items(tp):
    """The item dataclass of a `list[SomeDataclass]` annotation, else None."""
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0]
    return None


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exn:
        if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: say why it is not one
            problem = str(exn).splitlines()[0] if str(exn) else "parse error"
            raise ConfigError(
                f"override '{key}': the value is not valid YAML ({problem}); quote brace patterns "
                f"inside lists and mappings, e.g. {{name: x, shards: '/d/x-{{0..9}}.tar'}}"
            ) from None
        value = raw  # a plain string such as a brace pattern: /data/x-{000..009}.tar
    return key, value


def to_dict(cfg) -> dict:
    """The config as a plain nested dict with YAML key names."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
            v = [to_dict(item) for item in v]
        out[yaml_key(f)] = v
    return out


def read_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML `path` (optional) with the dotted overrides applied, every key and type checked (the
    values are checked by validate.validate; load_config does both)."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "parse error"
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        _apply(cfg, _renamed(data, f"config file {path}"))
    for item in overrides or []:
        key, value = _parse_override(item)
        _apply(cfg, _renamed(_nest(key, value), "override"))
    return cfg


def _renamed(data: Any, where: str) -> Any:
    """`data` with every key of RENAMED moved to its new name (and a one-line warning each)."""
    if not isinstance(data, dict):
        return data
    for old, new in RENAMED.items():
        *parents, last = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        value = node.pop(last)
        *new_parents, new_last = new.split(".")
        target = data
        for part in new_parents:
            target = target.setdefault(part, {})
        if new_last in target:
            raise ConfigError(f"{where} sets both '{old}' and its new name '{new}'; keep '{new}'")
        target[new_last] = value
        log.warning("%s: '%s' is now called '%s' (the old name still works for now)", where, old, new)
    return data


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def add_config_arguments(parser) -> None:
    """`--config FILE` and `key=value` overrides on an argparse parser (clipscale train/config, and
    `python -m clipscale.train` under torchrun)."""
    parser.add_argument("--config", "-c", help="YAML run config (see configs/); defaults apply to missing keys")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


OVERRIDES_HELP = "dotted config overrides, e.g. optim.lr=3e-4 data.batch_size=256 checkpoint.resume=auto"
