"""What a training run carries from step to step (and checkpoints): never the base, only the LoRA side.

``TrainState`` holds the trainable LoRA params (a flat ``{module path: array}`` dict, fp32 masters by default),
the optimizer state over exactly those params, an optional EMA copy, the update count and the run's base PRNG
key. Everything has an explicit sharding on the mesh, so the jitted step can be compiled with matching
in/out shardings and donate the state. ``state_shardings_for`` is the one place those shardings are decided: the
trainer places a fresh state with it and ``flux-jax plan`` compiles against it. The LoRA params' own shardings come
from their logical axes (``flux_jax.model.lora``, rule ``lora_feature``): split over fsdp along their feature dim, so
the params, the moments and the EMA each take about 1/fsdp of their size per chip (``state_bytes``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flux_jax.errors import ConfigError
from flux_jax.run_config import TrainConfig
from flux_jax.train.optim import opt_state_shardings

log = logging.getLogger(__name__)


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


LORA_TRAINABLE = nnx.LoRAParam


def full_trainable(patterns: tuple[str, ...]) -> nnx.filterlib.Filter:
    """``train.mode: full``'s trainable set: the base's ``nnx.Param`` leaves whose dotted path one of ``patterns``
    matches (``re.search``); every one of them when ``patterns`` is empty. A model with adapters would leave them
    out (they are ``LoRAParam``s), but a full-mode model has none: the trainer builds it without."""
    compiled = [re.compile(p) for p in patterns]

    def select(path: tuple, value: Any) -> bool:
        if not isinstance(value, nnx.Param) or isinstance(value, nnx.LoRAParam):
            return False
        name = ".".join(map(str, path))
        return not compiled or any(c.search(name) for c in compiled)

    return select


def trainable_for(train: TrainConfig) -> nnx.filterlib.Filter:
    """The run's trainable set: the adapters (``train.mode: lora``) or the base params ``train.trainable`` selects."""
    return full_trainable(train.trainable) if train.mode == "full" else LORA_TRAINABLE


def split_trainable(
    model: nnx.Module, trainable: nnx.filterlib.Filter = LORA_TRAINABLE
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else). Trainability is an nnx filter: the variable type
    ``nnx.LoRAParam`` for LoRA training, :func:`full_trainable` for full fine-tuning."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    if trainable is not LORA_TRAINABLE and not jax.tree.leaves(params):
        raise ConfigError("nothing to train: no parameter path matches train.trainable", key="train.trainable")
    return graphdef, params, rest


def flat_params(state: nnx.State) -> dict[str, Any]:
    """An nnx.State as ``{"double_blocks.img_attn.qkv.lora.lora_a": array}``: the optimizer's and checkpoint's tree.

    A flat dict of string keys keeps the optimizer state and the orbax checkpoint independent of nnx's
    container types (and readable: the keys are the module paths of `flux_jax.model.lora`).
    """
    return {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def unflatten(template: nnx.State, flat: dict[str, Any]) -> nnx.State:
    """Inverse of :func:`flat_params`, given a (possibly abstract) state of the same structure."""
    return nnx.from_flat_state(
        {path: var.replace(flat[".".join(map(str, path))]) for path, var in nnx.to_flat_state(template)}
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings_for(tx: optax.GradientTransformation, lora: dict[str, Any], mesh: Mesh, *, ema: bool) -> TrainState:
    """The shardings of a run's TrainState (a TrainState of NamedShardings), from the LoRA params' own shardings.

    ``lora`` holds arrays or ShapeDtypeStructs that carry shardings. Every params-shaped tree in the optimizer
    state (Adam's moments, Lion's momentum, Adafactor's unfactored second moment, MultiSteps' accumulator) takes its
    param's sharding and Adafactor's row / column statistics the param's spec without the averaged-out dim
    (`optim.opt_state_shardings`); everything else (scalar counters) is replicated. Left to the compiler,
    ``tx.init``'s zeros would come out replicated on every chip. Only shapes are needed, so the trainer and the
    planner get the same answer.
    """
    repl = replicated(mesh)

    lora_sh = {k: v.sharding for k, v in lora.items()}
    _note_unsplit(lora_sh, lora, mesh)
    opt_sh = opt_state_shardings(tx, lora, mesh)
    return TrainState(step=repl, lora=lora_sh, opt_state=opt_sh, ema=lora_sh if ema else None, rng=repl)


def _note_unsplit(shardings: dict[str, Any], lora: dict[str, Any], mesh: Mesh) -> None:
    """Log (once per state) the trainable params that stay whole on every fsdp chip: their feature dim is not divisible
    by the fsdp size (or ``mesh.rules`` maps ``lora_feature`` elsewhere)."""
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp == 1:
        return
    whole = [k for k, s in shardings.items() if "fsdp" not in _spec_axes(s)]
    if whole:
        size = sum(math.prod(lora[k].shape) * np.dtype(lora[k].dtype).itemsize for k in whole)
        names = ", ".join(f"{k} {list(lora[k].shape)}" for k in whole[:4]) + (" ..." if len(whole) > 4 else "")
        log.info("%d of %d trainable params (%.2f MiB) are not split over fsdp=%d, nor their optimizer state: %s",
                 len(whole), len(shardings), size / 2**20, fsdp, names)  # fmt: skip


def _spec_axes(sharding: Any) -> set[str]:
    if not isinstance(sharding, NamedSharding):
        return set()
    return {a for entry in sharding.spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes of a TrainState (LoRA params, optimizer state, EMA, counters) on one chip, and were it replicated."""

    per_chip: int
    replicated: int


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (the shard shape of each leaf
    from its sharding; a leaf without one counts whole)."""

    def one(x: Any) -> int:
        sharding = getattr(x, "sharding", None)
        shape = tuple(x.shape) if sharding is None else sharding.shard_shape(tuple(x.shape))
        return math.prod(shape) * np.dtype(x.dtype).itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


def state_bytes(state: TrainState) -> StateBytes:
    """``state``'s per-chip bytes under its shardings and its full size (what each chip holds when replicated)."""
    full = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    return StateBytes(per_chip=per_device_bytes(state), replicated=full)


def abstract_state(tx: optax.GradientTransformation, lora: dict[str, Any], *, seed: int, ema: bool) -> TrainState:
    """The TrainState's shapes and dtypes (no shardings): what ``init_train_state`` creates, without creating it."""
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        lora={k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in lora.items()},
        opt_state=jax.eval_shape(tx.init, lora),
        ema={k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in lora.items()} if ema else None,
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(seed))),
    )


def init_train_state(
    lora: dict[str, jax.Array], tx: optax.GradientTransformation, *, seed: int, ema: bool, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """A fresh state at step 0 and its shardings (``state_shardings_for``)."""
    shardings = state_shardings_for(tx, lora, mesh, ema=ema)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        lora=lora,
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(lora),
        # A copy, not an alias: the step donates the state, and ema must not share buffers with lora.
        ema=jax.tree.map(jnp.copy, lora) if ema else None,
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return jax.device_put(state, shardings), shardings


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings: an orbax restore target and an AOT-compile argument."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
