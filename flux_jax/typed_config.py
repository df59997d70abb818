"""Typed configs from YAML: frozen dataclasses, ``a.b=c`` overrides, and errors that name the dotted key.

Generic over the dataclass tree (``flux_jax.run_config`` is its one schema today): unknown keys at any depth, wrong
types and out-of-range values (a ``__post_init__`` raising ``ConfigError(..., key=field)``) are errors that name
the full dotted key and the file or override they came from. Annotations understood: bool, int, float, str,
``Literal``, ``X | None``, unions, ``tuple[X, ...]``, fixed tuples and nested dataclasses. Float fields take
finite numbers only (``.inf`` / ``.nan`` / ``1e999`` are errors). YAML is read safely (:func:`load_yaml`, a
``yaml.SafeLoader`` that also refuses duplicate keys at any depth, naming both lines: YAML itself would keep the
last one silently); a file that is not UTF-8 YAML text is one error line, not a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from flux_jax.errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Reading YAML


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice; plain YAML loaders keep the last one and drop the first silently."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second

    def __str__(self) -> str:
        return (
            f"duplicate key {self.key!r} on line {self.second.line + 1} (first on line {self.first.line + 1}); "
            "each key may appear once per section"
        )


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tags beyond plain data) whose mappings refuse duplicate keys.

    Keys brought in by a ``<<`` merge may be overridden, as YAML intends; only keys written twice are errors.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base class reports an unhashable key
                if key in first:
                    raise DuplicateKeyError(key, first[key], key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Plain data (dicts, lists, scalars) from YAML ``text``, read safely; duplicate keys raise ``DuplicateKeyError``.

    The one YAML reader of flux-jax's configs: every config file and override value goes through it.
    """
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error as one line (PyYAML's own messages span several, with a caret excerpt)."""
    if isinstance(e, DuplicateKeyError):
        return str(e)
    if isinstance(e, yaml.reader.ReaderError):  # a control or non-text character: a binary file
        char = f"#x{e.character:02x}" if isinstance(e.character, int) else repr(e.character)
        return f"not a YAML text file (character {char} at offset {e.position}: {e.reason})"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join("; ".join(str(part) for part in (e.context, e.problem) if part).split())
        return f"invalid YAML at {where}{what}" if where else f"invalid YAML: {what}"
    return "invalid YAML: " + " ".join(str(e).split())


def read_yaml_file(path: str | Path) -> Any:
    """The data of the YAML file ``path``; an unreadable, non-text or invalid file is a one-line ``ConfigError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        problem = f"not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise ConfigError(f"{path}: not a YAML text file ({problem})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {yaml_error_line(e)}") from None


# --------------------------------------------------------------------------------------------------
# Typed loading


def load(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Load ``path`` (YAML) as ``cls``, apply ``key.path=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    raw = read_yaml_file(path)
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
        value = load_yaml(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: {yaml_error_line(e)}") from None
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


def _as_float(value: int | float | str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf


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
            number = _as_float(value)
        elif isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            number = _as_float(value)
        else:
            raise _mismatch(value, tp, key)
        if not math.isfinite(number):  # .inf / .nan / 1e999: a run would train on inf or NaN without a word
            raise ConfigError(f"{key}: must be a finite number, got {value!r}", key=key)
        return number
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
