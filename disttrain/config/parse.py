"""Reading a config: YAML files, ``--set section.key=value`` overrides, and plain data checked against the
dataclasses' annotations (the schema lives in schema.py; the generic part of this module knows annotations, not sections).

Every mistake is a :class:`ConfigError` in one line naming the dotted key: an unknown key (with the keys
allowed there), a value of the wrong type, a choice outside a Literal, a YAML syntax error with its line.
bool is never accepted as a number nor 1 as a bool, ints are accepted where floats are expected, and YAML 1.1
strings such as ``1e-3`` (PyYAML reads them as strings) are accepted as floats.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from ..factory import add_import_dir
from .schema import Config
from .validate import validate

_FLOAT_LITERAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " / ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: an optional value
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:  # free-form keyword arguments: string keys, any YAML values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    # bool is a subclass of int in Python: never let true/false pass as a number, or 1 as a bool.
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string: accept such numeric literals.
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this file, not user error


def build_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from plain data, nested dataclasses included, every value checked."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} (allowed in {where}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, raw[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", raw[name], tp)
    return cls(**kwargs)


def apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def describe_keys(root: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key of the dataclass ``root`` and its sections: the README's config
    reference."""
    rows = []

    def walk(cls: type, prefix: str, instance: Any) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.", value)
            else:
                rows.append((f"{prefix}{f.name}", _type_name(hints[f.name]), repr(value), f.metadata.get("help", "")))

    walk(root, "", root())
    return rows


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from plain data (e.g. a resolved config sent to workers)."""
    cfg = build_dataclass(Config, raw)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """defaults < YAML file at ``path`` < ``overrides`` ("section.key=value"), then validate. The file's directory
    becomes importable for the config's ``package.module:function`` names (factory.add_import_dir)."""
    raw = read_yaml(path) if path is not None else {}
    if path is not None:
        add_import_dir(Path(path).parent)
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def reference_table() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every config key: the configuration reference (docs/reference.md)."""
    return describe_keys(Config)


__all__ = ["build_dataclass", "apply_override", "read_yaml", "describe_keys", "config_from_dict", "load_config",
           "reference_table"]
