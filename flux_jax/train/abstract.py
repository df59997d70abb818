"""The trainer's compiled step with shapes only: what ``flux-jax plan`` compiles for a TPU it does not have.

``abstract_step(cfg, mesh, model_config=)`` builds everything ``loop.setup`` builds for the step, from the same
functions (``build.lora_model``, ``state.split_trainable`` / ``state_shardings_for``, ``build_optimizer``,
``Objective``, ``StepCompiler``), but under ``nnx.eval_shape`` / ``jax.eval_shape``: the 12B base and the optimizer
state exist as ShapeDtypeStructs carrying the shardings the trainer would give them, so nothing is allocated and the
mesh may be made of compile-only devices (``jax.experimental.topologies``). ``AbstractStep.compile`` then lowers and
compiles the very ``train_step`` executable the trainer runs. With ``encoders.online`` that step includes T5 and
CLIP (``data.encoding.abstract_text_towers``, sharded as ``loop.online_text`` places them): their weights are
step arguments and their forward passes part of the step's memory and FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flux_jax.axes import Rules
from flux_jax.data.encoding import abstract_text_towers, text_tower_configs
from flux_jax.flow import packed_seq_len
from flux_jax.model.config import FluxConfig
from flux_jax.run_config import RunConfig
from flux_jax.sharding import state_shardings, use_mesh
from flux_jax.train.build import Adapters, lora_model, with_attention
from flux_jax.train.memory import AUTO, RematSearch
from flux_jax.train.objective import Objective
from flux_jax.train.optim import build_optimizer
from flux_jax.train.state import (
    TrainState,
    abstract_like,
    abstract_state,
    flat_params,
    split_trainable,
    state_shardings_for,
    trainable_for,
)
from flux_jax.train.step import StepCompiler, check_batch_split

# What the data pipeline caches (flux_jax.data; `flux-jax cache` stores bf16): latents, T5 states and the
# pooled CLIP vector in bf16; BatchIterator adds image position ids in fp32.
BATCH_DTYPES = {"latents": jnp.bfloat16, "t5": jnp.bfloat16, "clip": jnp.bfloat16, "img_ids": jnp.float32,
                "t5_ids": jnp.int32, "clip_ids": jnp.int32}  # fmt: skip
CLIP_TOKENS = 77


@dataclasses.dataclass(frozen=True)
class AbstractStep:
    """The step compiler of a run and the abstract (sharded) arguments to compile it with."""

    compiler: StepCompiler
    state: TrainState
    """ShapeDtypeStructs with the state's shardings."""
    frozen: nnx.State
    """The frozen base (and LoRA masks) as ShapeDtypeStructs with their shardings."""
    model_config: FluxConfig
    mesh: Mesh
    rules: Rules
    adapted: tuple[str, ...]
    attention: str
    """The attention kernel the step runs (``model.attention`` resolved for the mesh's devices)."""
    notes: tuple[str, ...] = ()
    """Why ``model.attention: auto`` fell back to xla, when it did."""

    def batch(self, *, batch_size: int, grad_accum: int, resolution: int, text_len: int) -> dict[str, Any]:
        """The abstract batch of the data pipeline: [micro, rows, ...] leaves, square ``resolution`` images."""
        cfg = self.model_config
        tokens = packed_seq_len(resolution, resolution)
        micro, rows = grad_accum, batch_size // grad_accum
        shapes = {"latents": (micro, rows, tokens, cfg.in_channels), "img_ids": (micro, rows, tokens, 3)}
        if self.compiler.encoders is not None:  # online: token ids, encoded in the step
            shapes.update(t5_ids=(micro, rows, text_len), clip_ids=(micro, rows, CLIP_TOKENS))
        else:
            shapes.update(t5=(micro, rows, text_len, cfg.context_in_dim), clip=(micro, rows, cfg.vec_in_dim))
        sharding = self.compiler.batch_sharding
        return {k: jax.ShapeDtypeStruct(s, BATCH_DTYPES[k], sharding=sharding) for k, s in shapes.items()}

    def compile(self, batch: dict[str, Any]) -> jax.stages.Compiled:
        """Lower and compile the train step for ``batch`` (the trainer's first call does exactly this)."""
        with use_mesh(self.mesh, self.rules):
            return self.compiler.compile(self.state, batch)


def _sds(x: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_step(
    cfg: RunConfig, mesh: Mesh, *, model_config: FluxConfig, remat: RematSearch | None = None
) -> AbstractStep:
    """The run's step compiler and abstract arguments on ``mesh`` (see the module docstring).

    ``model_config`` is the base's architecture (a loaded base's config comes from its checkpoint, which the
    planner need not have): the base is built as a random base of that shape, which has the same parameter
    dtypes and shardings as a loaded one (both store through ``dtypes.storage_dtype``). ``remat``: how
    ``model.remat: auto`` is searched (ignored for a fixed policy; by default with no capacity limit). The
    attention kernel is resolved for the mesh's devices, as the trainer resolves it for its own: a mesh of
    compile-only TPU devices gets the kernel a TPU run would use.
    """
    if cfg.model.remat == AUTO and remat is None:
        remat = RematSearch(capacity=None)  # no capacity given: the first candidate ("none") fits
    rules = cfg.mesh.rules
    model_cfg, why = with_attention(cfg.model, model_config, device=mesh.devices.flat[0])
    check_batch_split(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    seed = cfg.train.seed
    adapters = None if cfg.train.mode == "full" else Adapters.from_config(cfg.lora)
    adapted: list[str] = []

    def make() -> nnx.Module:
        model, adapted[:] = lora_model(model_config, model_cfg, adapters, seed=seed)
        return model

    with use_mesh(mesh, rules):
        model = nnx.eval_shape(make)  # the trainer's own builder, traced for shapes only
    graphdef, lora_state, frozen = split_trainable(model, trainable_for(cfg.train))
    # The trainer places every variable by its logical axes; the same function on shapes.
    frozen = jax.tree.map(_sds, frozen, state_shardings(frozen, mesh, rules))
    lora_sh = flat_params(state_shardings(lora_state, mesh, rules))
    lora = {k: _sds(v, lora_sh[k]) for k, v in flat_params(lora_state).items()}
    template = jax.tree.map(_sds, lora_state)

    notes = [] if why is None else [why]
    text = encoders = None
    if cfg.encoders.online:
        t5_config, clip_config, note = text_tower_configs(cfg)
        text, encoders = abstract_text_towers(t5_config, clip_config, mesh=mesh, rules=rules, dtype=cfg.encoders.dtype)
        notes += [] if note is None else [note]
        per_chip = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(encoders))
        notes.append(f"encoders.online: the step runs T5 and CLIP ({per_chip / 2**30:.3f} GiB of their weights per "
                     "chip, in its arguments; their forward passes in its FLOPs)")  # fmt: skip
    tx = build_optimizer(cfg.optim, cfg.train.steps)
    ema = cfg.optim.ema_decay is not None
    shardings = state_shardings_for(tx, lora, mesh, ema=ema)
    state = abstract_like(abstract_state(tx, lora, seed=seed, ema=ema), shardings)
    compiler = StepCompiler(graphdef=graphdef, template=template, frozen=frozen, state_shardings=shardings, tx=tx,
                            objective=Objective.from_config(cfg.train), ema_decay=cfg.optim.ema_decay,
                            master_dtype=cfg.optim.master_dtype,
                            mesh=mesh, remat=remat if cfg.model.remat == AUTO else None, text=text,
                            encoders=encoders)  # fmt: skip
    return AbstractStep(compiler=compiler, state=state, frozen=compiler.abstract_frozen, model_config=model_config,
                        mesh=mesh, rules=rules, adapted=tuple(adapted), attention=model_cfg.attention,
                        notes=tuple(notes))  # fmt: skip
