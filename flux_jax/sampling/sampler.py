"""``FluxSampler``: the Flux denoising loop in JAX on the training mesh, and the VAE decode to uint8.

STUB (contract): implementation lands next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flux_jax.axes import DEFAULT_RULES, Rules
from flux_jax.encoders.vae import AutoEncoder
from flux_jax.errors import FluxJaxError
from flux_jax.sampling.schedules import Match


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
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts: T5 states [B, Lt, D] and CLIP pooled vectors [B, V] (jax arrays, replicated)."""

    t5: jax.Array
    clip: jax.Array

    @property
    def batch(self) -> int:
        return int(self.t5.shape[0])


class FluxSampler:
    """Samples images from a Flux transformer (any loaded base, with or without LoRA adapters) and a VAE.

    ``graphdef`` / ``params`` are the model split by ``nnx.split`` (``from_model`` does it); ``params`` may be a
    tuple of states (e.g. the trainer's frozen base), and every call may pass ``extra`` states merged on top (the
    trainer's current LoRA values), so the same compiled loop serves every validation step.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State | Sequence[nnx.State],
        vae: AutoEncoder,
        *,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        dtype: str = "bf16",
    ):
        raise NotImplementedError

    @classmethod
    def from_model(cls, model: nnx.Module, vae: AutoEncoder, **kwargs) -> FluxSampler:
        raise NotImplementedError

    traces: int
    """How often the denoising loop was traced (tests assert repeated calls do not retrace)."""

    def initial_noise(self, settings: SampleSettings, batch: int) -> np.ndarray:
        """[B, C, H/f, W/f] float32 for ``settings.seed``: one draw for the whole batch, as diffusers and ComfyUI."""
        raise NotImplementedError

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
        raise NotImplementedError

    def decode(self, latents: jax.Array, settings: SampleSettings) -> np.ndarray:
        """Packed latents -> uint8 images [B, H, W, 3], with ``settings.match``'s un-scaling and rounding."""
        raise NotImplementedError

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
        raise NotImplementedError
