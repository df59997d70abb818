"""kohya files through diffusers' own kohya converter, which only works at Flux's real width (it splits linear1 by
hard-coded 3072 / 12288 rows): a full-width model with one double and one single block, fp32 on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_jax.lora_io.adapters import lora_weights_from_model
from flux_jax.lora_io.export import convert_lora_file, write_lora_file
from flux_jax.lora_io.import_ import apply_lora_file, read_lora_file
from flux_jax.model.lora import remove_lora
from flux_jax.weights.safetensors_file import SafetensorsFile
from tests.helpers.lora_reference import (
    FULL_WIDTH,
    diffusers_lora_forward,
    jax_twin,
    jit_forward,
    pipeline,
    randomize_lora,
    scaled_diffusers_flux,
)
from tests.helpers.torch_reference import diffusers_forward, forward_inputs

pytestmark = pytest.mark.slow  # builds two 0.5B-parameter models (about a minute on two cores)

MODEL_TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    cfg = FULL_WIDTH
    ref = scaled_diffusers_flux(cfg, seed=1)
    inputs = forward_inputs(cfg, batch=1, h=2, w=3, txt_len=4, seed=2)
    return dict(cfg=cfg, ref=ref, model=jax_twin(cfg, ref), pipe=pipeline(ref), inputs=inputs,
                base=diffusers_forward(ref, inputs))  # fmt: skip


def test_kohya_export_loads_in_diffusers(setup, tmp_path):
    model = setup["model"]
    remove_lora(model)
    randomize_lora(model, rank=4, alpha=2.0, targets="all_blocks", seed=3)
    want = jit_forward(model, setup["inputs"])
    assert np.abs(want - setup["base"]).max() > 100 * MODEL_TOL
    path = write_lora_file(
        tmp_path / "k.safetensors", lora_weights_from_model(model), "kohya", config=setup["cfg"], dtype="fp32"
    )
    with SafetensorsFile(path) as f:
        assert len(f.keys()) == 3 * 13  # 10 + 3 Linears, each lora_down, lora_up and alpha
    got = diffusers_lora_forward(setup["pipe"], path, setup["inputs"])
    np.testing.assert_allclose(got, want, atol=MODEL_TOL, rtol=0)


def _foreign_kohya(cfg, rng, r: int) -> dict[str, torch.Tensor]:
    """A kohya file as sd-scripts writes one: fused modules, plus split_qkv ones (down = the q/k/v(/mlp) downs
    stacked, up block-diagonal), every alpha different from its rank."""
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    sd = {}

    def plain(name, out, inp, alpha):
        sd[f"lora_unet_{name}.lora_down.weight"] = rng.standard_normal((r, inp)) / inp**0.5
        sd[f"lora_unet_{name}.lora_up.weight"] = rng.standard_normal((out, r)) * 0.05
        sd[f"lora_unet_{name}.alpha"] = np.asarray(alpha)

    def split_qkv(name, rows, inp, alpha):
        down = rng.standard_normal((r * len(rows), inp)) / inp**0.5
        up = np.zeros((sum(rows), r * len(rows)))
        start = 0
        for k, n in enumerate(rows):
            up[start : start + n, k * r : (k + 1) * r] = rng.standard_normal((n, r)) * 0.05
            start += n
        sd[f"lora_unet_{name}.lora_down.weight"], sd[f"lora_unet_{name}.lora_up.weight"] = down, up
        sd[f"lora_unet_{name}.alpha"] = np.asarray(alpha)

    split_qkv("double_blocks_0_img_attn_qkv", [h] * 3, h, alpha=7.0)
    plain("double_blocks_0_txt_attn_qkv", 3 * h, h, alpha=1.0)
    plain("double_blocks_0_img_attn_proj", h, h, alpha=6.0)
    plain("double_blocks_0_txt_mlp_2", h, m, alpha=2.5)
    plain("double_blocks_0_img_mod_lin", 6 * h, h, alpha=3.0)
    split_qkv("single_blocks_0_linear1", [h, h, h, m], h, alpha=5.0)
    plain("single_blocks_0_linear2", h, h + m, alpha=0.5)
    return {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}


def test_foreign_kohya_file_reexported_to_diffusers(setup, tmp_path):
    """Another tool's kohya file (incl. split_qkv) -> import -> diffusers file: diffusers gives the same output
    for both, and so does the JAX model with the imported file."""
    from safetensors.torch import save_file

    foreign = tmp_path / "sd_scripts.safetensors"
    save_file(_foreign_kohya(setup["cfg"], np.random.default_rng(6), r=4), foreign, {"ss_network_dim": "4"})
    want = diffusers_lora_forward(setup["pipe"], foreign, setup["inputs"])
    assert np.abs(want - setup["base"]).max() > 100 * MODEL_TOL

    lora = read_lora_file(foreign)
    assert lora.format == "kohya"
    assert lora.weights["single_blocks.0.linear1"].rank == 16  # kept as what every loader applies: alpha / 4r
    out = convert_lora_file(foreign, tmp_path / "diffusers.safetensors", "diffusers")
    with SafetensorsFile(out) as f:  # the split_qkv modules come back compact: rank 4 per projection
        assert f.info("transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight").shape == (4, 3072)
        assert "ss_network_dim" not in f.metadata  # a kohya training detail that no longer describes the file
    got = diffusers_lora_forward(setup["pipe"], out, setup["inputs"])
    np.testing.assert_allclose(got, want, atol=MODEL_TOL, rtol=0)

    model = setup["model"]
    remove_lora(model)
    apply_lora_file(model, foreign)
    np.testing.assert_allclose(jit_forward(model, setup["inputs"]), want, atol=MODEL_TOL, rtol=0)
