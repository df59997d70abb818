"""bf16 master weights: stochastic rounding of each update (``optim.master_dtype: bf16``).

Round-to-nearest in bf16 (8 bits of mantissa) drops any update smaller than half an ulp of the weight: at
``|w| ~ 1`` that is 2**-8 ~ 0.004, far above a typical ``lr * step``, so a bf16 master simply stops moving. Stochastic
rounding rounds ``p + u`` (summed in fp32) up with probability equal to its fractional distance between the two
neighbouring bf16 values, so ``E[round(x)] = x`` exactly and small updates accumulate on average.

The trick: a bf16 value is the upper 16 bits of an fp32. Adding 16 uniform random bits to the fp32's lower 16 bits
and truncating them carries into bit 16 with probability ``low16 / 2**16``, which is exactly the fractional
distance (fp32 is sign-magnitude, so the same holds for negative values, rounding their magnitude).

Reproducibility: the random bits come from ``jax.random.bits`` keyed by the step's key folded with a fixed stream tag
and a CRC of each param's tree path, so a run and its resume round identically. Under ``jit`` the bits are produced
with the param's shape inside the step, so XLA gives them the param's sharding. Their *values* do not depend on the
sharding or the device count; with ``jax_threefry_partitionable`` (the default since JAX 0.5) each chip also
generates only its own shard instead of the whole array (tested on 8 fake CPU devices).
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Folded into the step key so the rounding bits are a stream of their own (the step splits the same key for the
# timestep / noise / dropout draws).
_ROUNDING_STREAM = 0x5352  # "SR"


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """``x`` (fp32) rounded to bf16, up with probability equal to the fractional distance to the next bf16 value."""
    x = x.astype(jnp.float32)
    noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    high = ((bits + noise) >> 16).astype(jnp.uint16)
    rounded = jax.lax.bitcast_convert_type(high, jnp.bfloat16)
    # A NaN whose payload sits only in the low bits would carry into an Inf pattern; keep it NaN. Finite values past
    # bf16's largest round to Inf with their probability, as round-to-nearest would for the same values.
    return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, jnp.bfloat16), rounded)


def path_id(path: tuple[Any, ...]) -> int:
    """A stable 31-bit id of a tree path (Python's ``hash`` is salted per process; CRC32 is not)."""
    return zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF


def apply_updates(params: Any, updates: Any, key: jax.Array, master_dtype: str) -> Any:
    """``params + updates``, the drop-in for ``optax.apply_updates`` that honours ``optim.master_dtype``.

    fp32: exactly ``optax.apply_updates`` (the sum rounded to each param's own dtype). bf16: every bf16 param gets
    ``p + u`` summed in fp32 and rounded stochastically, with bits keyed by ``key`` (the step's key: derived from the
    run's seed and the step) and the param's path; params of other dtypes are added as optax would. A zero update
    leaves a param bit-identical (its sum is exactly representable), so MultiSteps' skipped micro-steps are no-ops.
    """
    if master_dtype == "fp32":
        return optax.apply_updates(params, updates)
    if master_dtype != "bf16":
        raise ValueError(f"unknown master_dtype {master_dtype!r}")
    key = jax.random.fold_in(key, _ROUNDING_STREAM)

    def one(path: tuple[Any, ...], p: jax.Array, u: jax.Array | None) -> jax.Array:
        if u is None:
            return p
        if p.dtype != jnp.bfloat16:
            return jnp.asarray(p + u).astype(p.dtype)
        return stochastic_round_bf16(
            p.astype(jnp.float32) + u.astype(jnp.float32), jax.random.fold_in(key, path_id(path))
        )

    return jax.tree_util.tree_map_with_path(one, params, updates, is_leaf=lambda x: x is None)


def master_params(params: Any, master_dtype: str) -> Any:
    """The trainable params as stored for ``master_dtype``: float leaves cast to bf16 for bf16, unchanged for fp32."""
    if master_dtype == "fp32":
        return params

    def cast(p: Any) -> Any:
        return p.astype(jnp.bfloat16) if jnp.issubdtype(p.dtype, jnp.floating) else p

    return jax.tree.map(cast, params)
