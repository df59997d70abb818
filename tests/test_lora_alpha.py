"""LoRA alpha at the edges: a negative alpha is a negative scale in every format (as ComfyUI and kohya apply it, and
folded into the weights of a diffusers file), and alpha = 0, which the tools read differently (kohya: alpha = rank;
ComfyUI: scale 0), is refused when reading and when writing, naming the modules."""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest

from flux_jax import cli
from flux_jax.errors import CheckpointError, FluxJaxError
from flux_jax.lora_io.export import convert_lora_file, write_lora_file
from flux_jax.lora_io.formats import FORMATS, diffusers_fold
from flux_jax.lora_io.import_ import read_lora_file
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.weights.safetensors_file import SafetensorsFile, save_file
from tests.helpers.lora_modules import CFG, MODULES, RANK, lora, weight_shape
from tests.helpers.lora_reference import comfy_patch


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: the diffusers fold used to loop forever on a negative scale."""

    def fail(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def comfy_deltas(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """delta W per module as ComfyUI applies the file (W += alpha / r * up @ down, negative alpha included)."""
    zeros = {}
    for path in MODULES:
        zeros[f"{path}.weight"] = np.zeros(weight_shape(path), np.float32)
    return {k.removesuffix(".weight"): v for k, v in comfy_patch(zeros, tensors).items()}


def assert_same_delta(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal up to float32 rounding of the products (relative to the delta's largest entry)."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=what)


def _tensors(path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {k: np.array(f.array(k), np.float32) for k in f.keys()}


@pytest.mark.parametrize("scale", [0.75, 0.1, 3e-5, 2.0, 1.0])
def test_diffusers_fold_of_a_negative_scale_is_the_positive_fold_negated(scale):
    with deadline(5):
        down, up = diffusers_fold(-scale)
        positive = diffusers_fold(scale)
    assert (down, up) == (-positive[0], positive[1])
    assert down * up == -scale


@pytest.mark.parametrize("alpha", [-3.0, -0.01, -40.0])
def test_negative_alpha_round_trips_through_a_diffusers_file_with_comfyuis_delta(tmp_path, alpha):
    """kohya file with a negative alpha -> diffusers file (alpha folded in): the delta W the diffusers file gives
    (PEFT applies B @ A with no alpha) is the one ComfyUI applies for the kohya file, and so is our reading of it."""
    weights = lora(alpha)
    kohya = write_lora_file(tmp_path / "k.safetensors", weights, "kohya", config=CFG, dtype="fp32")
    want = comfy_deltas(_tensors(kohya))
    for path, w in weights.items():
        assert_same_delta(want[path], alpha / RANK * (w.up @ w.down), path)
        assert np.abs(want[path]).max() > 1e-3  # negative alpha is not read as zero

    with deadline(30):
        out = convert_lora_file(kohya, tmp_path / "d.safetensors", "diffusers")
    tensors = _tensors(out)
    assert not [k for k in tensors if k.endswith(".alpha")]
    # Modules kept whole in diffusers files: B @ A is the delta directly.
    for path, module in (
        ("double_blocks.1.txt_mlp.2", "transformer_blocks.1.ff_context.net.2"),
        ("img_in", "x_embedder"),
    ):
        got = tensors[f"transformer.{module}.lora_B.weight"] @ tensors[f"transformer.{module}.lora_A.weight"]
        assert_same_delta(got, want[path], path)
    back = read_lora_file(out)
    assert back.weights.keys() == weights.keys()
    for path, w in back.weights.items():
        assert_same_delta(w.delta(), want[path], path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_cli_exports_a_negative_alpha_lora_in_every_format(tmp_path, fmt):
    weights = lora(-2.0)
    src = write_lora_file(tmp_path / "src.safetensors", weights, "kohya", config=CFG, dtype="fp32")
    out = tmp_path / f"{fmt}.safetensors"
    with deadline(30):
        assert cli.main(["export", str(src), str(out), "--format", fmt]) == 0
    back = read_lora_file(out)
    for path, w in weights.items():
        assert_same_delta(back.weights[path].delta(), w.delta(), path)
        assert (back.weights[path].scale < 0) == FORMATS[fmt].store_alpha  # diffusers: alpha folded into the weights


def test_zero_alpha_is_refused_when_reading_naming_every_module(tmp_path, capsys):
    tensors = {}
    for path, w in lora(1.5).items():
        name = "lora_unet_" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = w.down, w.up
        zero = path in ("double_blocks.1.txt_mlp.2", "img_in")
        tensors[f"{name}.alpha"] = np.asarray(0.0 if zero else 1.5, np.float32)
    src = tmp_path / "zero.safetensors"
    save_file(src, tensors)
    with pytest.raises(CheckpointError, match="alpha") as e:
        read_lora_file(src)
    message = str(e.value)
    assert str(src) in message and "lora_unet_double_blocks_1_txt_mlp_2" in message and "lora_unet_img_in" in message
    assert "lora_unet_double_blocks_0_img_attn_qkv" not in message
    for fmt in sorted(FORMATS):
        out = tmp_path / f"{fmt}.safetensors"
        assert cli.main(["export", str(src), str(out), "--format", fmt]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "lora_unet_img_in" in err and "alpha" in err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero.safetensors"]


def test_zero_alpha_in_peft_metadata_is_refused(tmp_path):
    import json

    w = lora(1.0)["double_blocks.1.txt_mlp.2"]
    module = "transformer.transformer_blocks.1.ff_context.net.2"
    src = tmp_path / "peft.safetensors"
    meta = {"transformer.r": RANK, "transformer.lora_alpha": 0}
    save_file(
        src,
        {f"{module}.lora_A.weight": w.down, f"{module}.lora_B.weight": w.up},
        {"lora_adapter_metadata": json.dumps(meta)},
    )
    with pytest.raises(CheckpointError, match=f"alpha.*{module}"):
        read_lora_file(src)


def test_zero_alpha_is_refused_when_writing_naming_every_module(tmp_path):
    weights = lora(2.0)
    for path in ("single_blocks.2.linear1", "final_layer.adaLN_modulation.1"):
        weights[path] = LoraWeights(weights[path].down, weights[path].up, 0.0)
    for fmt in sorted(FORMATS):
        with deadline(30), pytest.raises(FluxJaxError, match="alpha") as e:
            write_lora_file(tmp_path / f"{fmt}.safetensors", weights, fmt, config=CFG)
        assert "single_blocks.2.linear1" in str(e.value) and "final_layer.adaLN_modulation.1" in str(e.value)
        assert "double_blocks.0.img_attn.qkv" not in str(e.value)
    assert not list(tmp_path.iterdir())
