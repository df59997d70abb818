"""The Flax side of every base checkpoint: the model's parameter tree and, per leaf, where its data comes from.

`flax_layer_sources` maps each leaf of `nnx.state(Flux)` (kernels [in, out], stacked blocks [layers, in, out]) to
the per-layer BFL tensors it is made of, through the key table; `abstract_model` is the model with shapes only.
Loading, the Flax checkpoint writer and the converter all read the tree this way.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax.dtypes import storage_dtype
from flux_jax.model.config import FluxConfig
from flux_jax.model.flux import Flux
from flux_jax.weights import flux_keys
from flux_jax.weights.sources import Source, Stacked, Transposed

StatePath = tuple[str | int, ...]


def abstract_model(cfg: FluxConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, **kw) -> Flux:
    """The model with ShapeDtypeStructs instead of arrays: free to build even at 12B parameters."""
    return nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype, **kw))


def flax_layer_sources(cfg: FluxConfig, bfl: dict[str, Source]) -> dict[tuple, tuple[bool, list[Source]]]:
    """Per Flax leaf: (stacked?, its per-layer sources in the Flax layout: kernels transposed to [in, out])."""
    out: dict[tuple, tuple[bool, list[Source]]] = {}
    for path, entry, suffix in flux_keys.flax_leaves(cfg):
        per_layer = []
        for i in flux_keys.layer_indices(cfg, entry):
            src = bfl[f"{flux_keys.fill(entry.bfl, i)}.{suffix}"]
            per_layer.append(Transposed(src) if suffix == "weight" else src)
        out[path] = (entry.stack is not None, per_layer)
    return out


def flax_sources(cfg: FluxConfig, bfl: dict[str, Source]) -> dict[tuple, Source]:
    """One lazy source per Flax leaf, in the Flax layout (kernels transposed, blocks stacked)."""
    return {
        path: Stacked(layers) if stacked else layers[0]
        for path, (stacked, layers) in flax_layer_sources(cfg, bfl).items()
    }


def expected_leaves(cfg: FluxConfig, dtype) -> dict[StatePath, tuple[tuple[int, ...], np.dtype]]:
    """(shape, stored dtype) of every parameter leaf of the model, from its abstract (shape-only) build."""
    return {
        path: (tuple(var.get_value().shape), storage_dtype(path, dtype))
        for path, var in nnx.state(abstract_model(cfg)).flat_state()
    }
