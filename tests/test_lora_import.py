"""LoRA import: every format back into `LoraWeights` and onto the JAX model, bit-exact round trips, files written by
other tools (diffusers with PEFT metadata or .alpha keys, XLabs, kohya with ComfyUI's prefix) matching diffusers'
reading of them, and errors that name what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flux_jax.errors import CheckpointError
from flux_jax.lora_io.adapters import apply_lora_weights, lora_weights_from_model
from flux_jax.lora_io.export import convert_lora_file, write_lora_file
from flux_jax.lora_io.formats import FORMATS
from flux_jax.lora_io.import_ import apply_lora_file, load_lora_file, read_lora_file
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.model.lora import remove_lora
from flux_jax.weights.safetensors_file import save_file
from tests.helpers.lora_reference import (
    diffusers_lora_forward,
    jit_forward,
    merged_forward,
    pipeline,
    tiny_case,
)

MODEL_TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    return tiny_case()


@pytest.fixture
def plain(setup):
    """The JAX twin of the reference without any adapter (the fixture model's adapters are put back after)."""
    model = setup["model"]
    remove_lora(model)
    yield model
    remove_lora(model)
    apply_lora_weights(model, setup["weights"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_export_import_export_is_bit_exact(setup, tmp_path, fmt, dtype):
    first = write_lora_file(
        tmp_path / "a" / "lora.safetensors", setup["weights"], fmt, config=setup["cfg"], dtype=dtype
    )
    second = convert_lora_file(first, tmp_path / "b" / "lora.safetensors", fmt)
    assert second.read_bytes() == first.read_bytes()


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_import_gives_back_the_exported_weights(setup, tmp_path, fmt):
    path = write_lora_file(tmp_path / "l.safetensors", setup["weights"], fmt, config=setup["cfg"], dtype="fp32")
    lora = read_lora_file(path)
    assert lora.format == fmt and lora.config == setup["cfg"]
    assert set(lora.weights) == set(setup["weights"])
    assert all(lora.weights[k].same_as(w) for k, w in setup["weights"].items())


def test_diffusers_import_refuses_nothing_and_keeps_the_delta(setup, tmp_path):
    path = write_lora_file(tmp_path / "l.safetensors", setup["weights"], "diffusers", config=setup["cfg"], dtype="fp32")
    lora = read_lora_file(path)
    assert lora.format == "diffusers" and set(lora.weights) == set(setup["weights"])
    for key, w in setup["weights"].items():
        got = lora.weights[key]
        assert got.rank == w.rank and got.alpha == got.rank  # alpha / r was folded into the weights
        np.testing.assert_allclose(got.delta(), w.delta(), atol=1e-6, rtol=1e-6)


def test_model_round_trip_is_exact(setup, plain):
    apply_lora_weights(plain, setup["weights"])
    back = lora_weights_from_model(plain)
    assert set(back) == set(setup["weights"])
    assert all(back[k].same_as(w) for k, w in setup["weights"].items())


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_apply_lora_file_reproduces_the_model(setup, plain, tmp_path, fmt):
    path = write_lora_file(tmp_path / "l.safetensors", setup["weights"], fmt, config=setup["cfg"], dtype="fp32")
    apply_lora_file(plain, path)
    np.testing.assert_allclose(jit_forward(plain, setup["inputs"]), setup["want"], atol=MODEL_TOL, rtol=0)


def test_apply_diffusers_file_gives_the_same_deltas(setup, plain, tmp_path):
    """The diffusers file (alpha folded, q/k/v split) back on the model: every layer's delta is the trained one.
    (A forward here would only recompile for alpha = rank; the forward path is the one checked just above.)"""
    path = write_lora_file(tmp_path / "l.safetensors", setup["weights"], "diffusers", config=setup["cfg"], dtype="fp32")
    apply_lora_file(plain, path)
    back = lora_weights_from_model(plain)
    assert set(back) == set(setup["weights"])
    for key, w in setup["weights"].items():
        np.testing.assert_allclose(back[key].delta(), w.delta(), atol=1e-6, rtol=1e-6)


def test_apply_places_adapters_on_the_mesh(setup, tmp_path):
    """load_flux(mesh=...) + LoRA: adapters are sharded by their logical axes like the base, values intact."""
    import jax
    from jax.sharding import NamedSharding

    from flux_jax.axes import DEFAULT_RULES
    from flux_jax.sharding import make_mesh
    from flux_jax.weights.flax_layout import abstract_model, flax_sources
    from flux_jax.weights.load import load_state_into
    from tests.helpers.lora_reference import bfl_from_diffusers_state

    cfg = setup["cfg"]
    mesh = make_mesh(2, 4, 1)
    model = load_state_into(
        abstract_model(cfg), flax_sources(cfg, bfl_from_diffusers_state(cfg, setup["ref"])), dtype=np.float32,
        mesh=mesh, rules=DEFAULT_RULES, where="test",
    )  # fmt: skip
    path = write_lora_file(tmp_path / "l.safetensors", setup["weights"], "comfy", config=cfg, dtype="fp32")
    apply_lora_file(model, path, mesh=mesh)
    a = model.double_blocks.img_attn.qkv.lora.lora_a[...]
    want = NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", None))  # [layers, embed, lora_rank]
    assert a.sharding.is_equivalent_to(want, a.ndim)
    # B's out dim follows the qkv kernel's (tensor), then fsdp: no chip holds a whole adapter.
    b = model.double_blocks.img_attn.qkv.lora.lora_b[...]
    assert b.sharding.is_equivalent_to(
        NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, ("tensor", "fsdp"))), b.ndim
    )
    back = lora_weights_from_model(model)  # gathered from the 8 devices
    assert all(back[k].same_as(w) for k, w in setup["weights"].items())


def test_strength_scales_the_delta(setup, plain, tmp_path):
    path = write_lora_file(tmp_path / "l.safetensors", setup["weights"], "comfy", config=setup["cfg"], dtype="fp32")
    apply_lora_file(plain, path, scale=0.5)
    for key, w in lora_weights_from_model(plain).items():
        np.testing.assert_allclose(w.delta(), 0.5 * setup["weights"][key].delta(), atol=1e-7, rtol=1e-6)


def test_mixed_ranks_and_alphas_in_one_stack(setup, plain):
    """Layers of one stacked Linear with different rank and alpha: zero-padded and folded, delta unchanged."""
    rng = np.random.default_rng(0)
    h = setup["cfg"].hidden_size

    def lora(rank, alpha):
        return LoraWeights(rng.standard_normal((rank, h)), rng.standard_normal((3 * h, rank)), alpha)

    weights = {"double_blocks.0.img_attn.qkv": lora(2, 1.0), "double_blocks.1.img_attn.qkv": lora(5, 7.5)}
    apply_lora_weights(plain, weights)
    adapter = plain.double_blocks.img_attn.qkv.lora
    assert adapter.lora_a.shape == (2, h, 5)
    back = lora_weights_from_model(plain)
    for key, w in weights.items():
        np.testing.assert_allclose(back[key].delta(), w.delta(), atol=1e-5, rtol=1e-6)


# -- files written by other tools ----------------------------------------------------------------------------------


def _peft_pieces(cfg, rng, rank):
    """A diffusers/PEFT state dict with separately trained q/k/v (own lora_A each), no proj_mlp (dreambooth-flux
    targets), and a plain projection."""
    h = cfg.hidden_size
    sd = {}
    for p in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj"):
        sd[f"transformer.transformer_blocks.0.{p}.lora_A.weight"] = rng.standard_normal((rank, h)) / h**0.5
        sd[f"transformer.transformer_blocks.0.{p}.lora_B.weight"] = rng.standard_normal((h, rank)) * 0.1
    for p in ("attn.to_q", "attn.to_k", "attn.to_v"):
        sd[f"transformer.single_transformer_blocks.1.{p}.lora_A.weight"] = rng.standard_normal((rank, h)) / h**0.5
        sd[f"transformer.single_transformer_blocks.1.{p}.lora_B.weight"] = rng.standard_normal((h, rank)) * 0.1
    return {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()}


def _check_against_diffusers(setup, path):
    """diffusers' reading of a foreign file (its converters, PEFT's scaling) equals ours, merged into the weights."""
    want = diffusers_lora_forward(pipeline(setup["ref"]), path, setup["inputs"])
    assert np.abs(want - setup["base"]).max() > 100 * MODEL_TOL
    got = merged_forward(setup["cfg"], setup["ref"], load_lora_file(path, setup["cfg"]), setup["inputs"])
    np.testing.assert_allclose(got, want, atol=MODEL_TOL, rtol=0)


def test_peft_file_with_adapter_metadata(setup, tmp_path):
    """diffusers' own `save_lora_weights` with a LoraConfig (lora_alpha and an alpha_pattern) as metadata."""
    from diffusers import FluxPipeline

    sd = _peft_pieces(setup["cfg"], np.random.default_rng(3), rank=4)
    metadata = {"r": 4, "lora_alpha": 2.0, "alpha_pattern": {"attn.to_out.0": 12.0}, "target_modules": ["to_q"]}
    FluxPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers={k.removeprefix("transformer."): v for k, v in sd.items()},
        transformer_lora_adapter_metadata=metadata,
    )  # fmt: skip
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora = read_lora_file(path, setup["cfg"])
    assert lora.weights["double_blocks.0.img_attn.proj"].scale == 3.0
    # Own A per piece -> one block-diagonal LoRA of rank 3 x 4 on the fused qkv.
    assert lora.weights["double_blocks.0.img_attn.qkv"].rank == 12
    _check_against_diffusers(setup, path)


def test_peft_file_with_alpha_tensors(setup, tmp_path):
    sd = _peft_pieces(setup["cfg"], np.random.default_rng(4), rank=2)
    for key in [k for k in sd if k.endswith("lora_A.weight")]:
        sd[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(3.0 if "to_k" in key else 1.0)
    path = tmp_path / "alpha.safetensors"
    save_file(path, {k: v.numpy() for k, v in sd.items()})
    _check_against_diffusers(setup, path)


def test_xlabs_file(setup, tmp_path):
    rng = np.random.default_rng(5)
    h, r = setup["cfg"].hidden_size, 3
    sd = {}
    for i in (0, 1):
        for name, out in (("qkv_lora1", 3 * h), ("proj_lora1", h), ("qkv_lora2", 3 * h), ("proj_lora2", h)):
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = rng.standard_normal((r, h)) / h**0.5
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = rng.standard_normal((out, r)) * 0.1
    sd["single_blocks.2.processor.qkv_lora.down.weight"] = rng.standard_normal((r, h)) / h**0.5
    sd["single_blocks.2.processor.qkv_lora.up.weight"] = rng.standard_normal((3 * h, r)) * 0.1
    sd["single_blocks.2.processor.proj_lora.down.weight"] = rng.standard_normal((r, 5 * h)) / h**0.5
    sd["single_blocks.2.processor.proj_lora.up.weight"] = rng.standard_normal((h, r)) * 0.1
    path = tmp_path / "xlabs.safetensors"
    save_file(path, {k: v.astype(np.float32) for k, v in sd.items()})
    lora = read_lora_file(path, setup["cfg"])
    assert lora.format == "xlabs"
    linear1 = lora.weights["single_blocks.2.linear1"]
    assert linear1.out_features == 7 * h and not linear1.up[3 * h :].any()  # the MLP rows are not adapted
    _check_against_diffusers(setup, path)


def test_kohya_with_comfy_prefix_equals_kohya(setup, tmp_path):
    path = write_lora_file(tmp_path / "k.safetensors", setup["weights"], "kohya", config=setup["cfg"], dtype="fp32")
    lora = read_lora_file(path)
    prefixed = {}
    for key, w in lora.weights.items():
        prefixed[f"diffusion_model.{key}.lora_down.weight"] = w.down
        prefixed[f"diffusion_model.{key}.lora_up.weight"] = w.up
        prefixed[f"diffusion_model.{key}.alpha"] = np.asarray(w.alpha, np.float32)
    other = tmp_path / "prefixed.safetensors"
    save_file(other, prefixed)
    got = read_lora_file(other)
    assert got.format == "kohya (diffusion_model. prefix)"
    assert all(got.weights[k].same_as(w) for k, w in lora.weights.items())


# -- errors ----------------------------------------------------------------------------------------------------


def _write(path, tensors, metadata=None):
    save_file(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, metadata)
    return path


def test_unknown_keys_are_listed(tmp_path):
    path = _write(tmp_path / "x.safetensors", {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": np.ones((2, 64)),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": np.ones((64, 2)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc3.lora_down.weight": np.ones((2, 8)),  # CLIP has no fc3
        "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight": np.ones((2, 8)),
    })  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        load_lora_file(path)
    msg = str(e.value)
    assert str(path) in msg and "2 LoRA key(s)" in msg and "text-encoder" in msg
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc3.lora_down.weight" in msg
    assert "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight" in msg


def test_missing_up_is_an_error(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"lora_unet_img_in.lora_down.weight": np.ones((2, 64))})
    with pytest.raises(CheckpointError, match="without both down and up"):
        load_lora_file(path)


def test_alpha_twice_is_an_error(tmp_path):
    path = _write(
        tmp_path / "x.safetensors",
        {
            "transformer.x_embedder.lora_A.weight": np.ones((2, 64)),
            "transformer.x_embedder.lora_B.weight": np.ones((64, 2)),
            "transformer.x_embedder.alpha": np.asarray(1.0),
        },
        {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 1})},
    )
    with pytest.raises(CheckpointError, match="both .alpha tensors and lora_adapter_metadata"):
        load_lora_file(path)


def test_lora_that_does_not_fit_the_model(setup, plain, tmp_path):
    h = setup["cfg"].hidden_size
    path = _write(tmp_path / "x.safetensors", {
        "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": np.ones((2, h)),
        "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": np.ones((h, 2)),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": np.ones((2, h)),
        "lora_unet_single_blocks_0_linear2.lora_up.weight": np.ones((h, 2)),
    })  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        apply_lora_file(plain, path)
    msg = str(e.value)
    assert "double_blocks.7.img_attn.proj (block 7; the model has 2 double blocks)" in msg
    assert f"single_blocks.0.linear2 is [{h}, {h}] (the weight is [{h}, {5 * h}])" in msg
    assert not list(lora_weights_from_model(plain))  # nothing was attached


def test_write_refuses_an_empty_lora(setup, tmp_path):
    with pytest.raises(Exception, match="empty"):
        write_lora_file(tmp_path / "x.safetensors", {}, "kohya", config=setup["cfg"])
    assert not (tmp_path / "x.safetensors").exists()
