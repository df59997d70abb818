"""Device mesh and logical-axis sharding: the JAX side of the rule table in ``flux_jax.axes``.

Parameters are placed by their logical axes (``state_shardings``), activations annotated with ``constrain``,
and input batches split over ``data`` x ``fsdp`` (``batch_sharding``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flux_jax.axes import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    MESH_AXES,
    LogicalDim,
    MeshAxes,
    Rules,
    ShardingError,
    dim_names,
    mesh_axes_of,
    resolve_mesh_shape,
    validate_rules,
)

log = logging.getLogger(__name__)


# The variable metadata key that holds a parameter's logical axes. Kept behind this constant (and
# `logical_axes_of`) so a future flax rename touches one line; flax itself does not interpret it, so
# it never triggers flax's own eager sharding.
LOGICAL_AXES_KEY = "logical_axes"

# --------------------------------------------------------------------------------------------------
# Mesh


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: every device of every host).

    ``mesh_utils.create_device_mesh`` orders devices so that the innermost axes (tensor, then fsdp) sit
    on the fastest physical links; it refuses shapes it cannot map onto a TPU topology and knows
    nothing about fake CPU devices, so those fall back to a plain reshape in device-id order.
    Multi-slice (DCN) meshes are not handled here.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ShardingError("no devices to build a mesh from")
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        log.warning("create_device_mesh(%s) failed (%s); using device-id order", shape, e)
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
    """Input batches: dim ``batch_dim`` (the examples) is split over data and fsdp, every other dim replicated.

    The encoders take [batch, ...]; the train step takes [micro-batch, rows, ...] (``batch_dim=1``: each
    micro-batch is spread over the mesh and gradient accumulation scans over the leading dim)."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_dim), ("data", "fsdp")))


def replicate(host: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array copied to every device of ``mesh``, on one host or many (each process fills its own devices
    from its own copy, which must be the same everywhere: prompts, noise drawn from a seed, schedules)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, PartitionSpec()), lambda index: host[index])


# --------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec


def logical_to_spec(axes: Sequence[LogicalDim], shape: Sequence[int], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec for an array of ``shape`` whose dims carry the logical names ``axes``.

    Names without a rule (and ``None``) are replicated; names that are neither in ``rules`` nor in
    the ``LOGICAL_AXES`` vocabulary are an error. A composite dim (a tuple of names) takes the mesh
    axes of each of its names in turn. Dims are resolved left to right, and for a
    dim the mapped mesh axes are kept while the running product of their sizes still divides the dim
    size; an axis already used by an earlier dim (or earlier in the same dim) is skipped, since a spec
    may use each mesh axis once. So a dim of 3072 under fsdp=8 shards, and a batch of 2 under (data=2,
    fsdp=4) shards over data only instead of failing to compile.
    """
    if len(axes) != len(shape):
        raise ShardingError(f"logical axes {tuple(axes)} do not match the rank of shape {tuple(shape)}")
    table = dict(rules)
    names = [name for dim in axes for name in dim_names(dim)]
    unknown = [name for name in names if name not in table and name not in LOGICAL_AXES]
    if unknown:
        raise ShardingError(f"unknown logical axis name(s) {unknown} in {tuple(axes)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, size in zip(axes, shape, strict=True):
        kept: list[str] = []
        span = 1
        for name in dim_names(dim):
            for axis in mesh_axes_of(table.get(name)):
                if axis not in mesh.shape:
                    raise ShardingError(f"logical axis {name!r} maps to {axis!r}, which the mesh does not have")
                if axis in used or axis in kept or size % (span * mesh.shape[axis]):
                    continue
                kept.append(axis)
                span *= mesh.shape[axis]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    # Trailing Nones are dropped so specs compare equal to the hand-written short form.
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_axes_of(variable: nnx.Variable) -> tuple[LogicalDim, ...] | None:
    """A variable's logical axes, or None when it has none (then it is replicated)."""
    axes = variable.get_metadata().get(LOGICAL_AXES_KEY)
    return None if axes is None else tuple(axes)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedShardings for every variable in ``abstract_state`` (from ``nnx.eval_shape`` + ``nnx.state``).

    The result has the same structure: each Variable is replaced by a copy whose value is its
    NamedSharding, which is what ``jax.jit(out_shardings=...)`` and ``jax.device_put`` expect for an
    ``nnx.State`` (the same convention as ``nnx.get_named_sharding``).
    """

    def one(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            axes = logical_axes_of(leaf)
            shape = tuple(leaf.get_value().shape)
            spec = PartitionSpec() if axes is None else logical_to_spec(axes, shape, rules, mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        if hasattr(leaf, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        return leaf

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --------------------------------------------------------------------------------------------------
# Activation constraints


@dataclasses.dataclass(frozen=True)
class _MeshContext:
    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...]


_ACTIVE: contextvars.ContextVar[_MeshContext | None] = contextvars.ContextVar("flux_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Make ``mesh`` and ``rules`` the target of :func:`constrain` (and jax's current mesh).

    Also enters ``jax.set_mesh`` so the mesh is part of jax's trace context: a function jitted and
    traced outside this block is then re-traced inside it instead of reusing the unconstrained trace.
    Trace (first call) jitted functions inside the block; changing only ``rules`` between calls of the
    same jitted function does not re-trace it.
    """
    rules = tuple((name, target) for name, target in rules)
    validate_rules(rules, tuple(mesh.axis_names))
    token = _ACTIVE.set(_MeshContext(mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh set by the innermost :func:`use_mesh`, or None outside one."""
    ctx = _ACTIVE.get()
    return None if ctx is None else ctx.mesh


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Pin an activation's sharding by logical axes; a no-op outside :func:`use_mesh`.

    The no-op keeps single-device CPU code (tests, parity checks) free of any mesh plumbing.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    spec = logical_to_spec(axes, x.shape, ctx.rules if rules is None else rules, ctx.mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def active_spec(axes: Sequence[str | None], shape: Sequence[int]) -> tuple[Mesh, PartitionSpec] | None:
    """(the current mesh, the PartitionSpec of an activation of ``shape`` with logical ``axes`` under its rules), or
    None outside :func:`use_mesh`; for code that must name its shards itself (``jax.shard_map`` around a kernel)."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return None
    return ctx.mesh, logical_to_spec(axes, shape, ctx.rules, ctx.mesh)
