"""Parity of the Flax Flux transformer with diffusers' FluxTransformer2DModel (fp32, random weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flux_jax import load_flux
from flux_jax.model.layers import timestep_embedding
from flux_jax.model.rope import apply_rope, rope_freqs
from tests.helpers.torch_reference import diffusers_flux, diffusers_forward, forward_inputs, jax_forward, tiny_config

MODEL_TOL = 1e-4
LAYER_TOL = 1e-5


def _layer(stacked: nnx.Module, i: int) -> nnx.Module:
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = tiny_config()
    ref = diffusers_flux(cfg)
    path = tmp_path_factory.mktemp("flux") / "transformer"
    ref.save_pretrained(path, max_shard_size="200KB")  # several shards + index, as the real checkpoints
    assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
    return cfg, ref, load_flux(path)


@pytest.mark.parametrize(
    "batch,h,w,txt_len", [(1, 4, 4, 5), (2, 3, 5, 7), (3, 6, 2, 4)], ids=["square", "wide", "tall"]
)
def test_whole_model_sharded_dir(pair, batch, h, w, txt_len):
    cfg, ref, model = pair
    inputs = forward_inputs(cfg, batch=batch, h=h, w=w, txt_len=txt_len, seed=batch)
    want = diffusers_forward(ref, inputs)
    got = jax_forward(model, inputs)
    assert got.shape == (batch, h * w, cfg.out_channels)
    np.testing.assert_allclose(got, want, atol=MODEL_TOL, rtol=0)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_whole_model_unsharded_dir(tmp_path, guidance):
    cfg = tiny_config(guidance_embed=guidance, depth=1, depth_single_blocks=2)
    ref = diffusers_flux(cfg, seed=7)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    model = load_flux(tmp_path)
    assert (model.guidance_in is not None) == guidance
    inputs = forward_inputs(cfg, batch=2, h=4, w=6, txt_len=3, seed=11)
    np.testing.assert_allclose(jax_forward(model, inputs), diffusers_forward(ref, inputs), atol=MODEL_TOL, rtol=0)


def _rope(ref, inputs):
    ids = np.concatenate([inputs["txt_ids"], inputs["img_ids"]], axis=0)
    cos, sin = ref.pos_embed(torch.from_numpy(ids))
    return (cos, sin), rope_freqs(jnp.asarray(ids)[None], ref.config.axes_dims_rope, 10_000)


def test_double_block(pair):
    cfg, ref, model = pair
    inputs = forward_inputs(cfg, batch=2, h=3, w=4, txt_len=5, seed=3)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 12, cfg.hidden_size)).astype(np.float32)
    txt = rng.standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
    vec = rng.standard_normal((2, cfg.hidden_size)).astype(np.float32)
    rotary, angles = _rope(ref, inputs)
    for i in range(cfg.depth):
        with torch.no_grad():
            want_txt, want_img = ref.transformer_blocks[i](
                torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(vec), rotary
            )
        got_img, got_txt = _layer(model.double_blocks, i)(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(vec), angles)
        np.testing.assert_allclose(np.asarray(got_img), want_img.numpy(), atol=LAYER_TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(got_txt), want_txt.numpy(), atol=LAYER_TOL, rtol=0)


def test_single_block(pair):
    cfg, ref, model = pair
    inputs = forward_inputs(cfg, batch=2, h=3, w=4, txt_len=5, seed=4)
    rng = np.random.default_rng(1)
    txt = rng.standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
    img = rng.standard_normal((2, 12, cfg.hidden_size)).astype(np.float32)
    vec = rng.standard_normal((2, cfg.hidden_size)).astype(np.float32)
    rotary, angles = _rope(ref, inputs)
    for i in range(cfg.depth_single_blocks):
        with torch.no_grad():
            want_txt, want_img = ref.single_transformer_blocks[i](
                torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(vec), rotary
            )
        x = jnp.concatenate([jnp.asarray(txt), jnp.asarray(img)], axis=1)
        got = np.asarray(_layer(model.single_blocks, i)(x, jnp.asarray(vec), angles))
        np.testing.assert_allclose(got[:, :5], want_txt.numpy(), atol=LAYER_TOL, rtol=0)
        np.testing.assert_allclose(got[:, 5:], want_img.numpy(), atol=LAYER_TOL, rtol=0)


def test_embedders_and_final_layer(pair):
    cfg, ref, model = pair
    rng = np.random.default_rng(2)
    t = rng.uniform(0, 1, (3,)).astype(np.float32)
    g = rng.uniform(1, 4, (3,)).astype(np.float32)
    y = rng.standard_normal((3, cfg.vec_in_dim)).astype(np.float32)
    emb = ref.time_text_embed
    with torch.no_grad():
        t_proj, g_proj = emb.time_proj(torch.from_numpy(t) * 1000), emb.time_proj(torch.from_numpy(g) * 1000)
        want_vec = (
            emb.timestep_embedder(t_proj) + emb.guidance_embedder(g_proj) + emb.text_embedder(torch.from_numpy(y))
        ).numpy()
    # The MLP embedders on identical sinusoid inputs (the sinusoid itself is tested separately below).
    got_vec = (
        model.time_in(jnp.asarray(t_proj.numpy()))
        + model.guidance_in(jnp.asarray(g_proj.numpy()))
        + model.vector_in(jnp.asarray(y))
    )
    np.testing.assert_allclose(np.asarray(got_vec), want_vec, atol=LAYER_TOL, rtol=0)

    x = rng.standard_normal((3, 7, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = ref.proj_out(ref.norm_out(torch.from_numpy(x), torch.from_numpy(want_vec))).numpy()
    got = np.asarray(model.final_layer(jnp.asarray(x), jnp.asarray(want_vec)))
    np.testing.assert_allclose(got, want, atol=LAYER_TOL, rtol=0)

    txt = rng.standard_normal((3, 5, cfg.context_in_dim)).astype(np.float32)
    with torch.no_grad():
        want_txt = ref.context_embedder(torch.from_numpy(txt)).numpy()
    np.testing.assert_allclose(np.asarray(model.txt_in(jnp.asarray(txt))), want_txt, atol=LAYER_TOL, rtol=0)


def test_timestep_embedding_is_exact():
    """[cos, sin](1000 t f_k), f_k = 10000^(-k/128), against the same formula in float64 from the fp32 arguments."""
    t = np.array([0.0, 0.1, 0.5, 0.73, 0.999, 1.0, 3.5], np.float32)
    exponent = np.float32(-np.log(10_000)) * np.arange(128, dtype=np.float32) / np.float32(128)  # fp32, as BFL
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = (t * np.float32(1000))[:, None].astype(np.float32) * freqs[None]
    want = np.concatenate([np.cos(args.astype(np.float64)), np.sin(args.astype(np.float64))], axis=-1)
    got = np.asarray(timestep_embedding(jnp.asarray(t)))
    np.testing.assert_allclose(got, want, atol=LAYER_TOL, rtol=0)


def test_timestep_embedding_matches_diffusers_layout():
    """Same [cos, sin] layout and frequencies as diffusers' `Timesteps(256, flip_sin_to_cos=True, shift=0)`."""
    from diffusers.models.embeddings import Timesteps

    from tests.helpers.torch_reference import exact_timestep_frequencies

    t = torch.tensor([0.0, 0.1, 0.5, 0.999, 1.0, 3.5])
    with exact_timestep_frequencies():
        want = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t * 1000).numpy()
    got = np.asarray(timestep_embedding(jnp.asarray(t.numpy())))
    np.testing.assert_allclose(got, want, atol=LAYER_TOL, rtol=0)


def test_timestep_frequencies_within_one_ulp_of_torch():
    import math

    from flux_jax.model.layers import timestep_frequencies

    torch_table = torch.exp(-math.log(10_000) * torch.arange(0, 128, dtype=torch.float32) / 128).numpy()
    ours = timestep_frequencies()
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - torch_table.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1


def test_rope_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes = (16, 56, 56)
    rng = np.random.default_rng(5)
    ids = np.zeros((20, 3), np.float32)
    ids[:, 1] = rng.integers(0, 64, 20)
    ids[:, 2] = rng.integers(0, 64, 20)
    x = rng.standard_normal((2, 20, 3, sum(axes))).astype(np.float32)
    cos, sin = FluxPosEmbed(theta=10_000, axes_dim=list(axes))(torch.from_numpy(ids))
    want = apply_rotary_emb(torch.from_numpy(x), (cos, sin), sequence_dim=1).numpy()
    got = np.asarray(apply_rope(jnp.asarray(x), rope_freqs(jnp.asarray(ids)[None], axes, 10_000)))
    np.testing.assert_allclose(got, want, atol=LAYER_TOL, rtol=0)
