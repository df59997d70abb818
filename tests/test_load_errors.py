"""load_flux on a diffusers directory with bad contents: errors name the keys, shapes and files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_jax import load_flux
from flux_jax.errors import CheckpointError
from tests.helpers.torch_reference import diffusers_flux, tiny_config


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    diffusers_flux(tiny_config(depth=1, depth_single_blocks=1)).save_pretrained(path)
    return path


def _variant(tmp_path, good_dir, edit):
    out = tmp_path / "transformer"
    out.mkdir()
    (out / "config.json").write_text((good_dir / "config.json").read_text())
    tensors = load_file(good_dir / "diffusion_pytorch_model.safetensors")
    edit(tensors)
    save_file(tensors, out / "diffusion_pytorch_model.safetensors")
    return out


def test_missing_tensors_are_listed(tmp_path, good_dir):
    def drop(t):
        del t["transformer_blocks.0.attn.to_k.weight"], t["proj_out.bias"]

    with pytest.raises(CheckpointError) as e:
        load_flux(_variant(tmp_path, good_dir, drop))
    msg = str(e.value)
    assert "2 missing" in msg and "transformer_blocks.0.attn.to_k.weight" in msg and "proj_out.bias" in msg
    assert "diffusion_pytorch_model" in msg or "transformer" in msg


def test_unexpected_tensors_are_listed(tmp_path, good_dir):
    def add(t):
        t["transformer_blocks.7.attn.to_q.weight"] = torch.zeros(64, 64)

    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): transformer_blocks\.7\.attn\.to_q\.weight"):
        load_flux(_variant(tmp_path, good_dir, add))


def test_wrong_shapes_name_key_and_both_shapes(tmp_path, good_dir):
    def reshape(t):
        t["single_transformer_blocks.0.proj_mlp.weight"] = torch.zeros(100, 64)

    with pytest.raises(CheckpointError) as e:
        load_flux(_variant(tmp_path, good_dir, reshape))
    assert "single_transformer_blocks.0.proj_mlp.weight (100, 64) (expected (256, 64))" in str(e.value)


def test_non_flux_config_rejected_by_name(tmp_path, good_dir):
    out = _variant(tmp_path, good_dir, lambda t: None)
    cfg = json.loads((out / "config.json").read_text())
    cfg["_class_name"] = "SD3Transformer2DModel"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a Flux transformer config: _class_name is 'SD3Transformer2DModel'"):
        load_flux(out)


def test_non_flux_weights_rejected_by_name(tmp_path):
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3)}, vae)
    with pytest.raises(
        CheckpointError, match=r"vae\.safetensors: not a Flux transformer checkpoint \(it looks like a VAE"
    ):
        load_flux(vae)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_flux(tmp_path / "nope")


def test_good_dir_loads(good_dir):
    model = load_flux(good_dir)
    assert np.asarray(model.img_in.kernel[...]).shape == (64, 64)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfy"])
def test_load_flux_applies_a_lora_file(tmp_path, good_dir, fmt):
    """load_flux(base, lora=FILE, lora_scale=s) equals the base with the same adapters at strength s."""
    import jax
    from flax import nnx

    from flux_jax.lora_io.adapters import lora_weights_from_model
    from flux_jax.lora_io.export import write_lora_file
    from flux_jax.model.lora import apply_lora
    from tests.helpers.torch_reference import forward_inputs, jax_forward

    model = load_flux(good_dir)
    apply_lora(model, rank=3, alpha=5.0, rngs=nnx.Rngs(0))
    for path, var in nnx.state(model, nnx.LoRAParam).flat_state():
        if path[-1] == "lora_b":  # non-zero B, so the adapters change the output
            var.set_value(jax.random.normal(jax.random.key(len(path)), var.get_value().shape) * 0.1)
    lora_file = write_lora_file(
        tmp_path / f"{fmt}.safetensors", lora_weights_from_model(model), fmt, config=model.config, dtype="fp32"
    )
    x = forward_inputs(model.config, batch=2, h=2, w=3, txt_len=3)
    want = jax_forward(model, x)
    got = jax_forward(load_flux(good_dir, lora=lora_file), x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    base = jax_forward(load_flux(good_dir), x)
    assert np.abs(want - base).max() > 1e-3
    off = jax_forward(load_flux(good_dir, lora=lora_file, lora_scale=0.0), x)
    np.testing.assert_allclose(off, base, atol=1e-6, rtol=0)
