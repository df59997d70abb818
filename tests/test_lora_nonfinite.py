"""NaN / Inf in a LoRA never pass silently: reading, converting and writing a LoRA file refuse them naming the
tensor (one line, exit 2, no output), and `allow_nonfinite` / `--allow-nonfinite` lets the rare deliberate case
through. Merging: tests/test_lora_export_merge.py."""

from __future__ import annotations

import numpy as np
import pytest

from flux_jax import cli
from flux_jax.errors import CheckpointError, FluxJaxError
from flux_jax.lora_io.export import convert_lora_file, write_lora_file
from flux_jax.lora_io.import_ import read_lora_file
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.model.config import CONFIG_METADATA_KEY, config_metadata
from flux_jax.weights.safetensors_file import SafetensorsFile, save_file
from tests.helpers.lora_modules import CFG, lora

BAD = "lora_unet_double_blocks_1_txt_mlp_2"


def kohya_tensors(weights: dict[str, LoraWeights]) -> dict[str, np.ndarray]:
    out = {}
    for path, w in weights.items():
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = w.down, w.up
        out[f"{name}.alpha"] = np.asarray(w.alpha, np.float32)
    return out


def poisoned(tmp_path, key: str, value: float):
    tensors = kohya_tensors(lora(2.0))
    t = tensors[key].copy()
    t.reshape(-1)[min(7, t.size - 1)] = value
    tensors[key] = t
    path = tmp_path / "poisoned.safetensors"
    save_file(path, tensors, {CONFIG_METADATA_KEY: config_metadata(CFG)})  # the tiny width needs its config
    return path


def _tensors(path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {k: np.array(f.array(k), np.float32) for k in f.keys()}


@pytest.mark.parametrize("role", ["lora_up", "lora_down"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_reading_refuses_nonfinite_tensors_naming_them(tmp_path, role, value):
    key = f"{BAD}.{role}.weight"
    src = poisoned(tmp_path, key, value)
    with pytest.raises(CheckpointError, match="NaN or Inf") as e:
        read_lora_file(src)
    assert str(src) in str(e.value) and key in str(e.value)
    assert "lora_unet_img_in" not in str(e.value)  # only the tensor at fault is named
    lora_file = read_lora_file(src, allow_nonfinite=True)  # the deliberate case
    w = lora_file.weights["double_blocks.1.txt_mlp.2"]
    assert not np.isfinite(w.up if role == "lora_up" else w.down).all()


def test_a_nonfinite_alpha_is_refused_even_when_nonfinite_tensors_are_allowed(tmp_path):
    src = poisoned(tmp_path, f"{BAD}.alpha", np.nan)
    for allow in (False, True):
        with pytest.raises(CheckpointError, match=f"alpha is NaN or Inf .*{BAD}.alpha"):
            read_lora_file(src, allow_nonfinite=allow)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfy"])
def test_cli_export_refuses_a_nonfinite_lora_unless_allowed(tmp_path, capsys, fmt):
    key = f"{BAD}.lora_up.weight"
    src = poisoned(tmp_path, key, np.nan)
    out = tmp_path / "out.safetensors"
    assert cli.main(["export", str(src), str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and "--allow-nonfinite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned.safetensors"]  # no output, no temporary

    assert cli.main(["export", str(src), str(out), "--format", fmt, "--allow-nonfinite"]) == 0
    tensors = _tensors(out)
    assert [k for k, v in tensors.items() if not np.isfinite(v).all()]  # written as asked
    assert sum(not np.isfinite(v).all() for v in tensors.values()) <= 2  # ... and nowhere else (A shared by pieces)


def test_convert_lora_file_refuses_unless_allowed(tmp_path):
    src = poisoned(tmp_path, f"{BAD}.lora_down.weight", np.inf)
    with pytest.raises(CheckpointError, match=f"{BAD}.lora_down.weight"):
        convert_lora_file(src, tmp_path / "out.safetensors", "comfy")
    assert not (tmp_path / "out.safetensors").exists()
    out = convert_lora_file(src, tmp_path / "out.safetensors", "comfy", allow_nonfinite=True)
    assert np.isinf(_tensors(out)["diffusion_model.double_blocks.1.txt_mlp.2.lora_A.weight"]).any()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfy"])
def test_writing_refuses_nonfinite_weights_naming_the_module(tmp_path, fmt):
    weights = lora(2.0)
    w = weights["single_blocks.2.linear1"]
    up = w.up.copy()
    up[3, 1] = np.nan
    weights["single_blocks.2.linear1"] = LoraWeights(w.down, up, w.alpha)
    out = tmp_path / "out.safetensors"
    with pytest.raises(FluxJaxError, match=r"NaN or Inf .*single_blocks\.2\.linear1 up") as e:
        write_lora_file(out, weights, fmt, config=CFG)
    assert str(out) in str(e.value) and "img_in" not in str(e.value)
    assert not list(tmp_path.iterdir())
    write_lora_file(out, weights, fmt, config=CFG, dtype="fp32", allow_nonfinite=True)
    with pytest.raises(CheckpointError, match="NaN or Inf"):  # and it is read back only when allowed, too
        read_lora_file(out)
    assert np.isnan(read_lora_file(out, allow_nonfinite=True).weights["single_blocks.2.linear1"].up).any()


def test_writing_refuses_values_that_overflow_the_dtype(tmp_path):
    weights = lora(2.0)
    w = weights["img_in"]
    weights["img_in"] = LoraWeights(w.down, w.up * np.float32(1e5), w.alpha)  # finite in fp32, not in fp16
    with pytest.raises(FluxJaxError, match=r"overflow fp16 .*lora_unet_img_in\.lora_up\.weight"):
        write_lora_file(tmp_path / "k.safetensors", weights, "kohya", config=CFG, dtype="fp16")
    assert not list(tmp_path.iterdir())
    write_lora_file(tmp_path / "k.safetensors", weights, "kohya", config=CFG, dtype="bf16")  # bf16 holds it


def test_a_run_with_nonfinite_weights_is_refused_unless_allowed(tmp_path, monkeypatch):
    """A run's checkpoint is read by the trainer's reader (stubbed here): its weights get the same check, naming the
    run, the step and the module, before anything is written."""
    from flux_jax.train import lora_sources

    weights = lora(2.0)
    w = weights["img_in"]
    weights["img_in"] = LoraWeights(w.down * np.float32(np.inf), w.up, w.alpha)
    monkeypatch.setattr(lora_sources, "read_run", lambda src, step, ema: (weights, CFG, {"step": 7}))
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out.safetensors"
    with pytest.raises(FluxJaxError, match=r"run \(step 7\): NaN or Inf .*img_in down"):
        lora_sources.export_lora(run, out, "kohya")
    with pytest.raises(FluxJaxError, match=r"run \(step 7\): NaN or Inf .*img_in down"):
        lora_sources.read_lora(run)
    assert not out.exists()
    assert lora_sources.export_lora(run, out, "kohya", dtype="fp32", allow_nonfinite=True).exists()
    assert lora_sources.read_lora(run, allow_nonfinite=True).is_run
