"""3-axis rotary position embedding with adjacent-pair rotation (BFL `EmbedND` / `apply_rope`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _split_frequencies(axes_dim: tuple[int, ...], theta: int):
    """Per rotary pair: which id axis it reads, and its frequency as an exact sum of three fp32 constants.

    BFL computes RoPE in float64. Accelerators have no float64, and a plain fp32 `pos * omega` at positions near
    64-128 already errs by ~1e-5 after cos/sin. So omega (float64) is split into hi + mid + lo, where hi keeps
    only 12 significant bits: `pos * hi` is then exact in fp32 for integer positions below 4096, and the small
    remainder is added through the angle-sum identities, leaving errors near one fp32 ulp of cos/sin.
    """
    omega = np.concatenate([1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dim])
    axis = np.concatenate([np.full(d // 2, i) for i, d in enumerate(axes_dim)])
    omega32 = omega.astype(np.float32)
    hi = (omega32.view(np.int32) & np.int32(~0xFFF)).view(np.float32)  # top 12 significant bits
    mid = omega32 - hi  # exact
    lo = (omega - omega32.astype(np.float64)).astype(np.float32)
    return axis, hi, mid, lo


def rope_freqs(ids: jax.Array, axes_dim: tuple[int, ...], theta: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotation angles for position ids [B, L, n_axes], each [B, L, head_dim / 2] in fp32.

    Axis i owns axes_dim[i] head dimensions; the per-axis tables are concatenated in axis order.
    """
    axis, hi, mid, lo = _split_frequencies(tuple(axes_dim), theta)
    pos = ids.astype(jnp.float32)[..., axis]
    big = pos * hi  # exact for integer positions < 4096
    small = pos * mid + pos * lo
    cos_b, sin_b, cos_s, sin_s = jnp.cos(big), jnp.sin(big), jnp.cos(small), jnp.sin(small)
    return cos_b * cos_s - sin_b * sin_s, sin_b * cos_s + cos_b * sin_s


def apply_rope(x: jax.Array, freqs: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate adjacent pairs (x[2p], x[2p+1]) of x [B, L, heads, head_dim] by (cos, sin) [B, L, head_dim / 2]."""
    cos, sin = freqs[0][:, :, None, :], freqs[1][:, :, None, :]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = x32[..., 0], x32[..., 1]
    out = jnp.stack([cos * even - sin * odd, sin * even + cos * odd], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
