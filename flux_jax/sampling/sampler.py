"""``FluxSampler``: the Flux denoising loop in JAX on the training mesh, and the VAE decode to uint8.

The loop is one ``lax.scan`` over the steps inside one jitted function, compiled once per (batch, size, text
length, steps, match, true CFG on/off): repeated calls with new prompts, seeds, guidance or CFG scale reuse it
(``traces`` counts the traces). Everything a tool decides on the host (its noise, its sigma schedule and the
timestep value its model sees) is computed in numpy first (``noise``, ``schedules``), because XLA may reorder or
contract float operations; what runs on the device mirrors where each tool rounds:

- diffusers: the state is kept in the pipeline dtype; ``x <- dtype(x + dtype(dtype(dsigma) * v))``.
- BFL: the same, except dsigma stays float32 (a Python float in its loop).
- ComfyUI: the state stays float32 and the Euler step goes through ``denoised = x - sigma * v``,
  ``d = (x - denoised) / sigma``, ``x <- x + d * dsigma``; only the model input is cast.

True CFG (de-distilled bases such as Dev2Pro) runs the negative and positive branches as one batch of 2B and
combines ``v = v_neg + cfg * (v_pos - v_neg)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flux_jax.axes import DEFAULT_RULES, Rules
from flux_jax.dtypes import DTYPES, dtype_name
from flux_jax.encoders.vae import AutoEncoder, VAEConfig, denormalize_latents
from flux_jax.errors import FluxJaxError
from flux_jax.model.config import FluxConfig
from flux_jax.model.latents import image_ids, unpack_latents
from flux_jax.sampling import noise as noise_lib
from flux_jax.sampling import schedules
from flux_jax.sampling.schedules import MATCHES, Match
from flux_jax.sharding import constrain, replicate, use_mesh

SAMPLE_DTYPES = ("fp32", "bf16")


class SamplingError(FluxJaxError):
    """Settings or inputs the sampler cannot use (a size not a multiple of 16, an empty prompt list, ...)."""


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    """The guidance embedding's value (a guidance-distilled base; 1.0 for a de-distilled one such as Dev2Pro)."""
    cfg: float = 1.0
    """True-CFG scale: above 1 with a negative prompt, v = v_neg + cfg * (v_pos - v_neg)."""
    seed: int = 0
    match: Match = "diffusers"
    """Whose recipe to reproduce: the schedule, T5 padding, Euler form and uint8 rounding of that tool."""

    def check(self, pixels_per_token: int = 16) -> None:
        """SamplingError for unusable values (sizes must be positive multiples of ``pixels_per_token``)."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < pixels_per_token or value % pixels_per_token:
                raise SamplingError(
                    f"{name} {value} is not a positive multiple of {pixels_per_token} "
                    f"(the VAE's downsampling times the 2x2 token packing)"
                )
        if self.steps < 1:
            raise SamplingError(f"steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.cfg) and self.cfg > 0):
            raise SamplingError(f"cfg must be a positive number, got {self.cfg}")
        if not math.isfinite(self.guidance):
            raise SamplingError(f"guidance must be a finite number, got {self.guidance}")
        if self.match not in MATCHES:
            raise SamplingError(f"match {self.match!r} is not one of {', '.join(MATCHES)}")


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts: T5 states [B, Lt, D] and CLIP pooled vectors [B, V] (jax arrays, replicated)."""

    t5: jax.Array
    clip: jax.Array

    @property
    def batch(self) -> int:
        return int(self.t5.shape[0])


def _pack(noise: np.ndarray) -> np.ndarray:
    """NCHW latents -> [B, (h/2)(w/2), 4C] tokens on the host (``model.latents.pack_latents``' order)."""
    b, c, h, w = noise.shape
    return noise.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def _euler(match: str, x: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One Euler step of ``match``'s sampler (see the module docstring for where each tool rounds)."""
    f32 = jnp.float32
    if match == "comfyui":
        v = v.astype(f32)
        denoised = x - sigma * v
        return x + (x - denoised) / sigma * (sigma_next - sigma)
    dt = sigma_next - sigma
    if match == "diffusers":  # a 0-dim tensor times a bf16 tensor: dt is cast to bf16 first
        dt = dt.astype(v.dtype).astype(f32)
    step = (dt * v.astype(f32)).astype(v.dtype)
    return (x.astype(f32) + step.astype(f32)).astype(x.dtype)


def merge_states(graphdef: nnx.GraphDef, params: Sequence[nnx.State], extra: Sequence[nnx.State] = ()) -> nnx.Module:
    """The model from its graph and states, later states overriding earlier ones path by path: ``extra`` may
    replace variables ``params`` already holds (new LoRA values over a model that has adapters) or complete them
    (the trainer's LoRA over its frozen base)."""
    flat: dict = {}
    for state in (*params, *extra):
        flat.update(dict(state.flat_state()))
    return nnx.merge(graphdef, nnx.State.from_flat_path(flat))


def denoise(
    graphdef: nnx.GraphDef,
    params: tuple[nnx.State, ...],
    extra: tuple[nnx.State, ...],
    x: jax.Array,
    img_ids: jax.Array,
    txt: jax.Array,
    y: jax.Array,
    neg_txt: jax.Array | None,
    neg_y: jax.Array | None,
    sigmas: jax.Array,
    timesteps: jax.Array,
    guidance: jax.Array,
    cfg: jax.Array,
    *,
    match: str,
    true_cfg: bool,
) -> jax.Array:
    """The whole loop: ``x`` [B, L, C] initial latents in the state dtype -> final latents (same dtype).

    ``txt`` / ``y``: the prompts' T5 states and CLIP vectors; ``neg_txt`` / ``neg_y`` (1 or B rows) the negative
    prompt's when ``true_cfg``; ``sigmas`` [N + 1]; ``timesteps`` [N] the values the model embeds (/ 1000).
    """
    model = merge_states(graphdef, params, extra)
    compute = model.dtype
    batch = x.shape[0]
    if true_cfg:  # one model call over [negative; positive]
        neg_txt = jnp.broadcast_to(neg_txt, (batch, *neg_txt.shape[1:]))
        neg_y = jnp.broadcast_to(neg_y, (batch, *neg_y.shape[1:]))
        txt, y = jnp.concatenate([neg_txt, txt]), jnp.concatenate([neg_y, y])
    txt, y = txt.astype(compute), y.astype(compute)
    rows = txt.shape[0]
    txt_ids = jnp.zeros((txt.shape[1], 3), jnp.float32)  # BFL: text tokens sit at position 0
    g = jnp.full((rows,), guidance, jnp.float32) if model.guidance_in is not None else None

    def step(x, xs):
        sigma, sigma_next, t = xs
        inp = x.astype(compute)
        if true_cfg:
            inp = jnp.concatenate([inp, inp], axis=0)
        v = model(inp, img_ids, txt, txt_ids, jnp.full((rows,), t, jnp.float32), y, g)
        if true_cfg:
            neg, pos = jnp.split(v, 2, axis=0)
            v = neg + cfg.astype(v.dtype) * (pos - neg)
        return _euler(match, x, v, sigma, sigma_next), None

    x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:], timesteps))
    return constrain(x, (None, None, None))  # replicated: every host reads the whole result


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    latents: jax.Array,
    index: jax.Array,
    *,
    config: VAEConfig,
    unscale_dtype,
    h: int,
    w: int,
) -> jax.Array:
    """Image ``index`` of packed latents [B, L, 4C] on an h x w latent grid -> the VAE's output [1, H, W, 3], about
    [-1, 1], float32.

    One image per call: the decoder's activations grow with the images decoded together (FLUX.1's decoder needs
    about 3 GiB per 1024 px image), so a batch of validation pictures decoded at once could need more HBM than the
    training step, and one program (``index`` is traced) serves every batch size.
    ``unscale_dtype``: where ``z / scale + shift`` is computed (diffusers: the pipeline dtype; BFL, ComfyUI: f32).
    """
    decoder = nnx.merge(graphdef, params)
    latents = jax.lax.dynamic_slice_in_dim(latents, index, 1, axis=0)
    z = denormalize_latents(unpack_latents(latents, h, w).astype(unscale_dtype), config)
    x = decoder(z).astype(jnp.float32)  # the convolutions cast to the VAE dtype
    return constrain(x, (None, None, None, None))


def to_unit(x: np.ndarray) -> np.ndarray:
    """VAE output -> float32 in [0, 1], as diffusers' image processor computes it: (x / 2 + 0.5).clamp(0, 1)."""
    return np.clip(x / np.float32(2) + np.float32(0.5), 0, 1).astype(np.float32)


def to_uint8(x: np.ndarray, match: str) -> np.ndarray:
    """VAE output (float32) -> uint8 as ``match``'s tool writes its image files, in numpy (exact on every host)."""
    x = np.asarray(x, np.float32)
    if match == "diffusers":  # numpy_to_pil: (images * 255).round()
        return np.round(to_unit(x) * np.float32(255)).astype(np.uint8)
    if match == "bfl":  # save_image: clamp(-1, 1), then (127.5 * (x + 1)).byte(), which truncates
        return (np.float32(127.5) * (np.clip(x, -1, 1) + np.float32(1))).astype(np.uint8)
    # ComfyUI: clamp((x + 1) / 2, 0, 1) in the VAE, then SaveImage's clip(255 * i, 0, 255).astype(uint8)
    unit = np.clip((x + np.float32(1)) / np.float32(2), 0, 1)
    return np.clip(np.float32(255) * unit, 0, 255).astype(np.uint8)


class FluxSampler:
    """Samples images from a Flux transformer (any loaded base, with or without LoRA adapters) and a VAE.

    ``graphdef`` / ``params`` are the model split by ``nnx.split`` (``from_model`` does it); ``params`` may be a
    tuple of states (e.g. the trainer's frozen base), and every call may pass ``extra`` states merged on top,
    replacing or completing ``params`` (the trainer's current LoRA values), so the same compiled loop serves every
    validation step. ``config`` (the transformer's) and ``dtype`` (its compute dtype, "fp32" or "bf16") are read
    from the graph when not given, which needs ``params`` to hold every variable. Weights stay where
    they are (FSDP-sharded on ``mesh`` for a big base); the latents and text are replicated.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State | Sequence[nnx.State],
        vae: AutoEncoder,
        *,
        config: FluxConfig | None = None,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        dtype: str | None = None,
    ):
        self.graphdef = graphdef
        self.params = (params,) if isinstance(params, nnx.State) else tuple(params)
        if config is None or dtype is None:  # read from the graph (``params`` must then hold every variable)
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
            model = nnx.merge(graphdef, *shapes)
            config = config or model.config
            dtype = dtype or dtype_name(model.dtype, SAMPLE_DTYPES)
        self.model_config: FluxConfig = config
        if dtype not in SAMPLE_DTYPES:
            raise SamplingError(f"dtype {dtype!r} is not one of {', '.join(SAMPLE_DTYPES)}")
        self.dtype = dtype
        self.vae_config: VAEConfig = vae.config
        # Only the decoder is used: the encoder's weights are not kept.
        self._decoder = nnx.split(vae.decoder)
        self.mesh = (
            mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        )
        self.rules = rules
        self._traces = 0

        def traced(*args, **kwargs):
            self._traces += 1  # runs only while jax traces
            return denoise(graphdef, *args, **kwargs)

        # One compiled loop per (shapes, steps, match, true CFG) for the life of the sampler: keep one sampler
        # per model (the CLI's, the trainer's validation) and call it repeatedly.
        self._denoise = jax.jit(traced, static_argnames=("match", "true_cfg"))
        self._decode = jax.jit(
            functools.partial(decode, self._decoder[0], config=self.vae_config),
            static_argnames=("unscale_dtype", "h", "w"),
        )

    @classmethod
    def from_model(cls, model: nnx.Module, vae: AutoEncoder, **kwargs) -> FluxSampler:
        graphdef, params = nnx.split(model)
        kwargs.setdefault("config", model.config)
        return cls(graphdef, params, vae, **kwargs)

    @property
    def traces(self) -> int:
        """How often this sampler's denoising loop was traced (tests assert repeated calls do not retrace)."""
        return self._traces

    @property
    def pixels_per_token(self) -> int:
        return 2 * self.vae_config.spatial_factor

    def latent_shape(self, settings: SampleSettings, batch: int) -> tuple[int, int, int, int]:
        """[B, C, H/f, W/f], the noise's NCHW shape (the VAE's latent grid)."""
        f = self.vae_config.spatial_factor
        return batch, self.vae_config.latent_channels, settings.height // f, settings.width // f

    def initial_noise(self, settings: SampleSettings, batch: int) -> np.ndarray:
        """[B, C, H/f, W/f] float32 for ``settings.seed``: one draw for the whole batch, as diffusers and ComfyUI."""
        settings.check(self.pixels_per_token)
        return noise_lib.initial_noise(settings.match, self.latent_shape(settings, batch), settings.seed, self.dtype)

    def _state_dtype(self, match: str):
        # ComfyUI keeps its sampling state in float32; diffusers and BFL in the activation dtype.
        return jnp.float32 if match == "comfyui" else DTYPES[self.dtype]

    def latents(
        self,
        prompts: TextConditioning,
        settings: SampleSettings,
        *,
        negative: TextConditioning | None = None,
        noise: np.ndarray | None = None,
        extra: nnx.State | Sequence[nnx.State] = (),
    ) -> jax.Array:
        """The final packed latents [B, L, 4C] (float32). ``noise`` [B, C, h, w] replaces the seed's draw;
        ``negative`` (batch 1 or B) with ``settings.cfg > 1`` runs true CFG in one batched model call."""
        settings.check(self.pixels_per_token)
        batch = prompts.batch
        shape = self.latent_shape(settings, batch)
        if noise is None:
            noise = self.initial_noise(settings, batch)
        elif tuple(noise.shape) != shape:
            raise SamplingError(
                f"initial latents have shape {tuple(noise.shape)}; {settings.width}x{settings.height} "
                f"with batch {batch} needs {shape}"
            )
        true_cfg = settings.cfg > 1.0 and negative is not None
        if settings.cfg > 1.0 and negative is None:
            raise SamplingError(f"cfg {settings.cfg} > 1 is true CFG and needs a negative prompt (it may be empty)")
        if true_cfg:
            if negative.batch not in (1, batch):
                raise SamplingError(f"{negative.batch} negative prompts for {batch} prompts; give 1 or {batch}")
            if negative.t5.shape[1] != prompts.t5.shape[1]:
                raise SamplingError(
                    f"negative T5 length {negative.t5.shape[1]} differs from the prompts' {prompts.t5.shape[1]}; "
                    "encode them together"
                )
        _, _, h, w = shape
        x = _pack(np.asarray(noise, np.float32)).astype(self._state_dtype(settings.match))
        # Schnell (no guidance embedding) samples the unshifted schedule.
        sig = schedules.sigmas(settings.match, settings.steps, x.shape[1], shift=self.model_config.guidance_embed)
        t = schedules.model_timesteps(settings.match, sig, self.dtype)
        host = functools.partial(replicate, mesh=self.mesh)
        extra = (extra,) if isinstance(extra, nnx.State) else tuple(extra)
        with use_mesh(self.mesh, self.rules):
            out = self._denoise(
                self.params,
                extra,
                host(x),
                host(image_ids(h // 2, w // 2)),
                prompts.t5,
                prompts.clip,
                negative.t5 if true_cfg else None,
                negative.clip if true_cfg else None,
                host(sig),
                host(t),
                host(np.float32(settings.guidance)),
                host(np.float32(settings.cfg)),
                match=settings.match,
                true_cfg=true_cfg,
            )
        return out.astype(jnp.float32)

    def decode_raw(self, latents: jax.Array, settings: SampleSettings) -> np.ndarray:
        """Packed latents -> the VAE's float32 output [B, H, W, 3] (about [-1, 1]) on this host."""
        f = self.vae_config.spatial_factor
        unscale = DTYPES[self.dtype] if settings.match == "diffusers" else jnp.float32
        images = []
        with use_mesh(self.mesh, self.rules):
            for i in range(latents.shape[0]):  # one at a time (see `decode`)
                x = self._decode(self._decoder[1], latents, np.int32(i), unscale_dtype=unscale,
                                 h=settings.height // f, w=settings.width // f)  # fmt: skip
                images.append(np.asarray(x.addressable_data(0)))  # replicated: every host holds all of it
        return np.concatenate(images)

    def decode(self, latents: jax.Array, settings: SampleSettings) -> np.ndarray:
        """Packed latents -> uint8 images [B, H, W, 3], with ``settings.match``'s un-scaling and rounding."""
        return to_uint8(self.decode_raw(latents, settings), settings.match)

    def images(
        self,
        prompts: TextConditioning,
        settings: SampleSettings,
        *,
        negative: TextConditioning | None = None,
        noise: np.ndarray | None = None,
        extra: nnx.State | Sequence[nnx.State] = (),
    ) -> np.ndarray:
        """``decode(latents(...))``: uint8 [B, H, W, 3]."""
        return self.decode(self.latents(prompts, settings, negative=negative, noise=noise, extra=extra), settings)
