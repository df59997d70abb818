"""The training objective: rectified-flow matching on cached latents, with the Dev2Pro guidance rule.

Per sample: t from the configured sampler, ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, MSE times the
configured loss weight. Guidance fed to ``guidance_in`` is 1.0 by default (the Dev2Pro recipe).

Randomness is drawn per sample from ``fold_in(step_key, global_sample_index)``, so a sample's noise, t and
guidance do not depend on how the batch is split into micro-batches or over devices: gradient accumulation
and any mesh shape compute the same loss as one big batch on one device.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax import flow
from flux_jax.model.config import FluxConfig
from flux_jax.run_config import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static (hashable) settings of the loss; string choices select Python branches at trace time."""

    timestep_sampling: flow.TimestepMethod = "flux_shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    mode_scale: float = 1.29
    loss_weighting: flow.LossWeighting = "none"
    guidance: float = 1.0
    guidance_range: tuple[float, float] | None = None

    @classmethod
    def from_config(cls, train: TrainConfig) -> Objective:
        return cls(
            timestep_sampling=train.timestep_sampling,
            logit_mean=train.logit_mean,
            logit_std=train.logit_std,
            shift=train.shift,
            mode_scale=train.mode_scale,
            loss_weighting=train.loss_weighting,
            guidance=train.guidance,
            guidance_range=train.guidance_range,
        )


def sample_noise_t_guidance(keys: jax.Array, latents_shape: tuple[int, ...], objective: Objective):
    """Per-sample noise [B, L, C], t [B], guidance [B] from one key per sample."""

    def one(key):
        k_noise, k_t, k_g = jax.random.split(key, 3)
        noise = jax.random.normal(k_noise, latents_shape[1:], jnp.float32)
        t = flow.sample_timesteps(
            k_t,
            1,
            method=objective.timestep_sampling,
            seq_len=latents_shape[1],  # flux_shift: mu from the image token count
            logit_mean=objective.logit_mean,
            logit_std=objective.logit_std,
            shift=objective.shift,
            mode_scale=objective.mode_scale,
        )[0]
        guidance = flow.sample_guidance(k_g, 1, objective.guidance, objective.guidance_range)[0]
        return noise, t, guidance

    return jax.vmap(one)(keys)


def flow_loss(model: nnx.Module, batch: dict[str, jax.Array], keys: jax.Array, objective: Objective):
    """Scalar flow-matching loss of ``model`` on one (micro-)batch; ``keys`` holds one PRNG key per sample.

    batch: ``latents`` [B, L, C], ``img_ids`` [B, L, 3], ``t5`` [B, Lt, D], ``clip`` [B, V] (any float dtype).
    """
    x0 = batch["latents"].astype(jnp.float32)
    noise, t, guidance = sample_noise_t_guidance(keys, x0.shape, objective)
    x_t = flow.noisy_input(x0, noise, t)
    txt_ids = jnp.zeros((batch["t5"].shape[1], 3), jnp.float32)  # BFL: text tokens sit at position 0
    pred = model(x_t, batch["img_ids"], batch["t5"], txt_ids, t, batch["clip"], guidance)
    target = flow.velocity_target(x0, noise)
    return flow.flow_matching_loss(pred, target, flow.loss_weights(t, objective.loss_weighting))


def warn_about_guidance(objective: Objective, *, base: str, config: FluxConfig) -> bool:
    """Log a loud warning when a dev-type base (Dev2Pro above all) would be trained at guidance != 1.0.

    Dev2Pro was de-distilled by training at guidance 1.0; feeding another value teaches the LoRA the
    distilled-CFG embedding the base was moved away from. Returns whether it warned.
    """
    off = objective.guidance_range is not None or objective.guidance != 1.0
    if not config.guidance_embed or not off:
        return False
    what = f"range {objective.guidance_range}" if objective.guidance_range else f"{objective.guidance}"
    kind = "a Flux-Dev2Pro base" if "dev2pro" in base.lower() else "a dev-type base (guidance embedding)"
    banner = "!" * 100
    log.warning(
        "\n%s\nTraining %s at guidance %s, not 1.0. The Dev2Pro recipe trains at guidance 1.0 (train.guidance=1.0,\n"
        "train.guidance_range=null); other values retrain the distilled guidance embedding.\n%s",
        banner,
        kind,
        what,
        banner,
    )
    return True
