"""The model the trainer trains: a frozen Flux base, sharded over the mesh from birth, with LoRA adapters attached.

The base is either loaded (``model.base``: any checkpoint ``flux_jax.weights.load.load_flux`` reads; every device
shard is read straight into place) or, for tests, smoke runs and benchmarks (``model.base: ""`` + ``model.preset``),
created randomly. ``lora_model`` is the one description of "a Flux of this shape with these adapters": the trainer
runs it under ``jax.jit`` with ``out_shardings`` derived from its abstract form (so even the full-size random model
never exists unsharded), and the planner and the checkpoint reader trace it for shapes only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from flux_jax.axes import Rules
from flux_jax.dtypes import BF16, DTYPES, FP8, storage_dtype
from flux_jax.model.attention import describe_attention, select_attention
from flux_jax.model.config import FluxConfig, preset
from flux_jax.model.flux import Flux
from flux_jax.model.lora import LoRADropoutKey, LoRAMask, apply_lora, set_lora_training
from flux_jax.run_config import LoraConfig, ModelConfig
from flux_jax.sharding import state_shardings
from flux_jax.train.memory import initial_policy
from flux_jax.weights.load import load_flux

log = logging.getLogger(__name__)

# Variables the trainer adds to a base: the adapters' trainable params, their per-layer masks and dropout keys.
ADAPTER_VARIABLES = (nnx.LoRAParam, LoRAMask, LoRADropoutKey)
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class Adapters:
    """What fixes the adapters' variables: shapes, dtypes, scale and masks (what a run's meta records)."""

    rank: int
    alpha: float
    targets: str | tuple[str, ...]
    blocks: tuple[int, ...] | None
    dtype: str
    dropout: float = 0.0

    @classmethod
    def from_config(cls, lora: LoraConfig) -> Adapters:
        return cls(lora.rank, lora.alpha, lora.targets, lora.blocks, lora.dtype, lora.dropout)


def random_flux(cfg: FluxConfig, *, base_dtype: str, compute_dtype: str, seed: int, attention: str, remat: str) -> Flux:
    """A random Flux whose base params are in their storage dtypes (fp8: matmul kernels only, rest bf16)."""
    storage = DTYPES[base_dtype]
    init_dtype = BF16 if storage == FP8 else storage  # jax.random cannot sample float8 directly
    model = Flux(
        cfg, rngs=nnx.Rngs(seed), param_dtype=init_dtype, dtype=DTYPES[compute_dtype], attention=attention, remat=remat
    )
    if storage != init_dtype:
        state = nnx.state(model, BASE_PARAMS)
        flat = {p: v.replace(v.get_value().astype(storage_dtype(p, storage))) for p, v in nnx.to_flat_state(state)}
        nnx.update(model, nnx.from_flat_state(flat))
    return model


def attach_lora(model: Flux, adapters: Adapters, *, seed: int) -> list[str]:
    """Attach the adapters (A random from ``seed``, B zero) in training mode; returns the adapted module paths.

    ``lora.init_from`` is applied afterwards, on the built model (``flux_jax.train.lora_init``)."""
    paths = apply_lora(
        model,
        rank=adapters.rank,
        alpha=adapters.alpha,
        targets=adapters.targets,
        blocks=adapters.blocks,
        rngs=nnx.Rngs(seed),
        param_dtype=DTYPES[adapters.dtype],
        dropout=adapters.dropout,
    )
    set_lora_training(model, True)
    return paths


def lora_model(
    cfg: FluxConfig, model_cfg: ModelConfig, adapters: Adapters | None, *, seed: int, abstract_base: bool = False
) -> tuple[Flux, list[str]]:
    """A random base of architecture ``cfg`` stored as ``model_cfg`` says, with ``adapters`` attached (none when
    ``adapters`` is None: ``train.mode: full`` trains the base itself).

    Pure in ``seed``: the trainer jits it with sharded outputs and ``flux-jax plan`` traces it with
    ``nnx.eval_shape`` (shapes, dtypes and logical axes only). ``abstract_base``: only the base is shapes, the
    adapters (and their per-layer masks) are real arrays, which is what reading a checkpoint's LoRA needs.
    Returns (model, adapted module paths)."""

    def base() -> Flux:
        return random_flux(
            cfg,
            base_dtype=model_cfg.base_dtype,
            compute_dtype=model_cfg.compute_dtype,
            seed=seed,
            attention=model_cfg.attention,
            remat=initial_policy(model_cfg.remat),
        )

    model = nnx.eval_shape(base) if abstract_base else base()
    if adapters is None:
        return model, []
    return model, attach_lora(model, adapters, seed=seed)


def with_attention(model_cfg: ModelConfig, cfg: FluxConfig, *, device: Any) -> tuple[ModelConfig, str | None]:
    """``model_cfg`` with ``attention`` resolved to the kernel that runs architecture ``cfg`` on ``device`` (the
    first device of the mesh the program is compiled for), and why "auto" fell back to xla (None if it did not).
    An explicit kernel that cannot run there is an ``AttentionError``."""
    impl, why = select_attention(model_cfg.attention, device=device, head_dim=cfg.head_dim,
                                 dtype=DTYPES[model_cfg.compute_dtype])  # fmt: skip
    if impl != model_cfg.attention:
        log.info("attention %s", describe_attention(model_cfg.attention, impl))
    return dataclasses.replace(model_cfg, attention=impl), why


def base_architecture(model_cfg: ModelConfig) -> FluxConfig:
    if model_cfg.preset is None:
        raise ValueError("model.base is empty and no model.preset is set")
    return preset(model_cfg.preset)


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    *,
    mesh: Mesh,
    rules: Rules,
    seed: int = 0,
    architecture: FluxConfig | None = None,
) -> tuple[Flux, list[str]]:
    """The run's model: the frozen base (loaded from ``model.base``, or random of shape ``model.preset``, or of
    ``architecture`` when given, e.g. a reduced-depth benchmark) with LoRA attached, every variable created in its
    sharding, running the attention kernel ``model.attention`` resolves to on the mesh's devices (``with_attention``).
    Returns (model, adapted module paths). ``lora_cfg`` None: no adapters (``train.mode: full``).

    The model with adapters is first built abstractly; its shardings come from the logical axes. A random base
    and the adapters are then created by one jitted function with those ``out_shardings`` (one compile instead
    of one per eager op); with a loaded base, the same function returns only the adapter variables, and XLA
    drops the unused random base from the program.
    """
    base = None
    if model_cfg.base:
        log.info("loading base %s as %s (compute %s)", model_cfg.base, model_cfg.base_dtype, model_cfg.compute_dtype)
        base = load_flux(
            model_cfg.base,
            dtype=DTYPES[model_cfg.base_dtype],
            compute_dtype=DTYPES[model_cfg.compute_dtype],
            config=preset(model_cfg.preset) if model_cfg.preset else None,
            mesh=mesh,
            rules=rules,
            attention=model_cfg.attention,
            remat=initial_policy(model_cfg.remat),
        )
        cfg = base.config
    elif architecture is not None:
        log.info("building a random base of %s (%s)", architecture, model_cfg.base_dtype)
        cfg = architecture
    else:
        cfg = base_architecture(model_cfg)
        log.info("building a random %r base (%s)", model_cfg.preset, model_cfg.base_dtype)
    # The returned model's graphdef comes from `make`, so this choice is the kernel it runs (for a loaded base the
    # same one load_flux resolved).
    model_cfg, _ = with_attention(model_cfg, cfg, device=mesh.devices.flat[0])
    adapters = None if lora_cfg is None else Adapters.from_config(lora_cfg)
    adapted: list[str] = []

    def make() -> Flux:
        model, adapted[:] = lora_model(cfg, model_cfg, adapters, seed=seed)
        return model

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    if base is None:
        state = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings(abstract, mesh, rules))()
        return nnx.merge(graphdef, state), adapted
    if adapters is None:
        return nnx.merge(graphdef, nnx.state(base)), adapted
    extra_shardings = state_shardings(nnx.filter_state(abstract, ADAPTER_VARIABLES), mesh, rules)
    extra = jax.jit(lambda: nnx.state(make(), ADAPTER_VARIABLES), out_shardings=extra_shardings)()
    return nnx.merge(graphdef, nnx.state(base), extra), adapted
