"""What validation during training adds to a run's per-chip memory, compiled for the target like the train step.

Validation samples images between train steps, so three things are added to a plan:

- resident memory, held from start to end: the validation base when it is not the training base (its parameters
  in ``validation.base_dtype``, sharded by the same logical-axis rules as the training base), the VAE decoder
  (replicated) and the encoded prompts (T5 states and CLIP pooled vectors; the text encoders are freed);
- the sampler's peak: its denoising loop (``flux_jax.sampling.sampler.denoise``: a scan over the steps, so one
  step's peak is the loop's), the transformer's forward pass at the validation size on ``validation.batch`` rows
  (prompts x seeds when fewer; twice that with true CFG: both branches in one call), with no gradients and no
  remat; and its VAE decode (``sampler.decode``). The sampler replicates latents and text over the mesh while the
  weights stay sharded, so every chip runs every row. Both programs are the sampler's own functions, read from
  ``memory_analysis()`` as ``fit.plan`` reads the train step's: the loop compiled for the target's devices, the
  decode (a one-device program on every chip) for this machine's CPU, which is quick and whose figure is the
  larger (see ``plan_validation``);
- none of the sampler's activations coexist with the train step's: the plan's total is the resident memory plus
  max(train step peak, sampling peak), not their sum (``fit.Plan.total``).

``validation_spec`` reads the run config's ``validation`` section; with ``validation.every`` unset the plan is
the train step's alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from flux_jax import hub
from flux_jax.dtypes import DTYPES
from flux_jax.encoders.vae import AutoEncoder, VAEConfig
from flux_jax.flow import packed_seq_len
from flux_jax.model.config import FluxConfig
from flux_jax.model.lora import set_lora_training
from flux_jax.planning import hlo_flops
from flux_jax.run_config import ModelConfig, RunConfig
from flux_jax.sampling.sampler import decode, denoise
from flux_jax.sharding import state_shardings, use_mesh
from flux_jax.train.build import BASE_PARAMS, Adapters, lora_model, with_attention
from flux_jax.train.memory import parse_oom

# Defaults for fields the config's validation section may not have (FLUX.1-dev's sampling recipe; fp8 storage
# for a second base, which keeps Flux.1-dev beside a Dev2Pro training base in HBM).
DEFAULT_STEPS = 28
DEFAULT_BASE_DTYPE = "fp8"


@dataclasses.dataclass(frozen=True)
class ValidationSpec:
    """The validation settings that decide its memory, from the ``validation`` section (``validation_spec``)."""

    every: int
    prompts: int
    """How many prompts are sampled."""
    seeds: int
    """How many seeds each prompt is sampled with."""
    width: int
    height: int
    steps: int = DEFAULT_STEPS
    cfg: float = 1.0
    """True-CFG scale; above 1 the negative branch doubles the transformer's batch."""
    batch: int = 4
    """Images per sampler call (``validation.batch``)."""
    base: str = ""
    """The validation base; "" = the training base (no second set of weights)."""
    base_dtype: str = DEFAULT_BASE_DTYPE

    @property
    def images(self) -> int:
        """Images per validation: prompts x seeds."""
        return self.prompts * self.seeds

    @property
    def per_call(self) -> int:
        """Images per sampler call: a batch (all of them when fewer)."""
        return min(self.batch, self.images)

    @property
    def model_rows(self) -> int:
        """Rows of each transformer call: a call's images, twice with true CFG."""
        return self.per_call * (2 if self.cfg > 1 else 1)

    @property
    def image_tokens(self) -> int:
        return packed_seq_len(self.height, self.width)


def _count_prompts(v) -> tuple[int, str | None]:
    """(prompts, note): ``validation.prompts``, or the non-blank lines of ``validation.prompts_file`` when that
    file is on this machine (one prompt is planned otherwise, with a note)."""
    if v.prompts or not v.prompts_file:
        return len(v.prompts), None
    path = pathlib.Path(v.prompts_file)
    if path.is_file():
        return sum(1 for line in path.read_text().splitlines() if line.strip()), None
    return 1, f"validation.prompts_file {v.prompts_file!r} is not a file on this machine: planned one prompt"


def validation_spec(cfg: RunConfig) -> tuple[ValidationSpec | None, tuple[str, ...]]:
    """(the run's validation settings, notes), or (None, ()) when validation is off (``validation.every`` unset
    or 0)."""
    v = cfg.validation
    if not v.every:
        return None, ()
    prompts, note = _count_prompts(v)
    spec = ValidationSpec(
        every=v.every, prompts=prompts, seeds=len(v.seeds), width=v.width, height=v.height, steps=v.steps,
        cfg=v.cfg, batch=v.batch, base=v.base, base_dtype=v.base_dtype,
    )  # fmt: skip
    return spec, (note,) if note else ()


@dataclasses.dataclass(frozen=True)
class ValidationMemory:
    """Per-chip bytes validation adds to a run (see the module docstring)."""

    spec: ValidationSpec
    model: str
    """The validation base planned: "the training base", or the checkpoint / architecture it stands for."""
    rows: int
    """Rows per transformer call (``spec.model_rows``), all of them on every chip."""
    text_len: int
    base: int
    """The validation base's parameters when it is not the training base (0 when it is)."""
    vae: int
    """The VAE decoder's parameters (replicated)."""
    prompts: int
    """The encoded prompts (and the negative prompt with true CFG), kept between validations."""
    sampling: int
    """The denoising loop's peak beyond its weights and prompts: activations, latents, velocities."""
    decoding: int
    """The VAE decode's peak beyond its weights: one image's decoder activations (the sampler decodes one at a time)
    and its float32 pixels."""
    flops: float | None = None
    """Per-chip matmul FLOPs of one validation: the ``steps`` denoising steps and the decode."""
    from_compiler_error: bool = False
    """True when the TPU compiler refused a sampler program (out of HBM); ``sampling`` is then its figure."""

    @property
    def resident(self) -> int:
        """What validation holds for the whole run."""
        return self.base + self.vae + self.prompts

    @property
    def peak(self) -> int:
        """The sampler's own peak, between train steps."""
        return max(self.sampling, self.decoding)


def per_device_bytes(tree: Any) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def validation_architecture(spec: ValidationSpec, model_config: FluxConfig) -> tuple[FluxConfig, str, tuple[str, ...]]:
    """The validation base's architecture: the training base's when ``spec.base`` is empty, else its checkpoint's
    config if it is on this machine (a transformer checkpoint or a pipeline directory's ``transformer/``), else the
    training base's (the recipe's Flux.1-dev beside Dev2Pro shares it)."""
    if not spec.base:
        return model_config, "the training base", ()
    path = pathlib.Path(hub.resolve_transformer(spec.base, download=False))  # a Hub name if cached
    if (path / "transformer").is_dir():
        path = path / "transformer"
    if path.exists():
        from flux_jax.weights.checkpoint import open_checkpoint

        with open_checkpoint(path) as ckpt:
            return ckpt.config, spec.base, ()
    note = (f"validation.base {spec.base!r} is not on this machine: planned the training base's architecture "
            f"for it")  # fmt: skip
    return model_config, spec.base, (note,)


def vae_architecture(cfg: RunConfig) -> VAEConfig:
    """The VAE the sampler decodes with: the generated demo encoders' tiny one when no encoders are configured,
    the configured diffusers ``vae/`` directory's when it is on this machine, else FLUX.1's."""
    from flux_jax.data.encoding import ROOT_LAYOUT, demo_stamp

    if demo_stamp(cfg) is not None:
        return VAEConfig.tiny()  # flux_jax.data.demo builds the demo VAE with this config
    enc = cfg.encoders
    if enc.vae:
        folder = pathlib.Path(hub.resolve_folder(enc.vae, ROOT_LAYOUT["vae"], download=False))
    else:
        folder = pathlib.Path(hub.resolve_encoders(enc.root, download=False)) / ROOT_LAYOUT["vae"]
    config = folder / "config.json"
    if folder.is_dir() and config.is_file():
        return VAEConfig.from_diffusers(json.loads(config.read_text()))
    return VAEConfig.flux()


def _sds(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_sampling_model(
    cfg: RunConfig, spec: ValidationSpec, mesh: Mesh, architecture: FluxConfig
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, every param, the base's params) of the model the sampler runs, as sharded ShapeDtypeStructs: the
    run's adapters on the validation base (stored in ``spec.base_dtype``) or on the training base, remat off."""
    base_dtype = spec.base_dtype if spec.base else cfg.model.base_dtype
    model_cfg = ModelConfig(base_dtype=base_dtype, compute_dtype=cfg.model.compute_dtype,
                            attention=cfg.model.attention, remat="none")  # fmt: skip
    model_cfg, _ = with_attention(model_cfg, architecture, device=mesh.devices.flat[0])  # the trainer's kernel
    adapters = Adapters.from_config(cfg.lora)

    def make() -> nnx.Module:
        model, _ = lora_model(architecture, model_cfg, adapters, seed=0)
        set_lora_training(model, False)  # sampling uses no LoRA dropout
        return model

    rules = cfg.mesh.rules
    with use_mesh(mesh, rules):
        model = nnx.eval_shape(make)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(_sds, params, state_shardings(params, mesh, rules))
    return graphdef, params, nnx.filter_state(params, BASE_PARAMS)


def _compile(fn: Any, *args: Any) -> jax.stages.Compiled:
    return jax.jit(fn).lower(*args).compile()


def _working_bytes(compiled: jax.stages.Compiled, held: int) -> int:
    """A program's peak (arguments + outputs + temporaries - aliases) less the ``held`` argument bytes that stay
    resident anyway (weights, prompts)."""
    stats = compiled.memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)  # fmt: skip
    return int(total - held)


def plan_validation(
    cfg: RunConfig, spec: ValidationSpec, mesh: Mesh, *, model_config: FluxConfig, text_len: int
) -> tuple[ValidationMemory, tuple[str, ...]]:
    """Compile the sampler's denoising loop (for ``mesh``'s devices) and VAE decode (for this machine's CPU), the
    functions of ``flux_jax.sampling.sampler``, and measure them; (memory, notes). ``model_config`` is the training
    base's architecture; ``text_len`` the T5 length of the prompts.

    A TPU compiler refusing a program for lack of HBM is returned as ``from_compiler_error`` with its figure;
    other compile errors propagate."""

    architecture, name, notes = validation_architecture(spec, model_config)
    graphdef, params, base = abstract_sampling_model(cfg, spec, mesh, architecture)
    compute = DTYPES[cfg.model.compute_dtype]
    state = DTYPES[cfg.model.compute_dtype]  # diffusers' recipe: the sampling state in the activation dtype
    # The sampler replicates latents and text over the mesh (the weights stay sharded): every chip runs every row.
    replicated = NamedSharding(mesh, PartitionSpec())
    rows, images, tokens = spec.model_rows, spec.per_call, spec.image_tokens

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    # The prompts' T5 states and CLIP vectors, and one negative prompt's with true CFG (the loop concatenates the
    # two branches itself: that copy is part of its working memory).
    true_cfg = spec.cfg > 1
    txt = sds((images, text_len, architecture.context_in_dim), compute)
    y = sds((images, architecture.vec_in_dim), compute)
    neg_txt = sds((1, text_len, architecture.context_in_dim), compute) if true_cfg else None
    neg_y = sds((1, architecture.vec_in_dim), compute) if true_cfg else None
    loop_args = (
        (params,),
        (),
        sds((images, tokens, architecture.in_channels), state),  # x
        sds((tokens, 3), jnp.float32),  # image ids
        txt,
        y,
        neg_txt,
        neg_y,
        sds((spec.steps + 1,), jnp.float32),  # sigmas
        sds((spec.steps,), jnp.float32),  # model timesteps
        sds((), jnp.float32),  # guidance
        sds((), jnp.float32),  # cfg
    )
    loop = functools.partial(denoise, graphdef, match="diffusers", true_cfg=true_cfg)

    # The decoder is replicated and decodes every image on every chip: each chip runs the same one-device program,
    # with no communication, so it is compiled as that program for this machine's CPU rather than for the target.
    # XLA's TPU compiler spends minutes on the decoder's ~30 convolutions (10 for FLUX.1's on a busy 2-core host),
    # and the CPU's figure is the larger: FLUX.1's decoder at 512 px in bf16 needs 771 MiB of temporaries compiled
    # for the CPU, 464 MiB compiled for a v5e (libtpu 0.0.42).
    vae_config = vae_architecture(cfg)
    vae = nnx.eval_shape(lambda: AutoEncoder(vae_config, dtype=compute, param_dtype=compute, rngs=nnx.Rngs(0)))
    vae_graph, vae_params = nnx.split(vae.decoder)
    host = SingleDeviceSharding(jax.devices("cpu")[0])
    vae_params = jax.tree.map(lambda p: _sds(p, host), vae_params)
    f = vae_config.spatial_factor
    latents = jax.ShapeDtypeStruct((images, tokens, architecture.in_channels), jnp.float32, sharding=host)
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=host)  # the decoder runs one image at a time
    vae_decode = functools.partial(decode, vae_graph, config=vae_config, unscale_dtype=state, h=spec.height // f,
                                   w=spec.width // f)  # fmt: skip

    # Every prompt's encoding is kept for the whole run, with true CFG a negative prompt's beside each (encoded at
    # that prompt's T5 length: ``flux_jax.train.validation``).
    kept = spec.prompts * (2 if true_cfg else 1)
    weights, call_text = per_device_bytes(params), per_device_bytes((txt, y, neg_txt, neg_y))
    prompts = per_device_bytes(
        (sds((kept, text_len, architecture.context_in_dim), compute), sds((kept, architecture.vec_in_dim), compute))
    )
    base_bytes = per_device_bytes(base) if spec.base else 0
    vae_bytes = per_device_bytes(vae_params)
    common = dict(spec=spec, model=name, rows=rows, text_len=text_len, base=base_bytes, vae=vae_bytes,
                  prompts=prompts)  # fmt: skip
    try:
        with use_mesh(mesh, cfg.mesh.rules):
            step = _compile(loop, *loop_args)
        decoder = _compile(vae_decode, vae_params, latents, index)  # outside the mesh: a one-device program
    except jax.errors.JaxRuntimeError as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise
        note = f"the TPU compiler ran out of HBM compiling the sampler: it needs {oom[0] / 2**30:.2f} GiB per chip"
        return ValidationMemory(sampling=oom[0], decoding=0, from_compiler_error=True, **common), (*notes, note)
    flops = hlo_flops.count_flops(step.as_text()).flops + images * hlo_flops.count_flops(decoder.as_text()).flops
    memory = ValidationMemory(sampling=_working_bytes(step, weights + call_text),
                              decoding=_working_bytes(decoder, vae_bytes), flops=flops, **common)  # fmt: skip
    return memory, notes


def report_lines(v: ValidationMemory, gib: Any, peak_flops: float | None) -> Sequence[str]:
    """The validation lines of ``flux-jax plan``'s report (``gib`` formats bytes)."""
    s = v.spec
    mode = f", true CFG {s.cfg:g} (x2 rows)" if s.cfg > 1 else ""
    base = (f"{v.model} as {s.base_dtype}, sharded like the training base" if s.base
            else "the training base (no second copy)")  # fmt: skip
    lines = [
        f"validation every {s.every} steps: {s.prompts} prompt(s) x {s.seeds} seed(s) at {s.width}x{s.height}, "
        f"{s.steps} steps{mode}; {v.rows} rows per call ({s.image_tokens} image + {v.text_len} text tokens)",
        f"  base         +{gib(v.base)} ({base})",
        f"  VAE decoder  +{gib(v.vae)} (replicated)",
        f"  prompts      +{gib(v.prompts)} (encoded once; the text encoders are freed)",
    ]
    if v.from_compiler_error:
        lines.append(f"  sampling     {gib(v.sampling)} (the compiler's figure; it refused the program)")
    else:
        lines.append(f"  sampling     {gib(v.sampling)} (the denoising loop: activations, no gradients; "
                     "between train steps)")  # fmt: skip
        lines.append(f"  decoding     {gib(v.decoding)} (the VAE decode)")
    if v.flops is not None and peak_flops:
        lines.append(f"  s/validation at peak  {v.flops / peak_flops:.3g} s ({v.flops / 1e12:.4g} TFLOP per chip)")
    return lines
