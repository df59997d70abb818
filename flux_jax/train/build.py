"""The model the trainer trains: a frozen Flux base, sharded over the mesh from birth, with LoRA adapters attached.

The base is either loaded (``model.base``: any checkpoint ``flux_jax.load_flux`` reads; every device shard is read
straight into place) or, for tests, smoke runs and benchmarks (``model.base: ""`` + ``model.preset``), created
randomly by one jitted function whose ``out_shardings`` are derived from the abstract model, so even the
full-size random model never exists unsharded. The adapters are created the same way (see ``build_model``).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flux_jax.axes import Rules
from flux_jax.dtypes import DTYPES, storage_dtype
from flux_jax.lora import LoRADropoutKey, LoRAMask, apply_lora, set_lora_training
from flux_jax.model.config import FluxConfig, preset
from flux_jax.model.flux import Flux
from flux_jax.run_config import LoraConfig, ModelConfig
from flux_jax.sharding import state_shardings

log = logging.getLogger(__name__)

# Variables the trainer adds to a base: the adapters' trainable params, their per-layer masks and dropout keys.
ADAPTER_VARIABLES = (nnx.LoRAParam, LoRAMask, LoRADropoutKey)
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def random_flux(cfg: FluxConfig, *, base_dtype: str, compute_dtype: str, seed: int, attention: str, remat: str) -> Flux:
    """A random Flux whose base params are in their storage dtypes (fp8: matmul kernels only, rest bf16)."""
    storage = DTYPES[base_dtype]
    init_dtype = jnp.bfloat16 if base_dtype == "fp8" else storage  # jax.random cannot sample float8 directly
    model = Flux(
        cfg, rngs=nnx.Rngs(seed), param_dtype=init_dtype, dtype=DTYPES[compute_dtype], attention=attention, remat=remat
    )
    if storage != init_dtype:
        state = nnx.state(model, BASE_PARAMS)
        flat = {p: v.replace(v.get_value().astype(storage_dtype(p, storage))) for p, v in nnx.to_flat_state(state)}
        nnx.update(model, nnx.from_flat_state(flat))
    return model


def random_base(
    cfg: FluxConfig,
    *,
    base_dtype: str,
    compute_dtype: str,
    mesh: Mesh,
    rules: Rules,
    seed: int = 0,
    attention: str = "xla",
    remat: str = "none",
) -> Flux:
    """A randomly initialised base, every parameter created directly in its sharding (no full copy anywhere)."""
    kw = dict(base_dtype=base_dtype, compute_dtype=compute_dtype, seed=seed, attention=attention, remat=remat)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: random_flux(cfg, **kw)))
    state = jax.jit(lambda: nnx.state(random_flux(cfg, **kw)), out_shardings=state_shardings(abstract, mesh, rules))()
    return nnx.merge(graphdef, state)


def attach_lora(model: Flux, lora_cfg: LoraConfig, *, seed: int) -> list[str]:
    """Attach the run's adapters (A random from ``seed``, B zero); returns the adapted module paths.

    ``lora.init_from`` is applied afterwards, on the built model (``flux_jax.train.lora_init``)."""
    paths = apply_lora(
        model,
        rank=lora_cfg.rank,
        alpha=lora_cfg.alpha,
        targets=lora_cfg.targets,
        blocks=lora_cfg.blocks,
        rngs=nnx.Rngs(seed),
        param_dtype=DTYPES[lora_cfg.dtype],
        dropout=lora_cfg.dropout,
    )
    set_lora_training(model, True)
    return paths


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    *,
    mesh: Mesh,
    rules: Rules,
    seed: int = 0,
    architecture: FluxConfig | None = None,
) -> tuple[Flux, list[str]]:
    """The run's model: the frozen base (loaded from ``model.base``, or random of shape ``model.preset``, or of
    ``architecture`` when given, e.g. a reduced-depth benchmark) with LoRA attached, every variable created in its
    sharding. Returns (model, adapted module paths).

    The model with adapters is first built abstractly; its shardings come from the logical axes. A random base
    and the adapters are then created by one jitted function with those ``out_shardings`` (one compile instead
    of one per eager op); with a loaded base, the same function returns only the adapter variables, and XLA
    drops the unused random base from the program.
    """
    base = None
    if model_cfg.base:
        from flux_jax.weights.load import load_flux

        log.info("loading base %s as %s (compute %s)", model_cfg.base, model_cfg.base_dtype, model_cfg.compute_dtype)
        base = load_flux(
            model_cfg.base,
            dtype=DTYPES[model_cfg.base_dtype],
            compute_dtype=DTYPES[model_cfg.compute_dtype],
            config=preset(model_cfg.preset) if model_cfg.preset else None,
            mesh=mesh,
            rules=rules,
            attention=model_cfg.attention,
            remat=model_cfg.remat,
        )
        cfg = base.config
    elif architecture is not None:
        log.info("building a random base of %s (%s)", architecture, model_cfg.base_dtype)
        cfg = architecture
    elif model_cfg.preset is not None:
        log.info("building a random %r base (%s)", model_cfg.preset, model_cfg.base_dtype)
        cfg = preset(model_cfg.preset)
    else:
        raise ValueError("model.base is empty and no model.preset is set")
    adapted: list[str] = []

    def make() -> Flux:
        model = random_flux(
            cfg,
            base_dtype=model_cfg.base_dtype,
            compute_dtype=model_cfg.compute_dtype,
            seed=seed,
            attention=model_cfg.attention,
            remat=model_cfg.remat,
        )
        adapted[:] = attach_lora(model, lora_cfg, seed=seed)
        return model

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    if base is None:
        state = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings(abstract, mesh, rules))()
        return nnx.merge(graphdef, state), adapted
    extra_shardings = state_shardings(nnx.filter_state(abstract, ADAPTER_VARIABLES), mesh, rules)
    extra = jax.jit(lambda: nnx.state(make(), ADAPTER_VARIABLES), out_shardings=extra_shardings)()
    return nnx.merge(graphdef, nnx.state(base), extra), adapted


def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, LoRA params, everything else). Trainability is the variable type ``nnx.LoRAParam``."""
    return nnx.split(model, nnx.LoRAParam, ...)


def flat_params(state: nnx.State) -> dict[str, jax.Array]:
    """An nnx.State as ``{"double_blocks.img_attn.qkv.lora.lora_a": array}``: the optimizer's and checkpoint's tree.

    A flat dict of string keys keeps the optimizer state and the orbax checkpoint independent of nnx's
    container types (and readable: the keys are the module paths of `flux_jax.lora`).
    """
    return {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def unflatten(template: nnx.State, flat: dict[str, jax.Array]) -> nnx.State:
    """Inverse of :func:`flat_params`, given a (possibly abstract) state of the same structure."""
    return nnx.from_flat_state(
        {path: var.replace(flat[".".join(map(str, path))]) for path, var in nnx.to_flat_state(template)}
    )
