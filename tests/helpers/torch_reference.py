"""Builders for tiny random PyTorch reference models in the real key layouts (diffusers / BFL)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from flux_jax.model.config import FluxConfig


def tiny_config(**overrides) -> FluxConfig:
    """A small Flux with every structural feature (head_dim 16 -> RoPE axes must be given explicitly)."""
    base = dict(
        in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64, num_heads=4,
        depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6), guidance_embed=True,
    )  # fmt: skip
    base.update(overrides)
    return FluxConfig(**base)


def diffusers_flux(cfg: FluxConfig, seed: int = 0):
    """A diffusers FluxTransformer2DModel with random (non-default, non-zero) weights, in fp32 eval mode."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            # Default inits leave norms at 1 and some layers at 0; random everything so no mapping error hides.
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval().float()


def forward_inputs(cfg: FluxConfig, *, batch: int, h: int, w: int, txt_len: int, seed: int = 0):
    """BFL-style inputs as NumPy: packed latents over an (h, w) token grid, ids, text, t, pooled, guidance."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((batch, h * w, cfg.in_channels)).astype(np.float32)
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    img_ids = ids.reshape(h * w, 3)
    txt = rng.standard_normal((batch, txt_len, cfg.context_in_dim)).astype(np.float32)
    txt_ids = np.zeros((txt_len, 3), np.float32)
    t = rng.uniform(0.05, 0.95, (batch,)).astype(np.float32)
    y = rng.standard_normal((batch, cfg.vec_in_dim)).astype(np.float32)
    guidance = rng.uniform(1.0, 4.0, (batch,)).astype(np.float32)
    return dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance)


@contextlib.contextmanager
def exact_timestep_frequencies():
    """Make diffusers' sinusoidal embedding use the correctly rounded frequency table (see
    `flux_jax.model.layers.timestep_frequencies`).

    PyTorch's fp32 `exp` is within one ulp but not correctly rounded, and the embedding multiplies the table by
    up to 1000 x guidance: one ulp in a frequency then shifts sin/cos by up to ~2e-4 and a whole-model comparison
    would measure libm, not the model. Everything else in the reference stays PyTorch's own code.
    `test_timestep_frequencies_within_one_ulp_of_torch` checks the two tables agree to one ulp.
    """
    import diffusers.models.embeddings as emb

    from flux_jax.model.layers import timestep_frequencies

    original = emb.get_timestep_embedding

    def patched(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
        assert downscale_freq_shift == 0 and scale == 1 and flip_sin_to_cos, "only Flux's settings are patched"
        freqs = torch.from_numpy(timestep_frequencies(embedding_dim, max_period)).to(timesteps.device)
        args = timesteps[:, None].float() * freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    emb.get_timestep_embedding = patched
    try:
        yield
    finally:
        emb.get_timestep_embedding = original


def diffusers_forward(model, inputs: dict) -> np.ndarray:
    with torch.no_grad(), exact_timestep_frequencies():
        out = model(
            hidden_states=torch.from_numpy(inputs["img"]),
            encoder_hidden_states=torch.from_numpy(inputs["txt"]),
            pooled_projections=torch.from_numpy(inputs["y"]),
            timestep=torch.from_numpy(inputs["timesteps"]),
            img_ids=torch.from_numpy(inputs["img_ids"]),
            txt_ids=torch.from_numpy(inputs["txt_ids"]),
            guidance=torch.from_numpy(inputs["guidance"]) if model.config.guidance_embeds else None,
            return_dict=False,
        )[0]
    return out.numpy()


def jax_forward(model, inputs: dict) -> np.ndarray:
    import jax.numpy as jnp

    cfg = model.config
    return np.asarray(
        model(
            jnp.asarray(inputs["img"]),
            jnp.asarray(inputs["img_ids"]),
            jnp.asarray(inputs["txt"]),
            jnp.asarray(inputs["txt_ids"]),
            jnp.asarray(inputs["timesteps"]),
            jnp.asarray(inputs["y"]),
            jnp.asarray(inputs["guidance"]) if cfg.guidance_embed else None,
        )
    )
