"""One config system for both stages: YAML with `base:` inheritance, dotted CLI overrides, typed dataclasses.

A config is a tree of (frozen-by-convention) dataclasses. A YAML file may name one or more parent files
under ``base:`` (paths relative to the file); parents are deep-merged first, the child wins, lists are
replaced whole. Command-line tokens ``a.b.c=value`` are parsed as YAML scalars and merged last.
Every key is checked against the dataclass tree: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the dotted key (and the closest valid key when there is one).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from common.io import write_text

T = TypeVar("T")

BASE_KEY = "base"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key and the file."""


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and resolve its ``base:`` chain into one nested dict (child overrides parent)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, _seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override`` recursively (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML (``1`` -> int, ``x`` -> str)."""
    tree: dict[str, Any] = {}
    for token in tokens:
        if "=" not in token:
            raise ConfigError(f"override {token!r} is not of the form key.sub=value")
        key, raw = token.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {token!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return tree


def build(schema: type[T], tree: dict[str, Any], source: str = "<config>") -> T:
    """Validate a nested dict against a dataclass schema and instantiate it (defaults fill missing keys)."""
    return _build_dataclass(schema, tree, prefix="", source=source)


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (optional; the schema defaults otherwise) with its bases, apply overrides, validate."""
    tree = load_yaml_tree(path) if path else {}
    source = str(path) if path else "<defaults>"
    if overrides:
        tree = deep_merge(tree, parse_overrides(overrides))
        source += " + command line"
    return build(schema, tree, source)


def replace(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with dotted overrides applied (validated like the command line)."""
    return build(type(cfg), deep_merge(to_dict(cfg), parse_overrides(overrides)), "<replace>")


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form of a config (tuples become lists) for YAML and JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, keys in schema order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config next to a run's outputs so the run can be reproduced from it alone."""
    return write_text(path, dump_yaml(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Dotted-key scalar view (lists become strings): what TensorBoard's hparams accepts."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in (to_dict(cfg) if not isinstance(cfg, dict) else cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf of a schema: the body of ``--help``."""
    rows = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


# --------------------------------------------------------------------------------------------------
# validation


def _build_dataclass(schema: type, tree: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "<root>"
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {tree!r}")
    hints = get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key in tree:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(schema):
        if f.name in tree:
            kwargs[f.name] = _coerce(tree[f.name], hints[f.name], prefix + f.name, source)
        elif dataclasses.is_dataclass(hints[f.name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _build_dataclass(hints[f.name], {}, prefix + f.name + ".", source)
    try:
        obj = schema(**kwargs)
    except TypeError as err:  # a required field was left out
        raise ConfigError(f"{source}: {where}: {err}") from err
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except (ValueError, AssertionError) as err:
            raise ConfigError(f"{source}: {err}") from err
    return obj


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: config key '{key}' expects {expected}, got {value!r}")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key + ".", source)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise fail(_type_name(tp))
    if origin is Literal:
        if value not in get_args(tp):
            raise fail("one of " + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail(_type_name(tp))
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"{len(args)} values ({_type_name(tp)})")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise fail("a string")
        return str(value)
    raise ConfigError(f"{source}: config key '{key}' has an unsupported schema type {tp!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """``dataclasses.field`` with a help string (shown by ``--help``); mutable defaults are copied."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
