"""Typed configs from YAML: frozen dataclasses, ``a.b=c`` overrides, and errors that name the dotted key.

Generic over the dataclass tree (``flux_jax.run_config`` is its one schema today): unknown keys at any depth, wrong
types and out-of-range values (a ``__post_init__`` raising ``ConfigError(..., key=field)``) are errors that name
the full dotted key and the file or override they came from. Annotations understood: bool, int, float, str,
``Literal``, ``X | None``, unions, ``tuple[X, ...]``, fixed tuples and nested dataclasses. YAML is read with
``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from flux_jax.errors import ConfigError

T = TypeVar("T")


def load(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Load ``path`` (YAML) as ``cls``, apply ``key.path=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")

    origins: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(cls, item)
        _set_dotted(raw, key, value)
        origins[key] = item
    try:
        return build(cls, raw)
    except ConfigError as e:
        where = str(path)
        if e.key is not None:
            for key, item in origins.items():
                if e.key == key or e.key.startswith((key + ".", key + "[")):
                    where = f"override {item!r}"
        raise ConfigError(f"{where}: {e}", key=e.key) from None


def build(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls`` from plain nested mappings (the inverse of :func:`plain`)."""
    return _build(cls, data, "")


def parse_override(root: type, item: str) -> tuple[str, Any]:
    """``"train.steps=10"`` -> ``("train.steps", 10)``; checks the key against ``root``'s schema.

    An empty value (``model.base=``) is the empty string, since YAML would read it as null; write
    ``null`` for None.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: invalid YAML value: {e}") from None
    cls: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _field_types(cls)
        if part not in fields:
            message = _unknown_key_message(".".join(parts[: i + 1]), fields)
            raise ConfigError(f"override {item!r}: {message}", key=key)
        cls = fields[part]
        if i < len(parts) - 1 and not _is_dataclass_type(cls):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section", key=key)
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *sections, last = key.split(".")
    for part in sections:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = _deep_merge(node[last], value)
    else:
        node[last] = value


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------------------------------
# Typed conversion


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key_message(key: str, fields: Mapping[str, Any]) -> str:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; allowed here: {', '.join(fields)}"


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:  # an empty section (`mesh:` with nothing under it) means all defaults
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}",
            key=prefix or None,
        )
    fields = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in fields:
            raise ConfigError(_unknown_key_message(key, fields), key=key)
        kwargs[name] = _coerce(value, fields[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name only the field; add the section so the key is fully dotted.
        key = _join(prefix, e.key) if e.key else prefix or None
        message = _join(prefix, str(e)) if e.key else str(e)
        raise ConfigError(message, key=key) from None


# PyYAML implements YAML 1.1, which reads `1e-4` (no dot) as a string; accept such strings for float
# fields rather than make every learning rate in a config be written as 1.0e-4.
_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _mismatch(value: Any, tp: Any, key: str) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}", key=key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form (lists -> tuples)."""
    if _is_dataclass_type(tp):
        return _build(tp, value, key)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        # Compare type too: YAML `1` must not match a Literal[True] and `true` must not match 1.
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}; got {value!r}", key=key)
    if origin is Union or origin is types.UnionType:
        if value is None:
            if type(None) in args:
                return None
            raise _mismatch(value, tp, key)
        arms = [arm for arm in args if arm is not type(None)]
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(e)
        # Surface the inner error (e.g. the bad item of a list) when only one arm could have meant
        # this value: the only non-null arm, or the only sequence arm for a list.
        sequence_arms = [i for i, arm in enumerate(arms) if get_origin(arm) is tuple]
        if len(arms) == 1:
            raise errors[0]
        if isinstance(value, list | tuple) and len(sequence_arms) == 1:
            raise errors[sequence_arms[0]]
        raise _mismatch(value, tp, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _mismatch(value, tp, key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}", key=key)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(value, tp, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(value, tp, key)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise _mismatch(value, tp, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(value, tp, key)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not input


def plain(obj: Any) -> Any:
    """Plain nested dicts and lists of a config dataclass: safe to ``yaml.safe_dump`` and to load back unchanged."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [plain(v) for v in obj]
    return obj
