"""The JAX sampler against diffusers' own FluxPipeline, built from tiny random components made here.

One pipeline directory in the real FLUX.1 layout (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/): diffusers reads it with its own classes, flux-jax through `sampling.loading`. Same prompts and
initial latents; fp32; final latents within 1e-4 and the decoded image (in [0, 1]) within 1e-3, for
guidance-distilled sampling, true CFG, a non-square size, batch 2, and a LoRA that diffusers loads with
`load_lora_weights`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flux_jax.data.demo import DemoDims, build_demo_encoders
from flux_jax.lora_io.adapters import lora_weights_from_model
from flux_jax.lora_io.export import write_lora_file
from flux_jax.lora_io.import_ import apply_lora_file
from flux_jax.sampling.loading import load_transformer, load_vae_for, resolve_base
from flux_jax.sampling.prompts import PromptEncoder
from flux_jax.sampling.sampler import FluxSampler, SampleSettings, to_unit
from flux_jax.sharding import make_mesh
from tests.helpers.lora_reference import quiet_diffusers, randomize_lora
from tests.helpers.tiny_pipeline import load_torch_pipeline
from tests.helpers.torch_reference import diffusers_flux, exact_timestep_frequencies, tiny_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

LATENT_TOL = 1e-4  # fp32 whole-model parity; never loosen
IMAGE_TOL = 1e-3
PROMPTS = ["a photo of a red fox in the snow", "a watercolor painting of a lighthouse"]
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_pipeline")
    cfg = tiny_config()
    build_demo_encoders(root, dims=DemoDims(t5_dim=cfg.context_in_dim, clip_dim=cfg.vec_in_dim))
    diffusers_flux(cfg, seed=3).save_pretrained(root / "transformer", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def torch_pipe(pipeline_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler_config.json.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return load_torch_pipeline(pipeline_dir, scheduler)


@pytest.fixture(scope="module")
def jax_side(pipeline_dir):
    # One device: the sharded sampler is checked against this one in test_sampling_sampler.py.
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    base = resolve_base(pipeline_dir)
    model = load_transformer(base.transformer, dtype="fp32", compute_dtype="fp32", mesh=mesh)
    vae = load_vae_for(base.encoders, dtype="fp32", mesh=mesh)
    text = PromptEncoder.load(base.encoders, mesh=mesh, dtype="fp32")
    return dict(model=model, vae=vae, text=text, mesh=mesh, transformer=base.transformer)


def _noise(batch: int, settings: SampleSettings, seed: int = 0) -> np.ndarray:
    h, w = settings.height // 8, settings.width // 8
    return np.random.default_rng(seed).standard_normal((batch, 16, h, w)).astype(np.float32)


def _torch_run(pipe, prompts, settings: SampleSettings, noise: np.ndarray, **kw):
    """(final packed latents, image in [0, 1]) from the pipeline; the decode is the pipeline's own steps for
    ``output_type="np"`` (unpack, un-scale, VAE decode, postprocess), run once on the latents it returned."""
    b, c, h, w = noise.shape
    packed = pipe._pack_latents(torch.from_numpy(noise), b, c, h, w)
    with torch.no_grad(), exact_timestep_frequencies():
        latents = pipe(
            prompt=prompts, height=settings.height, width=settings.width, num_inference_steps=settings.steps,
            guidance_scale=settings.guidance, latents=packed, max_sequence_length=512, output_type="latent", **kw,
        ).images  # fmt: skip
        z = pipe._unpack_latents(latents, settings.height, settings.width, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="np")
    return latents.numpy(), image


def _jax_run(side, prompts, settings: SampleSettings, noise, negative=None, model=None):
    sampler = FluxSampler.from_model(model or side["model"], side["vae"], mesh=side["mesh"], dtype="fp32")
    cond, neg = side["text"].encode_with_negative(prompts, negative, match=settings.match)
    latents = sampler.latents(cond, settings, negative=neg, noise=noise)
    return np.asarray(latents), to_unit(sampler.decode_raw(latents, settings))


def _check(got, want):
    (lat, img), (lat_ref, img_ref) = got, want
    assert lat.shape == lat_ref.shape and img.shape == img_ref.shape
    np.testing.assert_allclose(lat, lat_ref, atol=LATENT_TOL, rtol=0)
    np.testing.assert_allclose(img, img_ref, atol=IMAGE_TOL, rtol=0)
    assert np.abs(lat - np.asarray(0)).max() > 0.1  # a real trajectory, not an all-zero agreement


@pytest.mark.parametrize(("size", "batch"), [((64, 64), 1), ((96, 64), 2)], ids=["square-batch1", "nonsquare-batch2"])
def test_guidance_distilled_matches_flux_pipeline(torch_pipe, jax_side, size, batch):
    settings = SampleSettings(width=size[0], height=size[1], steps=4, guidance=3.5)
    noise = _noise(batch, settings)
    prompts = PROMPTS[:batch]
    _check(_jax_run(jax_side, prompts, settings, noise), _torch_run(torch_pipe, prompts, settings, noise))


def test_true_cfg_matches_flux_pipeline(torch_pipe, jax_side):
    """De-distilled sampling: guidance embedding 1.0, negative prompt, true_cfg_scale 2.5 (two branches)."""
    settings = SampleSettings(width=64, height=80, steps=3, guidance=1.0, cfg=2.5)
    noise = _noise(2, settings, seed=1)
    want = _torch_run(torch_pipe, PROMPTS, settings, noise, negative_prompt=NEGATIVE, true_cfg_scale=2.5)
    _check(_jax_run(jax_side, PROMPTS, settings, noise, negative=NEGATIVE), want)


def test_lora_matches_load_lora_weights(torch_pipe, jax_side, tmp_path):
    """A LoRA file written by flux-jax, loaded by diffusers' `load_lora_weights` and by `apply_lora_file`."""
    cfg = jax_side["model"].config
    donor = load_transformer(jax_side["transformer"], dtype="fp32", compute_dtype="fp32", mesh=jax_side["mesh"])
    randomize_lora(donor, rank=4, alpha=8.0, targets="all_blocks", seed=5, up_std=0.2)
    path = write_lora_file(tmp_path / "lora.safetensors", lora_weights_from_model(donor), "diffusers", config=cfg)
    model = load_transformer(jax_side["transformer"], dtype="fp32", compute_dtype="fp32", mesh=jax_side["mesh"])
    apply_lora_file(model, path)
    settings = SampleSettings(width=64, height=64, steps=3, guidance=3.5)
    noise = _noise(1, settings, seed=2)
    with quiet_diffusers():
        torch_pipe.load_lora_weights(str(path), adapter_name="under_test")
    try:
        want = _torch_run(torch_pipe, PROMPTS[:1], settings, noise)
    finally:
        torch_pipe.unload_lora_weights()
    _check(_jax_run(jax_side, PROMPTS[:1], settings, noise, model=model), want)
    without = _torch_run(torch_pipe, PROMPTS[:1], settings, noise)  # the base again, LoRA unloaded
    assert np.abs(want[0] - without[0]).max() > 10 * LATENT_TOL  # the LoRA changed the picture
