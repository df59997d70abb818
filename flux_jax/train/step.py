"""The training step: a pure module-level function, compiled once per batch shape with explicit shardings.

``train_step(graphdef, template, frozen, state, batch, tx=, objective=, ema_decay=)`` merges the frozen base
and the current LoRA params into the model, runs ``micro`` micro-batches (gradient accumulation by
``lax.scan``; ``batch`` leaves are [micro, rows, ...]), averages their gradients, applies one optimizer update
and the EMA, and returns the new state and scalar metrics (loss, gradient norm, and whether every new LoRA
parameter is finite). Only the LoRA params are differentiated; the base
is an argument that is never donated and never changes.

With ``encoders.online`` the batch holds T5 / CLIP token ids (``t5_ids``, ``clip_ids``) and ``text`` (a
``TextTowers``) turns each micro-batch's ids into the states the transformer takes, from the frozen encoder weights
``encoders`` (another never-donated argument, sharded like the base; not in the state, so never in the optimizer or
a checkpoint), before the loss: the same states, in the same dtypes, as a cache of states would hold.

``StepCompiler`` binds the static parts with ``functools.partial``, jits with in/out shardings and the state
donated, compiles ahead of time (so memory analysis is available before step 1) and caches one executable per
batch shape; calling an executable with other shapes or shardings is an error, never a silent recompile.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from flux_jax.data.encoding import TextTowers
from flux_jax.errors import ConfigError
from flux_jax.model.lora import seed_dropout, set_lora_training
from flux_jax.sharding import batch_sharding
from flux_jax.train.memory import RematSearch, choose, memory_summary, with_remat
from flux_jax.train.objective import Objective, flow_loss
from flux_jax.train.rounding import apply_updates
from flux_jax.train.state import TrainState, abstract_like, replicated, unflatten

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]


def _loss(
    lora: dict[str, jax.Array],
    frozen: nnx.State,
    batch: Batch,
    sample_keys: jax.Array,
    dropout_key: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    template: nnx.State,
    objective: Objective,
) -> jax.Array:
    # copy=True: fresh Variables of this trace level, which seed_dropout may write (the inputs' may not be).
    model = nnx.merge(graphdef, unflatten(template, lora), frozen, copy=True)
    seed_dropout(model, dropout_key)  # a no-op unless lora.dropout > 0
    return flow_loss(model, batch, sample_keys, objective)


def train_step(
    graphdef: nnx.GraphDef,
    template: nnx.State,
    frozen: nnx.State,
    state: TrainState,
    batch: Batch,
    encoders: dict[str, nnx.State] | None = None,
    *,
    tx: optax.GradientTransformation,
    objective: Objective,
    ema_decay: float | None,
    master_dtype: str = "fp32",
    text: TextTowers | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over ``micro`` micro-batches (see the module docstring)."""
    micro, rows = batch["latents"].shape[:2]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    sample_key, dropout_key = jax.random.split(key)
    # One key per sample of the global batch, indexed by its position: independent of micro/device splits.
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(sample_key, i))(jnp.arange(micro * rows))
    sample_keys = sample_keys.reshape(micro, rows)
    dropout_keys = jax.random.split(dropout_key, micro)
    grad_fn = jax.value_and_grad(functools.partial(_loss, graphdef=graphdef, template=template, objective=objective))

    def one(mb: Batch, keys: jax.Array, dkey: jax.Array):
        if text is not None:  # online: this micro-batch's captions encoded here, inside the step
            mb = encode_text(text, encoders, mb)
        return grad_fn(state.lora, frozen, mb, keys, dkey)

    if micro == 1:
        loss, grads = one(jax.tree.map(lambda x: x[0], batch), sample_keys[0], dropout_keys[0])
    else:

        def accumulate(carry, xs):
            loss_sum, grad_sum = carry
            loss, grads = one(*xs)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.lora)
        (loss, grads), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros), (batch, sample_keys, dropout_keys)
        )
        loss = loss / micro
        grads = jax.tree.map(lambda g: g / micro, grads)

    if master_dtype == "fp32":
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.lora)
    # bf16 masters (optim.master_dtype): the fp32 gradients go to the optimizer, whose state and updates are fp32,
    # and each update is rounded into its bf16 weight stochastically, keyed by this step's key.
    updates, opt_state = tx.update(grads, state.opt_state, state.lora)
    lora = apply_updates(state.lora, updates, key, master_dtype)
    ema = state.ema
    if ema is not None:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p.astype(e.dtype), ema, lora)
    new_state = state.replace(step=state.step + 1, lora=lora, opt_state=opt_state, ema=ema)
    # One flag over the new params (and EMA): a checkpoint is good only if they are all finite.
    finite = jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves((lora, ema))]).all()
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite}


def eval_loss(
    graphdef: nnx.GraphDef,
    template: nnx.State,
    frozen: nnx.State,
    lora: dict[str, jax.Array],
    batch: Batch,
    key: jax.Array,
    *,
    objective: Objective,
) -> jax.Array:
    """The loss of ``lora`` on one batch ([rows, ...] leaves) with fixed randomness from ``key``: no update.

    Sample ``i`` draws from ``fold_in(key, i)`` as in ``train_step``, so a fixed key gives a fixed noise/t draw
    to compare parameters on (validation loss, the tests' "the loss fell").
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch["latents"].shape[0]))
    model = nnx.merge(graphdef, unflatten(template, lora), frozen, copy=True)
    set_lora_training(model, False)  # no LoRA dropout when measuring
    return flow_loss(model, batch, keys, objective)


def encode_text(text: TextTowers, encoders: dict[str, nnx.State], batch: Batch) -> Batch:
    """``batch`` with its token ids replaced by the text states they encode to (T5 and CLIP frozen)."""
    t5, clip = text(encoders, batch["t5_ids"], batch["clip_ids"])
    rest = {k: v for k, v in batch.items() if k not in ONLINE_TEXT_KEYS}
    return {**rest, "t5": t5, "clip": clip}


STEP_KEYS = ("latents", "t5", "clip", "img_ids")
ONLINE_TEXT_KEYS = ("t5_ids", "clip_ids")
ONLINE_STEP_KEYS = ("latents", *ONLINE_TEXT_KEYS, "img_ids")


def step_keys(online: bool) -> tuple[str, ...]:
    """The batch keys the step takes: token ids instead of text states with ``encoders.online``."""
    return ONLINE_STEP_KEYS if online else STEP_KEYS


def check_batch_split(batch_size: int, grad_accum: int, mesh: Mesh, process_count: int = 1) -> None:
    """The batch layout rule: each micro-batch's rows split evenly over mesh.data x mesh.fsdp (and hosts)."""
    rows = batch_size // grad_accum
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % split:
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {rows} samples per micro-batch cannot be split over "
            f"mesh.data x mesh.fsdp = {split} devices; make it a multiple of {split}",
            key="train.batch_size",
        )
    if (batch_size // process_count) % grad_accum:
        raise ConfigError(
            f"train.batch_size {batch_size} over {process_count} hosts leaves {batch_size // process_count} rows "
            f"per host, which train.grad_accum {grad_accum} does not divide",
            key="train.batch_size",
        )


def micro_batches(batch: dict[str, Any], micro: int, keys: tuple[str, ...] = STEP_KEYS) -> dict[str, Any]:
    """A host's rows ``[R, ...]`` -> the step's layout ``[micro, R / micro, ...]``, keeping only the step's keys.

    Host rows are cut into ``micro`` contiguous chunks; global micro-batch m is chunk m of every host.
    """
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)})")
    rows = batch["latents"].shape[0]
    if rows % micro:
        raise ValueError(f"{rows} rows per host cannot be cut into {micro} micro-batches")
    return {k: batch[k].reshape(micro, rows // micro, *batch[k].shape[1:]) for k in keys}


class StepCompiler:
    """Compiled train steps for one (model, optimizer, objective), one executable per batch shape.

    ``remat``: with a ``RematSearch`` (``model.remat: auto``) the first compile tries the remat policies and keeps
    the first that fits (``flux_jax.train.memory.choose``); every later batch shape compiles with that policy.
    ``remat_policy`` and ``remat_options`` then say what was chosen among what.

    ``text`` and ``encoders`` (``encoders.online``): T5 / CLIP's graphs and their placed (or, planning, abstract)
    weights; the executables then take them as a fourth argument, which ``__call__`` passes itself."""

    def __init__(
        self,
        *,
        graphdef: nnx.GraphDef,
        template: nnx.State,
        frozen: nnx.State,
        state_shardings: TrainState,
        tx: optax.GradientTransformation,
        objective: Objective,
        ema_decay: float | None,
        mesh: Mesh,
        master_dtype: str = "fp32",
        step_fn: Callable[..., Any] = train_step,
        remat: RematSearch | None = None,
        text: TextTowers | None = None,
        encoders: dict[str, nnx.State] | None = None,
    ):
        if (text is None) != (encoders is None):
            raise ValueError("StepCompiler: text and encoders come together")
        self.mesh = mesh
        self.keys = step_keys(text is not None)
        self.encoders = encoders
        self.encoder_shardings = None if encoders is None else jax.tree.map(lambda x: x.sharding, encoders)
        self.abstract_encoders = None if encoders is None else abstract_like(encoders, self.encoder_shardings)
        self.graphdef, self.template, self.objective = graphdef, template, objective
        self.frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        self.abstract_frozen = abstract_like(frozen, self.frozen_shardings)
        self.state_shardings = state_shardings
        self.batch_sharding = batch_sharding(mesh, batch_dim=1)  # leaves are [micro, rows, ...]
        online = {} if text is None else {"text": text}
        self._bind = functools.partial(
            step_fn, tx=tx, objective=objective, ema_decay=ema_decay, master_dtype=master_dtype, **online
        )
        self.traces = 0  # how often jax traced the step (the Python body runs only while tracing)
        self.remat_search = remat
        self.remat_policy: str | None = None if remat is not None else graphdef_remat(graphdef, template, frozen)
        self.remat_options: tuple = ()
        self.jitted = None if remat is not None else self._jit(graphdef)
        self.executables: dict[tuple, jax.stages.Compiled] = {}

    def _jit(self, graphdef: nnx.GraphDef):
        bound = functools.partial(self._bind, graphdef, self.template)

        def fn(frozen, state, batch, *encoders):
            self.traces += 1
            return bound(frozen, state, batch, *encoders)

        shardings = (self.frozen_shardings, self.state_shardings, self.batch_sharding)
        if self.encoders is not None:
            shardings += (self.encoder_shardings,)
        return jax.jit(
            fn,
            in_shardings=shardings,
            out_shardings=(self.state_shardings, replicated(self.mesh)),
            donate_argnums=(1,),
        )

    @staticmethod
    def signature(batch: dict[str, Any]) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    def compile(self, abstract_state: TrainState, abstract_batch: dict[str, jax.ShapeDtypeStruct]):
        """The executable for this batch shape, compiling it (and logging its memory) the first time."""
        key = self.signature(abstract_batch)
        if key not in self.executables:
            args = (self.abstract_frozen, abstract_state, abstract_batch)
            if self.encoders is not None:
                args += (self.abstract_encoders,)
            if self.jitted is None:  # remat auto, not chosen yet: this compile decides
                jitted = {}

                def compile_policy(policy: str):
                    graphdef = with_remat(self.graphdef, (self.template, self.abstract_frozen), policy)
                    jitted[policy] = self._jit(graphdef)
                    return jitted[policy].lower(*args).compile()

                self.remat_policy, compiled, self.remat_options = choose(compile_policy, self.remat_search)
                self.jitted = jitted[self.remat_policy]
            else:
                compiled = self.jitted.lower(*args).compile()
            log_memory(compiled, key)
            self.executables[key] = compiled
        return self.executables[key]

    def has_executable(self, batch: dict[str, Any]) -> bool:
        """Whether a batch of this shape runs without compiling first."""
        return self.signature(batch) in self.executables

    def abstract_batch(self, batch: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in batch.items()}

    def __call__(self, frozen: nnx.State, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = self.signature(batch)
        compiled = self.executables.get(key)
        if compiled is None:
            compiled = self.compile(abstract_like(state, self.state_shardings), self.abstract_batch(batch))
        if self.encoders is not None:
            return compiled(frozen, state, batch, self.encoders)
        return compiled(frozen, state, batch)


def graphdef_remat(graphdef: nnx.GraphDef, *states: Any) -> str | None:
    """The remat policy a graph definition was built with (None for a model without one, e.g. a test's toy)."""
    return getattr(nnx.merge(graphdef, *states), "remat", None)


def log_memory(compiled: jax.stages.Compiled, signature: tuple) -> None:
    mem = memory_summary(compiled)
    shapes = ", ".join(f"{k} {list(s)}" for k, s, _ in signature)
    if mem is None:
        log.info("compiled train step for %s (no memory analysis on this backend)", shapes)
        return
    log.info(
        "compiled train step for %s; per-device memory: %.3f GiB total (arguments %.3f, outputs %.3f, "
        "temporaries %.3f, donated aliases %.3f, code %.3f)",
        shapes,
        mem["total"],
        mem["argument"],
        mem["output"],
        mem["temp"],
        mem["alias"],
        mem["generated_code"],
    )
