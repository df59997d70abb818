"""Device mesh and logical-axis sharding.

Model code never names mesh axes. Every parameter carries a tuple of *logical* axis names in its
variable metadata (``nnx.Param(value, logical_axes=("embed", "mlp"))``) and activations are annotated
with :func:`constrain`. One small rule table (``DEFAULT_RULES``, overridable from ``mesh.rules`` in the
run config) maps logical names to the mesh axes ``("data", "fsdp", "tensor")``.

Parameter names: ``layers`` (stacked block axis, never sharded), ``embed`` (hidden width), ``qkv``
(fused q/k/v output), ``mlp`` (MLP width; fused single-block linear1 output / linear2 input), ``mod``
(modulation outputs), ``heads``, ``head_dim``, ``in_feat`` (small embedder input dims), ``lora_rank``.
Activation names: ``act_batch``, ``act_seq``, ``act_embed``, ``act_heads``, ``act_mlp``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flux_jax.errors import FluxJaxError

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# The variable metadata key that holds a parameter's logical axes. Kept behind this constant (and
# `logical_axes_of`) so a future flax rename touches one line; flax itself does not interpret it, so
# it never triggers flax's own eager sharding.
LOGICAL_AXES_KEY = "logical_axes"

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Logical name -> mesh axis. Names missing here (layers, head_dim, in_feat, lora_rank, act_seq,
# act_embed) are replicated. Sharding "embed" over fsdp is what spreads the 12B base across chips;
# the tensor axis takes the wide output dims so q/k/v, MLP and modulation matmuls split without a
# gather of the weight.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("mod", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("in_feat", None),
    ("lora_rank", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


# Every logical name the model may use. A name outside this set and outside the rules is an error, so
# a typo in model code fails loudly instead of silently replicating a 12B-parameter weight.
LOGICAL_AXES: frozenset[str] = frozenset(name for name, _ in DEFAULT_RULES)


class ShardingError(FluxJaxError):
    """A mesh shape, rule table or logical-axis annotation is invalid."""


# --------------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fill in the (at most one) ``-1`` so that data * fsdp * tensor == num_devices."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ShardingError(f"mesh.{name} must be a positive int or -1, got {size!r}")
    auto = [name for name, size in sizes.items() if size == -1]
    if len(auto) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got -1 for {', '.join(auto)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if auto:
        if num_devices % fixed:
            raise ShardingError(
                f"cannot fill mesh.{auto[0]}=-1: {num_devices} devices are not divisible by the product "
                f"{fixed} of the other axes ({sizes})"
            )
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(
            f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {fixed} does not match the {num_devices} "
            "devices; set one axis to -1 to fill it automatically"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Input batches: the leading (batch) dim is split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


# --------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec


def validate_rules(rules: Rules, mesh_axes: Sequence[str] = MESH_AXES) -> None:
    """Rules must name known mesh axes and map each logical name once (first-match would hide typos)."""
    seen: set[str] = set()
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ShardingError(f"a sharding rule must be (logical_name, mesh_axes), got {rule!r}")
        name, target = rule
        if name in seen:
            raise ShardingError(f"logical axis {name!r} appears in more than one sharding rule")
        seen.add(name)
        for axis in _as_tuple(target):
            if axis not in mesh_axes:
                raise ShardingError(f"rule {name!r} -> {target!r} names unknown mesh axis {axis!r}")


def _as_tuple(target: MeshAxes) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec for an array of ``shape`` whose dims carry the logical names ``axes``.

    Names without a rule (and ``None``) are replicated; names that are neither in ``rules`` nor in
    the ``LOGICAL_AXES`` vocabulary are an error. Dims are resolved left to right, and for a
    dim the mapped mesh axes are kept while the running product of their sizes still divides the dim
    size; an axis already used by an earlier dim is skipped, since a spec may use each mesh axis once.
    So a dim of 3072 under fsdp=8 shards, and a batch of 2 under (data=2, fsdp=4) shards over data only
    instead of failing to compile.
    """
    if len(axes) != len(shape):
        raise ShardingError(f"logical axes {tuple(axes)} do not match the rank of shape {tuple(shape)}")
    table = dict(rules)
    unknown = [name for name in axes if name is not None and name not in table and name not in LOGICAL_AXES]
    if unknown:
        raise ShardingError(f"unknown logical axis name(s) {unknown} in {tuple(axes)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(axes, shape, strict=True):
        kept: list[str] = []
        span = 1
        for axis in _as_tuple(table.get(name)) if name is not None else ():
            if axis not in mesh.shape:
                raise ShardingError(f"logical axis {name!r} maps to {axis!r}, which the mesh does not have")
            if axis in used or size % (span * mesh.shape[axis]):
                continue
            kept.append(axis)
            span *= mesh.shape[axis]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    # Trailing Nones are dropped so specs compare equal to the hand-written short form.
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
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
