"""The transformer's view of an image: 2x2-packed latent tokens and their position ids.

The VAE's latent [h, w, 16] becomes [(h/2)(w/2), 64] tokens (diffusers `FluxPipeline._pack_latents`, BFL's
`b c (h ph) (w pw) -> b (h w) (c ph pw)`), and each token gets the id (0, row, col) of its place in the token grid.
Caching, training, planning and sampling all pack and number tokens here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Pixels per packed latent token along each axis: the VAE downsamples by 8, then 2x2 patches are packed.
PIXELS_PER_TOKEN = 16


def image_ids(height: int, width: int) -> np.ndarray:
    """BFL image position ids [height * width, 3] float32 for a token grid: (0, row, col), row-major.

    Channel 0 is the image/reference index (0), channel 1 the token row, channel 2 the token column."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(width, dtype=np.float32)[None, :]
    return ids.reshape(height * width, 3)


def pack_latents(z: jax.Array, *, channels_last: bool = True) -> jax.Array:
    """[B, h, w, C] (or [B, C, h, w] with channels_last=False) -> [B, (h/2)(w/2), 4C].

    Tokens are the 2x2 patches in row-major order; feature index = c*4 + ph*2 + pw, exactly
    diffusers `FluxPipeline._pack_latents` / BFL's `b c (h ph) (w pw) -> b (h w) (c ph pw)`.
    """
    if not channels_last:
        z = jnp.moveaxis(z, 1, -1)
    b, h, w, c = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    z = z.reshape(b, h // 2, 2, w // 2, 2, c)
    z = z.transpose(0, 1, 3, 5, 2, 4)  # [B, h/2, w/2, C, ph, pw]
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: jax.Array, h: int, w: int, *, channels_last: bool = True) -> jax.Array:
    """Inverse of `pack_latents`; h and w are the latent (not token-grid) height and width."""
    b, n, f = tokens.shape
    if h % 2 or w % 2 or n != (h // 2) * (w // 2) or f % 4:
        raise ValueError(f"cannot unpack {tokens.shape} into a {h}x{w} latent")
    c = f // 4
    z = tokens.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)
    return z if channels_last else jnp.moveaxis(z, -1, 1)


def latent_image_ids(h: int, w: int) -> np.ndarray:
    """Position ids [(h/2)(w/2), 3] float32 for a latent of height h, width w (before packing).

    Channel 0 is 0 (the image/reference index), channel 1 the token row, channel 2 the token
    column; rows are in `pack_latents` token order.
    """
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    return image_ids(h // 2, w // 2)
