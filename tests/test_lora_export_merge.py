"""`flux-jax export --merge-into`: base + LoRA written as a full checkpoint that PyTorch loads and that computes what
the JAX model with the LoRA computes; NaN / Inf in the LoRA or in the merged values are refused naming the tensor."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from flux_jax import cli
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.export import write_lora_file
from flux_jax.lora_io.merge import merge_lora
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.model.config import CONFIG_METADATA_KEY, config_metadata
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.safetensors_file import save_file
from flux_jax.weights.sources import read_all
from tests.helpers.lora_reference import bfl_state, load_bfl_into_diffusers, tiny_case
from tests.helpers.torch_reference import diffusers_forward

MODEL_TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    case = tiny_case()
    case["base"] = tmp_path_factory.mktemp("base") / "transformer"
    case["ref"].save_pretrained(case["base"])
    return case


def test_merge_to_bfl_file(setup, tmp_path):
    out = merge_lora(setup["base"], setup["weights"], tmp_path / "merged.safetensors", layout="bfl")
    with open_checkpoint(out) as ckpt:
        assert ckpt.layout == "bfl" and ckpt.config == setup["cfg"]
        merged = {k: read_all(v) for k, v in ckpt.tensors.items()}
    base = bfl_state(setup["cfg"], setup["ref"])
    for key, value in merged.items():  # untouched tensors are copied bit for bit
        if key.removesuffix(".weight") not in setup["weights"]:
            np.testing.assert_array_equal(value, base[key])
    torch_model = copy.deepcopy(setup["ref"])
    load_bfl_into_diffusers(setup["cfg"], torch_model, merged)
    np.testing.assert_allclose(diffusers_forward(torch_model, setup["inputs"]), setup["want"], atol=MODEL_TOL, rtol=0)


def test_cli_merge_to_diffusers_directory(setup, tmp_path):
    from diffusers import FluxTransformer2DModel

    lora = write_lora_file(tmp_path / "l.safetensors", setup["weights"], "kohya", config=setup["cfg"], dtype="fp32")
    out = tmp_path / "merged"
    argv = ["export", str(lora), str(out), "--merge-into", str(setup["base"]), "--layout", "diffusers"]
    assert cli.main(argv) == 0
    torch_model = FluxTransformer2DModel.from_pretrained(out).eval()
    np.testing.assert_allclose(diffusers_forward(torch_model, setup["inputs"]), setup["want"], atol=MODEL_TOL, rtol=0)
    assert cli.main(argv) == 2  # exists; kept without --force


def test_merge_strength_and_dtype(setup, tmp_path):
    half = merge_lora(
        setup["base"], setup["weights"], tmp_path / "h.safetensors", strength=0.5, dtype="bf16", layout="bfl"
    )
    key = "double_blocks.0.img_attn.qkv.weight"
    base = bfl_state(setup["cfg"], setup["ref"])[key]
    with open_checkpoint(half) as ckpt:
        got = read_all(ckpt.tensors[key])
    assert got.dtype.name == "bfloat16"
    want = base + 0.5 * setup["weights"]["double_blocks.0.img_attn.qkv"].delta()
    np.testing.assert_array_equal(got, want.astype(got.dtype))


def test_merge_rejects_bad_requests(setup, tmp_path):
    with pytest.raises(FluxJaxError, match="one file"):
        merge_lora(setup["base"], setup["weights"], tmp_path / "dir", layout="bfl")
    with pytest.raises(FluxJaxError, match="directory"):
        merge_lora(setup["base"], setup["weights"], tmp_path / "x.safetensors", layout="diffusers")
    bigger = dict(setup["weights"])
    bigger["double_blocks.5.img_attn.proj"] = bigger["double_blocks.0.img_attn.proj"]
    with pytest.raises(FluxJaxError, match="double_blocks.5.img_attn.proj"):
        merge_lora(setup["base"], bigger, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


# -- non-finite numbers ------------------------------------------------------------------------------------------

KEY = "double_blocks.0.img_attn.qkv"


def _with(weights, path, up):
    w = weights[path]
    return {**weights, path: LoraWeights(w.down, up, w.alpha)}


def test_merge_refuses_a_nonfinite_lora_unless_allowed(setup, tmp_path, capsys):
    up = setup["weights"][KEY].up.copy()
    up[2, 1] = np.nan
    weights = _with(setup["weights"], KEY, up)
    with pytest.raises(FluxJaxError, match=rf"NaN or Inf .*{KEY} up"):
        merge_lora(setup["base"], weights, tmp_path / "m.safetensors")
    lora = write_lora_file(tmp_path / "nan.safetensors", weights, "kohya", config=setup["cfg"], dtype="fp32",
                           allow_nonfinite=True)  # fmt: skip
    out = tmp_path / "merged.safetensors"
    argv = ["export", str(lora), str(out), "--merge-into", str(setup["base"])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]
    assert cli.main([*argv, "--allow-nonfinite"]) == 0  # the deliberate case
    with open_checkpoint(out) as ckpt:
        assert np.isnan(read_all(ckpt.tensors[f"{KEY}.weight"])).any()


def test_merge_checks_the_values_it_computes(setup, tmp_path):
    """A finite LoRA can still give a non-finite merge: its delta overflows float32, the base weight it is added to
    holds a NaN, or the sum does not fit the output dtype. Each is refused naming the weight, and nothing is written."""
    w = setup["weights"][KEY]
    huge = {**setup["weights"], KEY: LoraWeights(w.down * np.float32(1e20), w.up * np.float32(1e20), w.alpha)}
    with pytest.raises(FluxJaxError, match=rf"{KEY}\.weight: the LoRA delta .* overflows float32"):
        merge_lora(setup["base"], huge, tmp_path / "a.safetensors")
    big = _with(setup["weights"], KEY, w.up * np.float32(1e8))  # |delta| ~ 1e6: fine in fp32 and bf16, not in fp16
    with pytest.raises(FluxJaxError, match=rf"{KEY}\.weight: base \+ LoRA delta has values beyond .*float16"):
        merge_lora(setup["base"], big, tmp_path / "b.safetensors", dtype="fp16")
    with pytest.raises(FluxJaxError, match="strength must be a finite number"):
        merge_lora(setup["base"], setup["weights"], tmp_path / "c.safetensors", strength=float("inf"))

    base = bfl_state(setup["cfg"], setup["ref"])
    base[f"{KEY}.weight"] = base[f"{KEY}.weight"].copy()
    base[f"{KEY}.weight"][0, 0] = np.nan
    nan_base = tmp_path / "base" / "nan_base.safetensors"
    nan_base.parent.mkdir()
    save_file(nan_base, base, {"format": "pt", CONFIG_METADATA_KEY: config_metadata(setup["cfg"])})
    for layout, name in (("bfl", "d.safetensors"), ("diffusers", "d")):
        with pytest.raises(FluxJaxError, match=rf"{KEY}\.weight: the base weight has NaN"):
            merge_lora(nan_base, setup["weights"], tmp_path / name, layout=layout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert merge_lora(setup["base"], big, tmp_path / "e.safetensors", dtype="bf16").exists()
