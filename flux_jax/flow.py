"""Rectified-flow training math: timestep sampling, noising, targets, loss weights, guidance.

Conventions (shared by every Flux trainer surveyed): ``t`` (also called sigma) is the noise level in
(0, 1), 1 = pure noise; the noisy input is ``x_t = (1 - t) x0 + t * noise`` and the model regresses the
raw velocity ``noise - x0``. The model itself receives ``t`` (not ``1000 t``) and the raw guidance
value; it applies BFL's ``time_factor=1000`` internally.

Everything here is a pure ``jnp`` function. String choices (``method``, ``scheme``) select Python
branches, so pass them as static arguments when jitting.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from flux_jax.model.latents import PIXELS_PER_TOKEN

TimestepMethod = Literal["uniform", "logit_normal", "shift", "flux_shift", "mode"]
LossWeighting = Literal["none", "sigma_sqrt", "cosmap"]

# Resolution-dependent shift of FLUX.1-dev's scheduler: mu is linear in the number of packed image
# tokens through (256, 0.5) and (4096, 1.15). 512px -> 1024 tokens, mu ~ 0.63; 1024px -> mu = 1.15.
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15

# Samples are clipped into [T_EPS, 1 - T_EPS]: float32 uniform draws can be exactly 0 and a sigmoid can
# round to exactly 1, and t = 0 would give an infinite sigma_sqrt weight.
T_EPS = 1e-5


def packed_seq_len(height: int, width: int) -> int:
    """Image tokens for a ``height`` x ``width`` pixel image (VAE /8, then 2x2 packing = /16)."""
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)


def flux_mu(
    seq_len: jax.typing.ArrayLike,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> jax.Array:
    """The log-shift mu for ``seq_len`` image tokens (linear, extrapolated beyond the two anchors)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return jnp.asarray(base_shift + slope * (jnp.asarray(seq_len, jnp.float32) - base_seq_len), jnp.float32)


def shift_timesteps(t: jax.typing.ArrayLike, shift: jax.typing.ArrayLike) -> jax.Array:
    """Static shift ``S t / (1 + (S - 1) t)`` in float32; S > 1 moves samples towards the noisy end."""
    t = jnp.asarray(t, jnp.float32)
    shift = jnp.asarray(shift, jnp.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_shift(mu: jax.typing.ArrayLike, t: jax.typing.ArrayLike) -> jax.Array:
    """BFL/kohya ``time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1)``.

    Written as the equivalent static shift with S = e^mu, which has no 1/t and so stays finite at t = 0.
    """
    return shift_timesteps(t, jnp.exp(jnp.asarray(mu, jnp.float32)))


def sample_timesteps(
    key: jax.Array,
    batch: int,
    *,
    method: TimestepMethod = "flux_shift",
    seq_len: jax.typing.ArrayLike = MAX_SEQ_LEN,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
    mode_scale: float = 1.29,
) -> jax.Array:
    """Per-sample noise levels ``t`` of shape ``[batch]`` in (0, 1), float32.

    - ``uniform``: U(0, 1).
    - ``logit_normal``: ``sigmoid(logit_std * z + logit_mean)``, z ~ N(0, 1) (kohya "sigmoid", SD3).
    - ``shift``: logit-normal, then the static shift with S = ``shift``.
    - ``flux_shift``: logit-normal, then the shift with S = exp(flux_mu(seq_len)), so the schedule
      follows the image size the way FLUX.1-dev's inference scheduler does.
    - ``mode``: SD3's ``u <- 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u)`` on u ~ U(0, 1).
    """
    if method == "uniform":
        t = jax.random.uniform(key, (batch,), jnp.float32)
    elif method in ("logit_normal", "shift", "flux_shift"):
        z = jax.random.normal(key, (batch,), jnp.float32)
        t = jax.nn.sigmoid(logit_std * z + logit_mean)
        if method == "shift":
            t = shift_timesteps(t, shift)
        elif method == "flux_shift":
            t = time_shift(flux_mu(seq_len), t)
    elif method == "mode":
        u = jax.random.uniform(key, (batch,), jnp.float32)
        t = 1.0 - u - mode_scale * (jnp.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    else:
        raise ValueError(f"unknown timestep sampling method {method!r}")
    return jnp.clip(t, T_EPS, 1.0 - T_EPS)


def _expand_like(t: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcast per-sample ``t`` of shape [B] (or any prefix of x's shape) against ``x``."""
    t = jnp.asarray(t)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def noisy_input(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``(1 - t) x0 + t noise`` with ``t`` per sample; mixed in float32, returned in the inputs' dtype.

    Mixing in float32 avoids rounding ``t`` to bf16's 8-bit mantissa before it weights the latents.
    """
    out_dtype = jnp.result_type(x0, noise)
    t32 = _expand_like(t, x0).astype(jnp.float32)
    mixed = (1.0 - t32) * x0.astype(jnp.float32) + t32 * noise.astype(jnp.float32)
    return mixed.astype(out_dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The regression target ``noise - x0`` (d x_t / d t)."""
    return noise - x0


def loss_weights(t: jax.Array, scheme: LossWeighting = "none") -> jax.Array:
    """SD3 per-sample loss weights: ``none`` 1, ``sigma_sqrt`` t^-2, ``cosmap`` 2 / (pi (1 - 2t + 2t^2)).

    sigma_sqrt grows as t -> 0 (kohya applies it only with its sigma-scaled prediction type); it is
    offered for parity, not as a recommendation.
    """
    t = jnp.asarray(t, jnp.float32)
    if scheme == "none":
        return jnp.ones_like(t)
    if scheme == "sigma_sqrt":
        return t**-2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    raise ValueError(f"unknown loss weighting {scheme!r}")


def per_sample_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every non-batch dim, in float32: shape [B]."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)


def flow_matching_loss(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Scalar loss: per-sample MSE, times the per-sample weights, averaged over the batch.

    This is diffusers' ``mean(mean(w (pred - target)^2, non-batch dims))``: the weights are not
    renormalised, so ``cosmap``/``sigma_sqrt`` also change the loss scale, as in the torch trainers.
    """
    per_sample = per_sample_mse(pred, target)
    if weights is not None:
        per_sample = per_sample * jnp.asarray(weights, jnp.float32)
    return per_sample.mean()


def sample_guidance(key: jax.Array, batch: int, value: float, range: tuple[float, float] | None = None) -> jax.Array:
    """Guidance fed to ``guidance_in``: the constant ``value``, or U(low, high) per sample if ``range``.

    ``range`` mirrors SimpleTuner's ``random-range`` mode; the default constant 1.0 is the Dev2Pro
    recipe (guidance > 1 would teach the distilled-CFG embedding instead of preserving it).
    """
    if range is None:
        return jnp.full((batch,), value, jnp.float32)
    low, high = range
    return jax.random.uniform(key, (batch,), jnp.float32, minval=low, maxval=high)
