"""The sampler's own contract: compiled once per shape and mode, the same on a sharded mesh as on one device,
each tool's T5 length and uint8 rounding, and clear errors for bad settings and bases."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax.data.demo import DemoDims, build_demo_encoders
from flux_jax.errors import CheckpointError
from flux_jax.model.config import preset
from flux_jax.sampling.loading import load_transformer, load_vae_for, resolve_base
from flux_jax.sampling.prompts import PromptEncoder
from flux_jax.sampling.sampler import FluxSampler, SampleSettings, SamplingError, to_uint8
from flux_jax.sharding import make_mesh
from flux_jax.weights.convert import convert_checkpoint
from tests.helpers.lora_reference import randomize_lora
from tests.helpers.torch_reference import diffusers_flux

PROMPTS = ["a photo of a red fox", "a lighthouse at dusk"]
SMALL = SampleSettings(width=32, height=48, steps=2, guidance=3.5, seed=7)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A FLUX.1 pipeline directory (tiny): demo encoders plus a diffusers transformer; and the same transformer
    as a BFL single file."""
    root = tmp_path_factory.mktemp("pipe")
    cfg = preset("tiny")
    build_demo_encoders(root, dims=DemoDims(t5_dim=cfg.context_in_dim, clip_dim=cfg.vec_in_dim))
    diffusers_flux(cfg, seed=1).save_pretrained(root / "transformer")  # torch builds it faster than eager JAX
    convert_checkpoint(root / "transformer", root.parent / "flux-tiny.safetensors", layout="bfl")
    return root


def _sampler(pipeline, mesh, dtype: str = "fp32"):
    """A sampler whose transformer computes in ``dtype`` (the VAE and the text encoders stay fp32)."""
    base = resolve_base(pipeline)
    model = load_transformer(base.transformer, dtype=dtype, compute_dtype=dtype, mesh=mesh)
    vae = load_vae_for(base.encoders, dtype="fp32", mesh=mesh)
    text = PromptEncoder.load(base.encoders, mesh=mesh, dtype="fp32")
    return FluxSampler.from_model(model, vae, mesh=mesh), text


@pytest.fixture(scope="module")
def one_device(pipeline):
    return _sampler(pipeline, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def test_repeated_calls_do_not_retrace(one_device):
    sampler, text = one_device
    cond = text.encode(PROMPTS)
    first = sampler.latents(cond, SMALL)
    assert sampler.traces == 1
    # New prompts, seed, guidance: same shapes and mode, so the same compiled loop.
    again = sampler.latents(text.encode(PROMPTS[::-1]), replace(SMALL, seed=8, guidance=2.0))
    assert sampler.traces == 1
    assert not np.array_equal(np.asarray(first), np.asarray(again))
    same = sampler.latents(cond, SMALL)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(same))  # a seed reproduces exactly
    assert sampler.traces == 1
    sampler.latents(cond, replace(SMALL, steps=3))  # another step count: one more
    assert sampler.traces == 2


def test_true_cfg_is_one_batched_call_and_cfg_scale_does_not_retrace(one_device):
    sampler, text = one_device
    cond, neg = text.encode_with_negative(PROMPTS, "blurry")
    settings = replace(SMALL, guidance=1.0, cfg=2.0)
    before = sampler.traces
    a = sampler.latents(cond, settings, negative=neg)
    b = sampler.latents(cond, replace(settings, cfg=4.0), negative=neg)
    assert sampler.traces == before + 1
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    plain = sampler.latents(cond, replace(settings, cfg=1.0), negative=neg)
    # cfg 1 is v_pos exactly: the distilled path (negative ignored, as diffusers does at true_cfg_scale 1).
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(sampler.latents(cond, replace(settings, cfg=1.0))))


def test_fsdp_sharded_sampler_equals_one_device(pipeline, one_device):
    """The base FSDP-sharded over 8 devices (as on a pod): the same images as on one device."""
    sharded, text8 = _sampler(pipeline, make_mesh(1, -1, 1))
    assert len(jax.tree.leaves(sharded.params)[0].sharding.device_set) == 8
    single, text1 = one_device
    got = sharded.images(text8.encode(PROMPTS), SMALL)
    want = single.images(text1.encode(PROMPTS), SMALL)
    assert got.shape == (2, 48, 32, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float rounding may flip a pixel by one level
    np.testing.assert_allclose(
        np.asarray(sharded.latents(text8.encode(PROMPTS), SMALL)),
        np.asarray(single.latents(text1.encode(PROMPTS), SMALL)),
        atol=1e-5,
        rtol=0,
    )


def test_every_match_samples_in_bf16(pipeline):
    """The bf16 path of each tool's recipe (its own Euler form and rounding points) on one sampler."""
    sampler, text = _sampler(pipeline, make_mesh(1, 1, 1, devices=jax.devices()[:1]), dtype="bf16")
    assert sampler.dtype == "bf16"  # from the model's compute dtype
    latents = {}
    for match in ("diffusers", "comfyui", "bfl"):
        settings = replace(SMALL, width=32, height=32, steps=2, match=match)
        latents[match] = np.asarray(sampler.latents(text.encode(PROMPTS[:1], match=match), settings))
        assert np.isfinite(latents[match]).all() and latents[match].std() > 0.1
    assert sampler.traces == 3
    # diffusers and BFL differ only in where dsigma is rounded (and the model's timestep): close, not equal.
    assert not np.array_equal(latents["diffusers"], latents["bfl"])
    np.testing.assert_allclose(latents["diffusers"], latents["bfl"], atol=0.1)
    square = replace(SMALL, width=32, height=32)
    image = sampler.decode(sampler.latents(text.encode(PROMPTS[:1]), square), square)
    assert image.dtype == np.uint8 and image.std() > 0


def test_t5_lengths_follow_the_tool(one_device):
    _, text = one_device
    assert text.encode(PROMPTS).t5.shape[1] == 512
    assert text.encode(PROMPTS, schnell=True).t5.shape[1] == 256
    assert text.encode(PROMPTS, match="comfyui").t5.shape[1] == 77
    long = " ".join(["fox"] * 100)
    tokens = len(text.t5_tokenizer([long])["input_ids"][0])
    assert tokens > 77
    assert text.encode([long], match="comfyui").t5.shape[1] == tokens  # ComfyUI does not truncate


def test_uint8_rounding_is_each_tools():
    # VAE outputs whose [0, 255] image sits at .2 and .7 of a level: diffusers rounds, BFL and ComfyUI truncate.
    levels = np.array([100.2, 100.7, -5.0, 300.0], np.float32)
    x = levels / np.float32(127.5) - np.float32(1)
    assert to_uint8(x, "diffusers").tolist() == [100, 101, 0, 255]
    assert to_uint8(x, "bfl").tolist() == [100, 100, 0, 255]
    assert to_uint8(x, "comfyui").tolist() == [100, 100, 0, 255]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 40}, "width 40 is not a positive multiple of 16"),
        ({"height": 0}, "height 0"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"cfg": 0.0}, "cfg must be a positive number"),
        ({"match": "forge"}, "match 'forge'"),
    ],
)
def test_bad_settings_are_refused_before_compiling(one_device, change, message):
    sampler, text = one_device
    before = sampler.traces
    with pytest.raises(SamplingError, match=message):
        sampler.latents(text.encode(PROMPTS[:1]), replace(SMALL, **change))
    assert sampler.traces == before


def test_cfg_needs_a_negative_prompt_and_noise_its_shape(one_device):
    sampler, text = one_device
    cond = text.encode(PROMPTS[:1])
    with pytest.raises(SamplingError, match="needs a negative prompt"):
        sampler.latents(cond, replace(SMALL, cfg=3.0))
    with pytest.raises(SamplingError, match=r"initial latents have shape \(1, 16, 4, 4\)"):
        sampler.latents(cond, SMALL, noise=np.zeros((1, 16, 4, 4), np.float32))


def test_explicit_initial_latents_replace_the_seed(one_device):
    sampler, text = one_device
    cond = text.encode(PROMPTS[:1])
    noise = sampler.initial_noise(SMALL, 1)
    np.testing.assert_array_equal(
        np.asarray(sampler.latents(cond, SMALL, noise=noise)), np.asarray(sampler.latents(cond, SMALL))
    )
    other = np.asarray(sampler.latents(cond, SMALL, noise=noise * 0.5))
    assert not np.array_equal(other, np.asarray(sampler.latents(cond, SMALL)))


def test_bases_are_checked_before_any_weights_are_read(pipeline, tmp_path):
    with pytest.raises(CheckpointError, match="no such base"):
        resolve_base(tmp_path / "missing")
    transformer = pipeline.parent / "flux-tiny.safetensors"
    with pytest.raises(CheckpointError, match="without its encoders"):
        resolve_base(transformer)
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "vae").mkdir()
    with pytest.raises(CheckpointError, match="no text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/"):
        resolve_base(transformer, tmp_path / "enc")
    base = resolve_base(transformer, pipeline)
    assert base.transformer == str(transformer) and base.encoders.vae == pipeline / "vae"


def test_extra_states_complete_or_replace_the_params(pipeline, one_device):
    """The trainer's way: the frozen base as ``params`` and the LoRA values per call as ``extra``, completing the
    model; over a model that has adapters, ``extra`` replaces their values."""
    mesh = one_device[0].mesh
    base = resolve_base(pipeline)
    model = load_transformer(base.transformer, dtype="fp32", compute_dtype="fp32", mesh=mesh)
    randomize_lora(model, rank=2, alpha=2.0, targets="all_blocks", seed=3, up_std=0.5)
    vae = load_vae_for(base.encoders, dtype="fp32", mesh=mesh)
    cond = one_device[1].encode(PROMPTS[:1])
    whole = FluxSampler.from_model(model, vae, mesh=mesh)
    want = np.asarray(whole.latents(cond, SMALL))
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    split = FluxSampler(graphdef, (frozen,), vae, config=model.config, dtype="fp32", mesh=mesh)
    np.testing.assert_array_equal(np.asarray(split.latents(cond, SMALL, extra=lora)), want)
    zero = jax.tree.map(jnp.zeros_like, lora)  # B = 0 as well as A: the adapters add nothing
    plain = np.asarray(one_device[0].latents(cond, SMALL))
    np.testing.assert_allclose(np.asarray(whole.latents(cond, SMALL, extra=zero)), plain, atol=1e-6, rtol=0)
    assert np.abs(want - plain).max() > 1e-3  # the LoRA did change the picture


def test_the_vae_decodes_one_image_at_a_time_with_one_program(one_device):
    # FLUX.1's decoder needs ~3 GiB per 1024 px image: decoding a batch at once outgrew a v5e chip during
    # validation. One compiled program of one image serves every batch size, and the images are those of decoding
    # each latent on its own.
    sampler, text = one_device
    settings = replace(SMALL, width=32, height=32)
    latents = sampler.latents(text.encode(PROMPTS[:2]), replace(settings, seed=3))
    assert latents.shape[0] == 2
    batch = sampler.decode(latents, settings)
    alone = [sampler.decode(latents[i : i + 1], settings) for i in range(2)]
    np.testing.assert_array_equal(batch, np.concatenate(alone))
    f = sampler.vae_config.spatial_factor
    lowered = sampler._decode.lower(sampler._decoder[1], latents, np.int32(0), unscale_dtype=jnp.float32,
                                    h=settings.height // f, w=settings.width // f)  # fmt: skip
    assert lowered.out_info.shape == (1, 32, 32, 3)  # the program for a batch of 2 decodes one image
