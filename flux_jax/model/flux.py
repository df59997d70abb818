"""The Flux.1 transformer (BFL `Flux`) in Flax NNX, with stacked blocks run by `lax.scan`."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.model.blocks import ACT, DoubleStreamBlock, SingleStreamBlock
from flux_jax.model.config import FluxConfig
from flux_jax.model.layers import LastLayer, Linear, MLPEmbedder, timestep_embedding
from flux_jax.model.rope import rope_freqs
from flux_jax.sharding import constrain

RematPolicy = Literal["none", "full", "save_matmuls"]
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "save_matmuls")


def _checkpoint(fn, policy: RematPolicy):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "save_matmuls":
        # Keep the outputs of weight matmuls ([B, L, in] x [in, out] has no batch dims), recompute the rest
        # (norms, activations, attention), trading memory for skipping the expensive recomputation.
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"unknown remat policy {policy!r}; choose one of {REMAT_POLICIES}")


def scan_blocks(blocks: nnx.Module, carry, step, remat: RematPolicy):
    """Run `step(block, carry) -> carry` over the leading "layers" axis of a stacked block module.

    The block is split into its graph definition and state once; `lax.scan` slices the state per layer, so the
    block body is traced and compiled once whatever the depth (19 or 38).
    """
    graphdef, state = nnx.split(blocks)

    def body(carry, layer_state):
        return step(nnx.merge(graphdef, layer_state), carry), None

    carry, _ = jax.lax.scan(_checkpoint(body, remat), carry, state)
    return carry


class Flux(nnx.Module):
    """`model(img, img_ids, txt, txt_ids, timesteps, y, guidance)` -> predicted velocity [B, L_img, out_channels].

    Arguments follow BFL's `Flux.forward`: packed latents [B, L, in_channels], ids [B, L, 3] (or [L, 3]), T5 states
    [B, L_txt, context_in_dim], text ids, timesteps in [0, 1] (1 = noise), pooled CLIP [B, vec_in_dim], raw
    guidance [B] (e.g. 1.0 for Dev2Pro; required iff the config has a guidance embedding).
    """

    def __init__(
        self,
        cfg: FluxConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        attention: str = "xla",
        remat: RematPolicy = "none",
    ):
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        h = cfg.hidden_size
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.img_in = Linear(cfg.in_channels, h, axes=("in_feat", "embed"), **kw)
        self.time_in = MLPEmbedder(256, h, **kw)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h, **kw)
        self.guidance_in = MLPEmbedder(256, h, **kw) if cfg.guidance_embed else None
        self.txt_in = Linear(cfg.context_in_dim, h, axes=("in_feat", "embed"), **kw)
        blocks_kw = dict(kw, attention_impl=attention)
        self.double_blocks = DoubleStreamBlock(cfg, stack=cfg.depth, **blocks_kw)
        self.single_blocks = SingleStreamBlock(cfg, stack=cfg.depth_single_blocks, **blocks_kw)
        self.final_layer = LastLayer(h, cfg.out_channels, **kw)

    def __call__(
        self,
        img: jax.Array,
        img_ids: jax.Array,
        txt: jax.Array,
        txt_ids: jax.Array,
        timesteps: jax.Array,
        y: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {img.shape} and {txt.shape}")
        batch = img.shape[0]
        img_ids = jnp.broadcast_to(img_ids, (batch, *img_ids.shape[-2:]))
        txt_ids = jnp.broadcast_to(txt_ids, (batch, *txt_ids.shape[-2:]))

        img = constrain(self.img_in(img), ACT)
        vec = self.time_in(timestep_embedding(jnp.broadcast_to(timesteps, (batch,))).astype(self.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux model has a guidance embedding (dev / Dev2Pro): pass guidance, e.g. 1.0")
            g = timestep_embedding(jnp.broadcast_to(jnp.asarray(guidance), (batch,))).astype(self.dtype)
            vec = vec + self.guidance_in(g)
        vec = vec + self.vector_in(y)
        txt = constrain(self.txt_in(txt), ACT)

        pe = rope_freqs(jnp.concatenate([txt_ids, img_ids], axis=1), cfg.axes_dim, cfg.theta)

        def double_step(block, carry):
            return block(*carry, vec, pe)

        img, txt = scan_blocks(self.double_blocks, (img, txt), double_step, self.remat)
        x = jnp.concatenate([txt, img], axis=1)
        x = scan_blocks(self.single_blocks, x, lambda block, x: block(x, vec, pe), self.remat)
        x = x[:, txt.shape[1] :]
        return self.final_layer(x, vec)


def configure(model: Flux, *, attention: str | None = None, remat: RematPolicy | None = None) -> Flux:
    """Change the attention kernel or remat policy of a built model in place (both are static attributes)."""
    if remat is not None:
        _checkpoint(lambda c, s: c, remat)  # validates the name
        model.remat = remat
    if attention is not None:
        from flux_jax.model.attention import CHOICES

        if attention not in CHOICES:
            raise ValueError(f"unknown attention implementation {attention!r}; choose one of {CHOICES}")
        model.double_blocks.attention_impl = attention
        model.single_blocks.attention_impl = attention
    return model
