"""Logical axis names and the rule table that maps them onto the mesh axes: plain data, no JAX.

Model code never names mesh axes. Every parameter carries a tuple of *logical* axis names in its
variable metadata (``nnx.Param(value, logical_axes=("embed", "mlp"))``) and activations are annotated
with ``flux_jax.sharding.constrain``. One small rule table (``DEFAULT_RULES``, overridable from ``mesh.rules``
in the run config) maps logical names to the mesh axes ``("data", "fsdp", "tensor")``. The run config checks
its rules and mesh sizes with the functions here, so parsing a config never imports JAX.

Parameter names: ``layers`` (stacked block axis, never sharded), ``embed`` (hidden width), ``qkv``
(fused q/k/v output), ``mlp`` (MLP width; fused single-block linear1 output / linear2 input), ``mod``
(modulation outputs), ``heads``, ``head_dim``, ``in_feat`` (small embedder input dims), ``lora_rank``,
``lora_feature`` (the extra split of a LoRA feature dim, below).
Activation names: ``act_batch``, ``act_seq``, ``act_embed``, ``act_heads``, ``act_mlp``.

A dim may also carry a tuple of names (a *composite* dim): its mesh axes are those of each name in turn, so
``("qkv", "lora_feature")`` under the default rules is split over ``("tensor", "fsdp")``. LoRA adapters label
their feature dims this way (A ``[layers?, in, r]``: ``(layers, (<kernel's in axis>, "lora_feature"),
"lora_rank")``; B likewise on its out dim), so an adapter follows its kernel's layout and is split over fsdp too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flux_jax.errors import FluxJaxError

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
LogicalDim = str | tuple[str, ...] | None
"""One dim's logical name, a tuple of names (composite: their mesh axes in turn), or None (replicated)."""

# Logical name -> mesh axis. Names mapped to None (layers, head_dim, in_feat, lora_rank, act_seq,
# act_embed) are replicated. Sharding "embed" over fsdp is what spreads the 12B base across chips;
# the tensor axis takes the wide output dims so q/k/v, MLP and modulation matmuls split without a
# gather of the weight. "lora_feature" is added after the kernel's own axes on an adapter's feature
# dim: the LoRA params and their optimizer state (ZeRO-style) are split over fsdp on whichever side of
# the adapter faces a tensor-sharded or replicated kernel axis too, instead of being replicated there.
# After the kernel's axes, not before: B of qkv is [r, qkv] over ("tensor", "fsdp"), so gathering it
# over fsdp yields exactly the tensor block of columns the qkv kernel (and its output) holds on a chip.
# Mapping it to None restores fully kernel-following (partly replicated) adapters.
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
    ("lora_feature", "fsdp"),
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
        for axis in mesh_axes_of(target):
            if axis not in mesh_axes:
                raise ShardingError(f"rule {name!r} -> {target!r} names unknown mesh axis {axis!r}")


def dim_names(dim: LogicalDim) -> tuple[str, ...]:
    """The logical names of one dim (a composite dim has several, None has none)."""
    if dim is None:
        return ()
    if isinstance(dim, str):
        return (dim,)
    return tuple(dim)


def mesh_axes_of(target: MeshAxes) -> tuple[str, ...]:
    """A rule's target as a tuple of mesh axis names (None: replicated)."""
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)
