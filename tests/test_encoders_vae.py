"""Flux VAE: fp32 parity with diffusers AutoencoderKL, BFL-layout loading, export round trip, packing."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax.encoders.keys import path_str
from flux_jax.encoders.vae import (
    AutoEncoder,
    VAEConfig,
    denormalize_latents,
    detect_vae_layout,
    export_vae,
    infer_vae_config,
    load_vae,
    normalize_latents,
)
from flux_jax.errors import CheckpointError
from flux_jax.model.latents import latent_image_ids, pack_latents, unpack_latents

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # fp32 parity; never loosen (see style_anchors.md lesson 8)
CFG = VAEConfig.tiny()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, norms included, so that a mis-mapped norm or bias shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + (1.0 if p.ndim == 1 else 0.0) * p)


@pytest.fixture(scope="module")
def ref() -> torch.nn.Module:
    model = diffusers.AutoencoderKL(**CFG.to_diffusers()).eval()
    _randomize(model, seed=0)
    return model


@pytest.fixture(scope="module")
def state(ref) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def vae(state) -> AutoEncoder:
    return load_vae(state, CFG)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    # Non-square, so a swapped H/W anywhere changes the result.
    return np.random.RandomState(0).uniform(-1, 1, (2, 48, 32, 3)).astype(np.float32)


@nnx.jit
def _encode(model: AutoEncoder, x: jnp.ndarray) -> jnp.ndarray:
    return model.encode(x)


@nnx.jit
def _decode(model: AutoEncoder, z: jnp.ndarray) -> jnp.ndarray:
    return model.decode(z)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref_mean(ref, images) -> np.ndarray:
    with torch.no_grad():
        return _nhwc(ref.encode(_nchw(images)).latent_dist.mean)


def test_encode_matches_diffusers(vae, images, ref_mean):
    ours = np.asarray(_encode(vae, jnp.asarray(images)))
    assert ours.shape == (2, 48 // CFG.spatial_factor, 32 // CFG.spatial_factor, CFG.latent_channels)
    np.testing.assert_allclose(ours, ref_mean, rtol=0, atol=TOL)


def test_decode_matches_diffusers(vae, ref, ref_mean):
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(ref_mean)).sample)
    ours = np.asarray(_decode(vae, jnp.asarray(ref_mean)))
    assert ours.shape == (2, 48, 32, 3)
    np.testing.assert_allclose(ours, want, rtol=0, atol=TOL)


def test_normalize_and_pack_match_flux_pipeline(vae, images, ref_mean):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    b, h, w, c = ref_mean.shape
    latents = (_nchw(ref_mean) - CFG.shift_factor) * CFG.scaling_factor  # diffusers' training scripts
    want = FluxPipeline._pack_latents(latents, b, c, h, w).numpy()

    z = normalize_latents(_encode(vae, jnp.asarray(images)), CFG)
    packed = np.asarray(pack_latents(z))
    assert packed.shape == (b, (h // 2) * (w // 2), 4 * c)
    np.testing.assert_allclose(packed, want, rtol=0, atol=TOL)

    # NCHW input gives the same tokens; unpack and denormalize invert exactly.
    np.testing.assert_array_equal(np.asarray(pack_latents(jnp.moveaxis(z, -1, 1), channels_last=False)), packed)
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(packed), h, w)), np.asarray(z))
    np.testing.assert_allclose(np.asarray(denormalize_latents(z, CFG)), np.asarray(_encode(vae, images)), atol=1e-6)


def test_unpack_matches_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    tokens = np.random.RandomState(1).randn(2, 3 * 5, 64).astype(np.float32)
    # diffusers takes the pixel size and its VAE scale factor (8): latent 6x10 <-> pixels 48x80.
    want = FluxPipeline._unpack_latents(torch.from_numpy(tokens), 48, 80, 8).numpy()
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(tokens), 6, 10, channels_last=False)), want)


def test_latent_image_ids_match_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    h, w = 6, 10  # latent size; the token grid is 3x5
    want = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32).numpy()
    ids = latent_image_ids(h, w)
    assert ids.dtype == np.float32
    np.testing.assert_array_equal(ids, want)


def _to_bfl(state: dict[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """diffusers -> BFL `ae.safetensors` names, written out independently of the library's key table
    (flux_formats.md section 4)."""
    literal = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.", r"\1.mid.attn_1.q."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.", r"\1.mid.attn_1.k."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.", r"\1.mid.attn_1.v."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in literal:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", new)
        if m:
            level = num_levels - 1 - int(m.group(1))  # BFL numbers decoder levels by resolution
            if m.group(2) == "resnets":
                new = f"decoder.up.{level}.block.{m.group(3)}.{m.group(4)}"
            else:
                new = f"decoder.up.{level}.upsample.{m.group(4)}"
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new):
            value = value[:, :, None, None]  # BFL's attention projections are 1x1 convs
        out[new] = value
    return out


def test_bfl_layout_loads_to_same_outputs(state, vae, images):
    bfl = _to_bfl(state, CFG.num_levels)
    assert "decoder.up.0.block.0.nin_shortcut.weight" not in bfl  # tiny config: channels change elsewhere
    assert detect_vae_layout(bfl) == "bfl" and detect_vae_layout(state) == "diffusers"
    loaded = load_vae(bfl, CFG)
    x = jnp.asarray(images)
    np.testing.assert_array_equal(np.asarray(_encode(loaded, x)), np.asarray(_encode(vae, x)))
    z = _encode(vae, x)
    np.testing.assert_array_equal(np.asarray(_decode(loaded, z)), np.asarray(_decode(vae, z)))
    # Export goes back to exactly the BFL names and tensors.
    exported = export_vae(loaded, "bfl")
    assert exported.keys() == bfl.keys()
    for k in bfl:
        np.testing.assert_array_equal(exported[k], bfl[k], err_msg=k)


def test_config_inferred_from_shapes(state):
    base = VAEConfig(norm_num_groups=CFG.norm_num_groups)  # group count is not visible in shapes
    assert infer_vae_config(state, "diffusers", base) == CFG
    assert infer_vae_config(_to_bfl(state, CFG.num_levels), "bfl", base) == CFG
    assert VAEConfig.from_diffusers(diffusers.AutoencoderKL(**CFG.to_diffusers()).config) == CFG


def test_export_round_trip_loads_in_torch(vae, state):
    exported = export_vae(vae)
    assert exported.keys() == state.keys()
    fresh = diffusers.AutoencoderKL(**CFG.to_diffusers())
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)


def test_checkpoint_errors_list_every_problem(state):
    bad = dict(state)
    del bad["decoder.conv_out.bias"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["encoder.conv_in.weight"] = np.zeros((7, 3, 3, 3), np.float32)
    with pytest.raises(CheckpointError) as e:
        load_vae(bad, CFG)
    msg = str(e.value)
    assert "decoder.conv_out.bias" in msg and "encoder.extra.weight" in msg and "encoder.conv_in.weight" in msg
    with pytest.raises(CheckpointError):
        load_vae({"foo": np.zeros(1)})


def test_params_carry_logical_axes(vae):
    axes = {path_str(p): v.get_metadata().get("logical_axes") for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
    assert all(a is not None for a in axes.values())
    assert axes["encoder.conv_in.kernel"] == (None, None, "conv_in", "conv_out")
    assert axes["decoder.mid.attn_1.q.kernel"] == ("conv_in", "conv_out")
    assert axes["encoder.mid.attn_1.norm.scale"] == (None,)


def test_flux_preset_matches_bfl_params():
    cfg = VAEConfig.flux()
    assert cfg.block_out_channels == tuple(128 * m for m in (1, 2, 4, 4))
    assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (16, 0.3611, 0.1159)
    assert cfg.spatial_factor == 8
