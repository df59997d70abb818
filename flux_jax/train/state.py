"""What a training run carries from step to step (and checkpoints): never the base, only the LoRA side.

``TrainState`` holds the trainable LoRA params (a flat ``{module path: array}`` dict, fp32 masters by default),
the optimizer state over exactly those params, an optional EMA copy, the update count and the run's base PRNG
key. Everything has an explicit sharding on the mesh, so the jitted step can be compiled with matching
in/out shardings and donate the state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@struct.dataclass
class TrainState:
    step: jax.Array
    """int32 scalar: optimizer updates applied so far."""
    lora: dict[str, jax.Array]
    opt_state: optax.OptState
    ema: dict[str, jax.Array] | None
    """Exponential moving average of ``lora`` (None when optim.ema_decay is unset)."""
    rng: jax.Array
    """uint32 key data of the run's base key; step ``n`` uses ``fold_in(key, n)``."""


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_train_state(
    lora: dict[str, jax.Array], tx: optax.GradientTransformation, *, seed: int, ema: bool, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """A fresh state at step 0 and its shardings (a TrainState of NamedShardings).

    The optimizer state is created by a jitted ``tx.init`` so its moments inherit the params' shardings;
    leaves jax leaves unplaced on the mesh (scalar counters) are pinned replicated.
    """
    lora_sh = {k: v.sharding for k, v in lora.items()}
    opt_state = jax.jit(tx.init)(lora)
    repl = replicated(mesh)

    def on_mesh(x: Any) -> NamedSharding:
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else repl

    opt_sh = jax.tree.map(on_mesh, opt_state)
    shardings = TrainState(step=repl, lora=lora_sh, opt_state=opt_sh, ema=lora_sh if ema else None, rng=repl)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        lora=lora,
        opt_state=opt_state,
        # A copy, not an alias: the step donates the state, and ema must not share buffers with lora.
        ema=jax.tree.map(jnp.copy, lora) if ema else None,
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return jax.device_put(state, shardings), shardings


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings: an orbax restore target and an AOT-compile argument."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
