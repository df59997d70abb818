"""Declarative PyTorch <-> NNX key tables, shared by the VAE, T5 and CLIP converters.

Each encoder describes its checkpoint layout ONCE, as a tuple of `KeyRule`s: an NNX parameter path
template, the matching torch state-dict key template, and the layout transform between the two
tensors. The same table drives import (torch dict -> flat NNX params, validated against the
model's `eval_shape`) and export (NNX params -> torch dict), so the two directions cannot drift.

Templates use `{name}` placeholders for integer indices (layer, level, block). A placeholder listed
in `KeyTable.mirrored` counts from the other end on the torch side (BFL's VAE decoder numbers its
levels by resolution, the reverse of execution order); its size comes from the model config.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax.errors import CheckpointError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# How many offending keys an error message lists before it summarises the rest.
_MAX_LISTED = 20


class Transform(enum.Enum):
    """Tensor layout change from a torch tensor to its NNX parameter (and back)."""

    COPY = "copy"
    # torch Linear weight [out, in] <-> Dense kernel [in, out].
    LINEAR = "linear"
    # torch Conv2d weight [O, I, kh, kw] <-> NHWC conv kernel [kh, kw, I, O].
    CONV = "conv"
    # torch 1x1 Conv2d weight [O, I, 1, 1] <-> Dense kernel [I, O] (BFL's VAE attention projections).
    CONV1X1_AS_LINEAR = "conv1x1_as_linear"

    def to_nnx(self, x: np.ndarray) -> np.ndarray:
        if self is Transform.LINEAR:
            return _require_ndim(x, 2, self).T
        if self is Transform.CONV:
            return _require_ndim(x, 4, self).transpose(2, 3, 1, 0)
        if self is Transform.CONV1X1_AS_LINEAR:
            x = _require_ndim(x, 4, self)
            if x.shape[2:] != (1, 1):
                raise ValueError(f"{self.value}: expected a 1x1 kernel, got shape {x.shape}")
            return x[:, :, 0, 0].T
        return x

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        if self is Transform.LINEAR:
            return x.T
        if self is Transform.CONV:
            return x.transpose(3, 2, 0, 1)
        if self is Transform.CONV1X1_AS_LINEAR:
            return x.T[:, :, None, None]
        return x

    def nnx_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The NNX shape a torch tensor of `torch_shape` becomes, without touching any data."""
        return self.to_nnx(np.empty(torch_shape, dtype=np.uint8)).shape


def _require_ndim(x: np.ndarray, ndim: int, t: Transform) -> np.ndarray:
    if x.ndim != ndim:
        raise ValueError(f"{t.value}: expected a {ndim}-d tensor, got shape {x.shape}")
    return x


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One parameter family: NNX path template <-> torch key template(s)."""

    nnx: str
    torch: str
    transform: Transform = Transform.COPY
    # Other torch names of the same tensor (tied weights such as T5's `shared` / `embed_tokens`):
    # accepted on import (all present copies must agree) and written on export.
    aliases: tuple[str, ...] = ()


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(template)
    # split() alternates literal text and placeholder names.
    pattern = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
    return re.compile(pattern + r"\Z")


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A checkpoint layout: the rules plus layout-wide facts the rules need."""

    name: str
    rules: tuple[KeyRule, ...]
    # placeholder name -> number of entries; the torch index is (size - 1 - nnx index).
    mirrored: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # Regexes of torch keys that are accepted and dropped on import (non-persistent buffers that old
    # checkpoints saved anyway, such as CLIP's `position_ids`).
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for rule in self.rules:
            names = set(_PLACEHOLDER.findall(rule.nnx))
            for t in (rule.torch, *rule.aliases):
                if set(_PLACEHOLDER.findall(t)) != names:
                    raise ValueError(f"{self.name}: placeholders differ between {rule.nnx!r} and {t!r}")

    def _map_index(self, name: str, value: int) -> int:
        # Mirroring is its own inverse, so the same map serves both directions.
        if name in self.mirrored:
            size = self.mirrored[name]
            if not 0 <= value < size:
                raise KeyError(f"index {name}={value} is outside 0..{size - 1}")
            return size - 1 - value
        return value

    def _translate(self, key: str, src: str, dst: str) -> str | None:
        m = _template_regex(src).match(key)
        if m is None:
            return None
        try:
            fields = {k: self._map_index(k, int(v)) for k, v in m.groupdict().items()}
        except KeyError:
            return None
        return dst.format(**fields)

    def torch_keys(self, nnx_path: str) -> tuple[KeyRule, tuple[str, ...]]:
        """The rule for an NNX path and its torch key(s), primary first."""
        for rule in self.rules:
            primary = self._translate(nnx_path, rule.nnx, rule.torch)
            if primary is not None:
                aliases = tuple(self._translate(nnx_path, rule.nnx, a) or "" for a in rule.aliases)
                return rule, (primary, *aliases)
        raise KeyError(f"{self.name}: no key rule for NNX parameter {nnx_path!r}")

    def nnx_path(self, torch_key: str) -> tuple[KeyRule, str] | None:
        """The rule and NNX path a torch key maps to, or None if no rule covers it."""
        for rule in self.rules:
            for template in (rule.torch, *rule.aliases):
                path = self._translate(torch_key, template, rule.nnx)
                if path is not None:
                    return rule, path
        return None

    def is_ignored(self, torch_key: str) -> bool:
        return any(re.fullmatch(p, torch_key) for p in self.ignored)


def path_str(path: Iterable[Any]) -> str:
    """NNX state path tuple -> dotted string ('blocks', 0, 'kernel') -> 'blocks.0.kernel'."""
    return ".".join(str(p) for p in path)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {k}" for k in shown) + more


def import_state(
    table: KeyTable, state: Mapping[str, Any], expected: Mapping[str, jax.ShapeDtypeStruct]
) -> dict[str, np.ndarray]:
    """Convert a torch state dict to flat NNX params (dotted path -> array in NNX layout).

    `expected` holds the target model's parameter shapes (from `nnx.eval_shape`). Every expected
    parameter must be found, every torch key must be used (or ignored by the table), and every
    shape must match; otherwise a single `CheckpointError` lists all problems at once.
    """
    out: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    for key in sorted(state):
        hit = table.nnx_path(key)
        if hit is None:
            if not table.is_ignored(key):
                unexpected.append(key)
            continue
        rule, path = hit
        if path not in expected:
            unexpected.append(key)
            continue
        value = np.asarray(state[key])
        want = tuple(expected[path].shape)
        try:
            converted = rule.transform.to_nnx(value)
        except ValueError as e:
            misshaped.append(f"{key}: {e}")
            continue
        if converted.shape != want:
            torch_want = rule.transform.to_torch(np.empty(want, np.uint8)).shape
            misshaped.append(f"{key}: got {tuple(value.shape)}, expected {tuple(torch_want)}")
            continue
        if path in out and not np.array_equal(out[path], converted):
            misshaped.append(f"{key}: differs from its tied copy ({rule.torch} and aliases)")
            continue
        out[path] = converted
    missing = [" or ".join(table.torch_keys(p)[1]) for p in sorted(expected) if p not in out]
    if missing or unexpected or misshaped:
        parts = [f"{table.name} checkpoint does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                parts.append(_listing(title, items))
        raise CheckpointError("\n".join(parts))
    return out


def export_state(table: KeyTable, flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat NNX params (dotted path -> array) -> torch state dict in the table's layout."""
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        rule, keys = table.torch_keys(path)
        # Writable and C-contiguous: torch.from_numpy warns on read-only views of device arrays.
        tensor = np.require(rule.transform.to_torch(np.asarray(value)), requirements=["C", "W"])
        for key in keys:
            out[key] = tensor
    return out


def abstract_params(factory: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """Build a module's graph and parameter shapes without allocating or initialising weights."""
    return nnx.split(nnx.eval_shape(factory))


def param_shapes(state: nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def merge_params(
    graphdef: nnx.GraphDef, state: nnx.State, flat: Mapping[str, np.ndarray], dtype: jnp.dtype
) -> nnx.Module:
    """Fill an abstract state with converted arrays (keeping each Param's metadata) and merge."""
    for p, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(flat[path_str(p)], dtype=dtype))
    return nnx.merge(graphdef, state)


def model_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """A module's parameters as a flat dict of host arrays (dotted path -> np.ndarray)."""
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
