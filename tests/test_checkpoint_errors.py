"""Bad input to `flux-jax convert`: each case exits non-zero with one message naming the file and the problem, and
leaves no destination behind (not even a hidden temporary)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import pathlib
import shutil
import signal
import struct
import subprocess

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


# -- issue 16: non-finite tensors, refused writes, other formats, stale temporaries -----------------------------


@pytest.mark.parametrize("layout", ["flax", "bfl", "diffusers"])
def test_a_nan_or_inf_tensor_is_refused_naming_it(good, tmp_path, capsys, layout):
    cfg, bfl, _ = good
    broken = {k: v.clone() for k, v in bfl.items()}
    broken["double_blocks.0.img_attn.qkv.weight"][3, 5] = float("nan")
    broken["double_blocks.0.img_attn.qkv.weight"][7, 1] = float("inf")
    src = save_bfl(tmp_path / "nan.safetensors", broken, cfg)
    dst = tmp_path / ("out.safetensors" if layout == "bfl" else "out")
    name = "transformer_blocks.0.attn.to_q.weight" if layout == "diffusers" else "double_blocks.0.img_attn.qkv.weight"
    args = ("--layout", layout)
    err = convert_fails(capsys, src, dst, f"tensor {name} holds", "1 NaN, 1 Inf", "--allow-nonfinite", extra=args)
    assert "nothing was written" in err and not dst.exists()
    # The rare deliberate case: written as it is.
    assert main(["convert", str(src), str(dst), "--no-progress", "--allow-nonfinite", *args]) == 0
    assert dst.exists()


def test_a_value_beyond_the_output_dtype_is_refused_as_inf(good, tmp_path, capsys):
    cfg, bfl, _ = good
    big = {k: v.clone() for k, v in bfl.items()}
    big["final_layer.linear.bias"][0] = 1e6  # finite in fp32, Inf in fp16
    src = save_bfl(tmp_path / "big.safetensors", big, cfg)
    dst = tmp_path / "out.safetensors"
    extra = ("--layout", "bfl", "--dtype", "fp16")
    convert_fails(capsys, src, dst, "tensor final_layer.linear.bias as float16 holds", "0 NaN, 1 Inf", extra=extra)
    assert not dst.exists()


@pytest.mark.parametrize("pickled", ["zip", "legacy"])
def test_a_pytorch_pickle_named_safetensors(tmp_path, capsys, pickled):
    src = tmp_path / "flux1-dev.safetensors"
    torch.save({"w": torch.zeros(4, 4)}, src, _use_new_zipfile_serialization=pickled == "zip")
    err = convert_fails(capsys, src, tmp_path / "out", "not a safetensors file", "pickle")
    assert "truncated" not in err and "exceeds" not in err


class _ReadOnly:
    """Make `directory` refuse every write as a read-only filesystem does (a test as root cannot chmod it away)."""

    def __init__(self, monkeypatch, directory: pathlib.Path, code: int = errno.EROFS):
        self.directory, self.code = str(directory), code
        real_mkdir, real_open, real_os_open, real_unlink = os.mkdir, builtins.open, os.open, os.unlink

        def refuse(path):
            raise OSError(self.code, os.strerror(self.code), os.fspath(path))

        def mkdir(path, *args, **kwargs):
            return refuse(path) if self._inside(path) else real_mkdir(path, *args, **kwargs)

        def open_(path, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            return refuse(path) if writing and self._inside(path) else real_open(path, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            return refuse(path) if writing and self._inside(path) else real_os_open(path, flags, *args, **kwargs)

        def unlink(path, *args, **kwargs):  # even removing what was never created fails on a read-only mount
            return refuse(path) if self._inside(path) else real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "unlink", unlink)

    def _inside(self, path) -> bool:
        return isinstance(path, str | os.PathLike) and os.path.abspath(os.fspath(path)).startswith(self.directory + "/")


@pytest.mark.parametrize("layout", ["flax", "bfl", "diffusers"])
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["EROFS", "EACCES"])
def test_a_read_only_destination_is_one_line(good, tmp_path, capsys, monkeypatch, layout, code):
    out = tmp_path / "ro"
    out.mkdir()
    dst = out / ("model.safetensors" if layout == "bfl" else "model")
    _ReadOnly(monkeypatch, out, code)
    reason = os.strerror(code)
    err = convert_fails(
        capsys, good[2], dst, f"cannot write ({reason[0].lower()}{reason[1:]})", extra=("--layout", layout), culprit=dst
    )
    assert err == f"flux-jax convert: error: {dst}: cannot write ({reason[0].lower()}{reason[1:]})"
    assert list(out.iterdir()) == []


class _FullDisk:
    """A disk that fills up after `room` bytes: os.write and every file opened for writing raise ENOSPC."""

    def __init__(self, monkeypatch, room: int):
        self.room = room
        real_write, real_open = os.write, builtins.open
        disk = self

        def write(fd, data):
            disk.take(len(data))
            return real_write(fd, data)

        class File(io.FileIO):
            def write(self, data):
                disk.take(memoryview(data).nbytes)
                return super().write(data)

        def open_(path, mode="r", *args, **kwargs):
            if "w" in mode and "b" in mode and isinstance(path, str | os.PathLike):
                return io.BufferedWriter(File(path, "w"))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(builtins, "open", open_)

    def take(self, n: int) -> None:
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n


@pytest.mark.parametrize("layout", ["flax", "bfl", "diffusers"])
def test_a_full_disk_is_one_line_and_leaves_nothing(good, tmp_path, capsys, monkeypatch, layout):
    dst = tmp_path / ("model.safetensors" if layout == "bfl" else "model")
    _FullDisk(monkeypatch, room=good[2].stat().st_size // 2)  # runs out half-way through the output
    err = convert_fails(capsys, good[2], dst, extra=("--layout", layout), culprit=dst)
    assert (
        err == f"flux-jax convert: error: {dst}: cannot write (no space left on device); the partial output was removed"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_while_converting_a_lora_is_one_line(good, tmp_path, capsys, monkeypatch):
    src = tmp_path / "lora.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(4, 64),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(192, 4),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
        },
        str(src),
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps(good[0].to_json()))
    dst = tmp_path / "out.safetensors"
    _FullDisk(monkeypatch, room=1000)
    err = convert_fails(capsys, src, dst, extra=("--format", "diffusers", "--config", str(config)), culprit=dst)
    assert err.endswith(f"{dst}: cannot write (no space left on device); the partial output was removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "lora.safetensors"]


def test_a_killed_conversion_leaves_temporaries_the_next_one_removes(good, tmp_path, caplog):
    """SIGKILL leaves `.DST.tmp-PID-*`; the next run for DST removes those of dead processes, never a live one's."""
    from flux_jax.atomic import _host

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        dst = tmp_path / "flax"
        stale = [tmp_path / f".flax.tmp-{dead.pid}-deadbeef", tmp_path / f".flax.tmp-{dead.pid}-{_host()}-0123abcd"]
        stale[0].mkdir()
        (stale[0] / "double_blocks.img_attn.qkv.kernel").mkdir()
        (stale[0] / "double_blocks.img_attn.qkv.kernel" / "0.0.0").write_bytes(bytes(1000))
        stale[1].mkdir()
        busy = tmp_path / f".flax.tmp-{live.pid}-{_host()}-89abcdef"
        busy.mkdir()
        (busy / "chunk").write_bytes(b"being written")
        with caplog.at_level(logging.WARNING, logger="flux_jax.atomic"):
            assert main(["convert", str(good[2]), str(dst), "--no-progress"]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, "flax"])
        assert (busy / "chunk").read_bytes() == b"being written"
        for path in stale:
            assert f"removed {path}, left behind by process {dead.pid}, which is no longer running" in caplog.text
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("layout", ["flax", "bfl"])
def test_sigterm_during_a_conversion_leaves_no_temporary(good, tmp_path, capsys, monkeypatch, layout):
    """SIGTERM arrives half-way through the tensors: the conversion stops like Ctrl-C and removes its partial copy."""
    from flux_jax.weights import handle

    dst = tmp_path / ("out.safetensors" if layout == "bfl" else "out")
    reads = []
    real_read = handle.FileTensor.read

    def read(self, index):
        reads.append(self)
        if len(reads) == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_read(self, index)

    monkeypatch.setattr(handle.FileTensor, "read", read)
    # Outside the conversion a stray SIGTERM is only recorded, so a regression fails this test instead of ending pytest.
    missed = []

    def recorder(signum, frame):
        missed.append(signum)

    original = signal.signal(signal.SIGTERM, recorder)
    try:
        rc = main(["convert", str(good[2]), str(dst), "--no-progress", "--layout", layout])
        assert signal.getsignal(signal.SIGTERM) is recorder  # convert's handler was there only while converting
        assert not missed and rc == 130
    finally:
        signal.signal(signal.SIGTERM, original)
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
