"""Bad input to `flux-jax convert`: each case exits non-zero with one message naming the file and the problem, and
leaves no destination behind (not even a hidden temporary)."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from flux_jax.cli import main
from tests.helpers.checkpoint_files import FP8, bfl_state_dict, config_metadata, save_bfl
from tests.helpers.torch_reference import diffusers_flux, tiny_config


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid tiny BFL checkpoint (fp32, config in the metadata) and its tensors."""
    cfg = tiny_config(depth=1, depth_single_blocks=1)
    bfl = bfl_state_dict(diffusers_flux(cfg, seed=5).state_dict(), cfg)
    path = save_bfl(tmp_path_factory.mktemp("good") / "flux.safetensors", bfl, cfg)
    return cfg, bfl, path


def split(path: pathlib.Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: pathlib.Path, header: dict | bytes, data: bytes, header_len: int | None = None) -> pathlib.Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def convert_fails(
    capsys, src: pathlib.Path, dst: pathlib.Path, *problems: str, extra: tuple[str, ...] = (), culprit=None
) -> str:
    """Run the CLI; check exit code, a one-line message naming `culprit` (default: src) and each problem."""
    rc = main(["convert", str(src), str(dst), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    assert str(culprit or src) in err, err
    for problem in problems:
        assert problem in err, err
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith("." + dst.name)]
    assert not leftovers, leftovers
    return err


def test_truncated_file(good, tmp_path, capsys):
    src = tmp_path / "cut.safetensors"
    src.write_bytes(good[2].read_bytes()[:-1000])
    convert_fails(capsys, src, tmp_path / "out", "truncated")
    assert not (tmp_path / "out").exists()


def test_header_length_corrupt(good, tmp_path, capsys):
    header, data = split(good[2])
    src = write_raw(tmp_path / "len.safetensors", header, data, header_len=2**40)
    convert_fails(capsys, src, tmp_path / "out", "header length")
    assert not (tmp_path / "out").exists()


def test_header_json_corrupt(good, tmp_path, capsys):
    header, data = split(good[2])
    blob = json.dumps(header).encode()
    src = write_raw(tmp_path / "json.safetensors", b"{" + b"x" * (len(blob) - 1), data)
    convert_fails(capsys, src, tmp_path / "out", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_data_offsets_outside_the_file(good, tmp_path, capsys):
    header, data = split(good[2])
    name = "final_layer.linear.bias"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data) + 64, len(data) + 64 + end - begin]
    src = write_raw(tmp_path / "offsets.safetensors", header, data)
    convert_fails(capsys, src, tmp_path / "out", name, "data section")
    assert not (tmp_path / "out").exists()


def test_unknown_dtype(good, tmp_path, capsys):
    header, data = split(good[2])
    header["img_in.bias"]["dtype"] = "F7_E3M3"
    src = write_raw(tmp_path / "dtype.safetensors", header, data)
    convert_fails(capsys, src, tmp_path / "out", "unknown dtype 'F7_E3M3'", "img_in.bias")
    assert not (tmp_path / "out").exists()


def test_missing_keys_are_listed(good, tmp_path, capsys):
    cfg, bfl, _ = good
    gone = ["txt_in.bias", "double_blocks.0.img_mlp.2.weight", "single_blocks.0.norm.key_norm.scale"]
    src = save_bfl(tmp_path / "missing.safetensors", {k: v for k, v in bfl.items() if k not in gone}, cfg)
    err = convert_fails(capsys, src, tmp_path / "out", "3 missing tensor(s)", *gone)
    assert "unexpected" not in err
    assert not (tmp_path / "out").exists()


def test_unexpected_keys_are_listed(good, tmp_path, capsys):
    cfg, bfl, _ = good
    extra = {"double_blocks.0.img_attn.extra.weight": torch.zeros(2), "vae_scale": torch.zeros(1)}
    src = save_bfl(tmp_path / "extra.safetensors", {**bfl, **extra}, cfg)
    convert_fails(capsys, src, tmp_path / "out", "2 unexpected tensor(s)", *extra)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(good, tmp_path, capsys):
    cfg, bfl, _ = good
    bad = dict(bfl, **{"double_blocks.0.txt_attn.proj.weight": torch.zeros(64, 63)})
    src = save_bfl(tmp_path / "shape.safetensors", bad, cfg)
    convert_fails(capsys, src, tmp_path / "out", "wrong shape", "double_blocks.0.txt_attn.proj.weight (64, 63)")
    assert not (tmp_path / "out").exists()


def test_scaled_fp8_markers_that_cannot_be_applied(good, tmp_path, capsys):
    cfg, bfl, _ = good
    tensors = {k: v.to(FP8) if v.ndim == 2 else v for k, v in bfl.items()}
    layer = "single_blocks.0.linear1"
    tensors[f"{layer}.weight_scale"] = torch.tensor(0.01)
    tensors[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    src = tmp_path / "nvfp4.safetensors"
    save_file(tensors, str(src), metadata=config_metadata(cfg))
    convert_fails(capsys, src, tmp_path / "out", layer, "'nvfp4'")
    assert not (tmp_path / "out").exists()


def test_non_flux_checkpoint(tmp_path, capsys):
    src = tmp_path / "vae.safetensors"
    save_file(
        {"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)},
        str(src),
    )
    convert_fails(capsys, src, tmp_path / "out", "not a Flux transformer checkpoint", "VAE")
    assert not (tmp_path / "out").exists()


def test_destination_exists_without_force(good, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    convert_fails(capsys, good[2], dst, "already exists", "--force", culprit=dst)
    assert (dst / "keep.txt").read_text() == "mine" and len(list(dst.iterdir())) == 1


def test_flax_checkpoint_missing_parameter(good, tmp_path, capsys):
    flax = tmp_path / "flax"
    assert main(["convert", str(good[2]), str(flax), "--no-progress"]) == 0
    shutil.rmtree(flax / "double_blocks.txt_mlp.0.kernel")
    convert_fails(capsys, flax, tmp_path / "out.safetensors", "missing", "double_blocks.txt_mlp.0.kernel")
    assert not (tmp_path / "out.safetensors").exists()


def test_failure_mid_stream_leaves_no_output(good, tmp_path, capsys):
    """A chunk lost from the last parameter written: the error comes after most of the output was streamed."""
    flax = tmp_path / "flax"
    assert main(["convert", str(good[2]), str(flax), "--no-progress"]) == 0
    (flax / "single_blocks.modulation.lin.bias" / "0.0").unlink()
    for layout, dst in [("bfl", tmp_path / "out.safetensors"), ("diffusers", tmp_path / "out_dir")]:
        convert_fails(capsys, flax, dst, "single_blocks.modulation.lin.bias", extra=("--layout", layout))
        assert not dst.exists()
