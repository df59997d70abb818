"""`flux-jax convert` and the `convert/` scripts: directions, layouts, dtypes, --force, progress, the LoRA hook."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux_jax import load_flux
from flux_jax.cli import main
from flux_jax.commands import convert as convert_command
from flux_jax.errors import FluxJaxError
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.flax_checkpoint import META_FILE, write_flax_checkpoint
from tests.helpers.torch_reference import diffusers_flux, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(depth=1, depth_single_blocks=2)
    ref = diffusers_flux(cfg, seed=11)
    path = tmp_path_factory.mktemp("src") / "transformer"
    ref.save_pretrained(path, max_shard_size="100KB")
    return cfg, {k: v.detach() for k, v in ref.state_dict().items()}, path


def zarr_dtype(flax_dir: pathlib.Path, leaf: str) -> np.dtype:
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(flax_dir / leaf)}}).result()
    return np.dtype(store.dtype.numpy_dtype)


def test_both_directions_through_every_layout(model_dir, tmp_path, capsys):
    from diffusers import FluxTransformer2DModel

    cfg, sd, src = model_dir
    flax, bfl, diffusers = tmp_path / "flax", tmp_path / "flux.safetensors", tmp_path / "diffusers"
    assert main(["convert", str(src), str(flax)]) == 0  # PyTorch -> Flax by default
    assert "100%" in capsys.readouterr().err  # the tqdm progress bar (bytes)
    assert json.loads((flax / META_FILE).read_text())["dtype"] == "float32"
    assert main(["convert", str(flax), str(bfl), "--no-progress"]) == 0  # Flax -> BFL by default
    assert main(["convert", str(bfl), str(diffusers), "--layout", "diffusers", "--shard-size", "150KB"]) == 0
    assert len(list(diffusers.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    out = FluxTransformer2DModel.from_pretrained(diffusers).state_dict()
    assert sorted(out) == sorted(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_dtype_bf16_flax_checkpoint(model_dir, tmp_path):
    _, _, src = model_dir
    dst = tmp_path / "flax"
    assert main(["convert", str(src), str(dst), "--dtype", "bf16", "--no-progress"]) == 0
    assert zarr_dtype(dst, "single_blocks.linear1.kernel") == np.dtype(ml_dtypes.bfloat16)
    got = nnx.state(load_flux(dst, dtype=jnp.bfloat16)).flat_state()
    want = dict(nnx.state(load_flux(src, dtype=jnp.bfloat16)).flat_state())
    for path, var in got:
        assert np.array_equal(np.asarray(var.get_value()), np.asarray(want[path].get_value())), path


def test_dtype_fp8_flax_checkpoint_keeps_biases_bf16(model_dir, tmp_path):
    _, _, src = model_dir
    dst = tmp_path / "flax"
    assert main(["convert", str(src), str(dst), "--dtype", "fp8", "--no-progress"]) == 0
    assert zarr_dtype(dst, "double_blocks.img_attn.qkv.kernel") == np.dtype(ml_dtypes.float8_e4m3fn)
    assert zarr_dtype(dst, "double_blocks.img_attn.qkv.bias") == np.dtype(ml_dtypes.bfloat16)
    assert zarr_dtype(dst, "double_blocks.img_attn.norm.key_norm.scale") == np.dtype(ml_dtypes.bfloat16)
    model = load_flux(dst, dtype=jnp.float8_e4m3fn)
    assert model.double_blocks.img_attn.qkv.kernel[...].dtype == jnp.float8_e4m3fn
    # PyTorch fp8 output of it: fp8 everywhere, the same bits as torch's own cast of the original.
    out = tmp_path / "fp8.safetensors"
    assert main(["convert", str(dst), str(out), "--dtype", "fp8", "--no-progress"]) == 0
    tensors = load_file(out)
    assert {t.dtype for t in tensors.values()} == {torch.float8_e4m3fn}
    with open_checkpoint(src) as ckpt:
        w = torch.from_numpy(ckpt.tensors["double_blocks.0.img_attn.qkv.weight"].read((slice(0, 192), slice(0, 64))))
    assert torch.equal(
        tensors["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8), w.to(torch.float8_e4m3fn).view(torch.uint8)
    )


def test_force_replaces_the_destination(model_dir, tmp_path):
    _, _, src = model_dir
    dst = tmp_path / "flax"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert main(["convert", str(src), str(dst), "--force", "--no-progress"]) == 0
    assert not (dst / "old.txt").exists() and (dst / META_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["flax"]  # the old copy is gone too


def test_a_failing_writer_leaves_no_flax_directory(model_dir, tmp_path):
    _, _, src = model_dir

    class Boom:
        shape, dtype = (4,), np.dtype(np.float32)

        def read(self, index):
            raise RuntimeError("disk on fire")

    with open_checkpoint(src) as ckpt:
        ckpt.tensors["single_blocks.1.linear2.bias"] = Boom()
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_flax_checkpoint(ckpt, tmp_path / "flax", dtype=np.float32)
    assert list(tmp_path.iterdir()) == []


def test_config_option_for_a_bfl_file_without_metadata(model_dir, tmp_path, capsys):
    """head_dim 16 makes the RoPE axes unguessable from shapes: a clear error, then --config fixes it."""
    cfg, _, src = model_dir
    with open_checkpoint(src) as ckpt:
        tensors = {k: torch.from_numpy(s.read(tuple(slice(0, n) for n in s.shape))) for k, s in ckpt.tensors.items()}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    assert main(["convert", str(bare), str(tmp_path / "a"), "--no-progress"]) == 2
    assert "pass config=" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}))
    assert main(["convert", str(bare), str(tmp_path / "b"), "--config", str(config), "--no-progress"]) == 0


def _lora_file(path: pathlib.Path) -> pathlib.Path:
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    return path


def test_lora_files_go_to_the_lora_converter(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(convert_command, "convert_lora_file", lambda *args, **kwargs: calls.append((args, kwargs)))
    src, dst = _lora_file(tmp_path / "lora.safetensors"), tmp_path / "out.safetensors"
    argv = ["convert", str(src), str(dst), "--format", "diffusers", "--dtype", "bf16", "--force"]
    assert main(argv) == 0
    assert calls == [((src, dst, "diffusers", "bf16", True), {"config": None, "allow_nonfinite": False})]
    assert main([*argv, "--allow-nonfinite"]) == 0
    assert calls[1] == ((src, dst, "diffusers", "bf16", True), {"config": None, "allow_nonfinite": True})


def test_config_option_for_a_lora_of_unusual_width(model_dir, tmp_path, capsys):
    """A diffusers LoRA of a 64-wide model (q/k/v pieces, no config in the file) needs the model config to fuse:
    the error says "pass the model config", and `--config` is what passes it (issue 16, case 10)."""
    from safetensors.numpy import save_file as save_numpy

    cfg, _, _ = model_dir
    h, r = cfg.hidden_size, 4
    rng = np.random.default_rng(0)
    tensors = {}
    for piece in ("to_q", "to_k", "to_v"):
        tensors[f"transformer.transformer_blocks.0.attn.{piece}.lora_A.weight"] = rng.normal(size=(r, h)).astype("f4")
        tensors[f"transformer.transformer_blocks.0.attn.{piece}.lora_B.weight"] = rng.normal(size=(h, r)).astype("f4")
    src = tmp_path / "lora.safetensors"
    save_numpy(tensors, str(src))
    out = tmp_path / "kohya.safetensors"
    assert main(["convert", str(src), str(out), "--format", "kohya"]) == 2
    assert "pass the model config" in capsys.readouterr().err and not out.exists()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_json()))
    assert main(["convert", str(src), str(out), "--format", "kohya", "--config", str(config)]) == 0
    with safe_open(str(out), "np") as f:
        up = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
        down = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
    # Fused: the three pieces side by side (rank 3r), each up block in its rows.
    assert down.shape == (3 * r, h) and up.shape == (3 * h, 3 * r)
    q_down = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    q_up = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    np.testing.assert_allclose((up @ down)[:h], q_up @ q_down, rtol=1e-5, atol=1e-5)


def test_format_is_for_lora_files_only(model_dir, tmp_path, capsys):
    _, _, src = model_dir
    assert main(["convert", str(src), str(tmp_path / "x"), "--format", "kohya"]) == 2
    assert "--format applies to LoRA files" in capsys.readouterr().err


def test_bad_shard_size(model_dir, tmp_path, capsys):
    _, _, src = model_dir
    assert main(["convert", str(src), str(tmp_path / "x"), "--layout", "diffusers", "--shard-size", "lots"]) == 2
    assert "invalid size 'lots'" in capsys.readouterr().err


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"convert_{name}", REPO / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_scripts(model_dir, tmp_path):
    _, sd, src = model_dir
    assert _script("to_flax").main([str(src), str(tmp_path / "flax"), "--dtype", "fp32"]) == 0
    to_pytorch = _script("to_pytorch")
    assert to_pytorch.main([str(tmp_path / "flax"), str(tmp_path / "d"), "--layout", "diffusers"]) == 0
    out = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    with pytest.raises(SystemExit):
        to_pytorch.main(["--help"])


def test_parse_size():
    from flux_jax.weights.convert import parse_size

    assert parse_size("10GB") == 10**10 and parse_size("200KB") == 200_000 and parse_size("1GiB") == 2**30
    assert parse_size("12345") == 12345
    with pytest.raises(FluxJaxError):
        parse_size("-1GB")
