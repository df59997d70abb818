"""The torch-free safetensors reader/writer: format compatibility with the official library (both ways,
bit-exact, incl. bf16 and fp8), strict header validation, zero-copy memory mapping, and atomic streaming
writes."""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
import weakref

import ml_dtypes
import numpy as np
import pytest

from flux_jax.atomic import OutputExistsError, atomic_dir, atomic_file
from flux_jax.errors import CheckpointError, FluxJaxError
from flux_jax.weights.safetensors_file import (
    DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsFile,
    TensorInfo,
    dtype_name,
    save_file,
    write_safetensors,
)

# safetensors dtype name -> torch dtype attribute name
TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def random_array(dtype_str: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns (incl. NaNs and infs for floats) so comparisons are bit-exact, not numeric."""
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dtype_str]
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def as_bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def torch_bytes(tensor) -> np.ndarray:
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def raw_file(path: pathlib.Path, header: object, data: bytes = b"", *, header_len: int | None = None) -> pathlib.Path:
    """Write a hand-made safetensors file; `header` is a JSON-able object or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


# -- dtypes -------------------------------------------------------------------------------------------------


def test_dtype_table_and_names():
    assert DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert DTYPES["F8_E5M2"] == np.dtype(ml_dtypes.float8_e5m2)
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
        assert dtype_name(name) == name
    assert dtype_name(np.float32) == "F32"
    assert dtype_name("bfloat16") == "BF16"
    for bad in (np.complex64, np.dtype(">f4"), "F4"):
        with pytest.raises(ValueError, match="unsupported dtype"):
            dtype_name(bad)


# -- compatibility with the official implementation --------------------------------------------------------


@pytest.mark.parametrize("dtype_str", list(TORCH_DTYPES))
def test_our_files_load_bit_exact_in_safetensors_torch(tmp_path, dtype_str):
    torch_st = pytest.importorskip("safetensors.torch")
    arrays = {
        "a.weight": random_array(dtype_str, (3, 5), seed=1),
        "b.bias": random_array(dtype_str, (7,), seed=2),
        "c.empty": random_array(dtype_str, (0, 4)),
    }
    path = tmp_path / "ours.safetensors"
    save_file(path, arrays, metadata={"format": "pt", "note": "ünïcode"})

    loaded = torch_st.load_file(str(path))
    assert list(loaded) == sorted(arrays)  # same key set (torch returns them sorted)
    for name, array in arrays.items():
        assert str(loaded[name].dtype) == f"torch.{TORCH_DTYPES[dtype_str]}"
        assert tuple(loaded[name].shape) == array.shape
        np.testing.assert_array_equal(torch_bytes(loaded[name]), as_bytes(array))

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ünïcode"}


@pytest.mark.parametrize("dtype_str", list(TORCH_DTYPES))
def test_torch_written_files_read_bit_exact(tmp_path, dtype_str):
    torch = pytest.importorskip("torch")
    torch_st = pytest.importorskip("safetensors.torch")
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype_str])
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(as_bytes(random_array(dtype_str, shape, seed))))
        .view(torch_dtype)
        .reshape(shape)
        for seed, (name, shape) in enumerate([("x.weight", (4, 6)), ("y", (9,)), ("z.scalar", ())])
    }
    path = tmp_path / "torch.safetensors"
    torch_st.save_file(tensors, str(path), metadata={"format": "pt"})

    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        assert len(f) == 3 and "y" in f and "nope" not in f
        for name, tensor in tensors.items():
            array = f.array(name)
            assert array.dtype == DTYPES[dtype_str]
            assert array.shape == tuple(tensor.shape)
            assert f.info(name).dtype == DTYPES[dtype_str]
            np.testing.assert_array_equal(as_bytes(array), torch_bytes(tensor))


def test_fp8_values_match_torch_numerically(tmp_path):
    """Not just bits: ml_dtypes' e4m3fn decodes every byte to the same float as torch's."""
    torch = pytest.importorskip("torch")
    torch_st = pytest.importorskip("safetensors.torch")
    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    path = tmp_path / "fp8.safetensors"
    torch_st.save_file({"w": every_byte}, str(path))
    with SafetensorsFile(path) as f:
        ours = f.array("w").astype(np.float32)
    np.testing.assert_array_equal(ours, every_byte.float().numpy())


def test_unaligned_tensor_after_odd_sized_one(tmp_path):
    """Mixed itemsizes in spec order can put an F32 at an odd offset; the format allows it and so do we."""
    torch_st = pytest.importorskip("safetensors.torch")
    arrays = {"odd": np.arange(3, dtype=np.uint8), "f": np.arange(5, dtype=np.float32) / 3}
    path = tmp_path / "unaligned.safetensors"
    save_file(path, arrays)
    with SafetensorsFile(path) as f:
        assert f.info("f").start % 4 != 0
        np.testing.assert_array_equal(f.array("f"), arrays["f"])
    np.testing.assert_array_equal(torch_st.load_file(str(path))["f"].numpy(), arrays["f"])


# -- writer layout and streaming --------------------------------------------------------------------------


def test_header_is_space_padded_to_8_and_data_contiguous(tmp_path):
    path = tmp_path / "layout.safetensors"
    for n in range(1, 10):  # vary the name length so every padding amount 0..7 is exercised
        save_file(path, {"t" * n: np.zeros((2,), np.float16), "u": np.ones((3,), np.int8)}, {"k": "v"})
        blob = path.read_bytes()
        (header_len,) = struct.unpack("<Q", blob[:8])
        assert header_len % 8 == 0
        raw = blob[8 : 8 + header_len]
        assert raw.rstrip(b" ") == raw.rstrip() and len(raw) - len(raw.rstrip(b" ")) < 8
        header = json.loads(raw)
        assert list(header) == ["__metadata__", "t" * n, "u"]
        assert header["t" * n] == {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}
        assert header["u"] == {"dtype": "I8", "shape": [3], "data_offsets": [4, 7]}
        assert len(blob) == 8 + header_len + 7


def test_write_streams_one_tensor_at_a_time_in_order(tmp_path):
    specs = [("b", "BF16", (4, 4)), ("a", np.float32, (2,)), ("c", ml_dtypes.float8_e4m3fn, (3, 1))]
    calls: list[str] = []
    previous: list[weakref.ref] = []
    progressed: list[int] = []

    def produce(name: str) -> np.ndarray:
        # The writer must have dropped the previous tensor before asking for the next one.
        assert all(ref() is None for ref in previous), "previous tensor still referenced"
        calls.append(name)
        dtype, shape = {n: (d, s) for n, d, s in specs}[name]
        array = np.full(shape, len(calls), dtype=DTYPES.get(dtype, dtype))
        previous.append(weakref.ref(array))
        return array

    path = tmp_path / "stream.safetensors"
    write_safetensors(path, iter(specs), produce, {"m": "1"}, progress=progressed.append)
    assert calls == ["b", "a", "c"]
    assert progressed == [32, 8, 3]
    with SafetensorsFile(path) as f:
        assert f.keys() == ["b", "a", "c"]  # file order is spec order
        assert f.info("a") == TensorInfo("a", np.dtype(np.float32), (2,), f.info("b").end, f.info("b").end + 8)
        assert f.array("b").dtype == ml_dtypes.bfloat16 and (f.array("b") == 1).all()
        assert (f.array("a") == 2).all() and (f.array("c").astype(np.float32) == 3).all()


def test_write_accepts_jax_arrays_and_scalars(tmp_path):
    import jax.numpy as jnp

    path = tmp_path / "jax.safetensors"
    arrays = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3), "s": np.float32(2.5)}
    save_file(path, arrays)
    with SafetensorsFile(path) as f:
        assert f.info("s").shape == () and f.array("s") == 2.5
        np.testing.assert_array_equal(f.array("w"), np.asarray(arrays["w"]))


def _assert_only(directory: pathlib.Path, names: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == names  # in particular: no hidden temp files


def test_failure_in_produce_leaves_nothing_behind(tmp_path):
    path = tmp_path / "out.safetensors"

    def produce(name: str) -> np.ndarray:
        if name == "second":
            raise RuntimeError("boom")
        return np.zeros((2,), np.float32)

    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(path, [("first", "F32", (2,)), ("second", "F32", (2,))], produce)
    _assert_only(tmp_path, set())

    # An existing file at the destination survives a failed overwrite unchanged.
    save_file(path, {"old": np.arange(3, dtype=np.int32)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        write_safetensors(path, [("first", "F32", (2,)), ("second", "F32", (2,))], produce)
    assert path.read_bytes() == before
    _assert_only(tmp_path, {"out.safetensors"})


@pytest.mark.parametrize(
    ("produced", "match"),
    [
        (np.zeros((2,), np.float16), r"declared F32 \(float32\) but produce\(\) returned float16"),
        (np.zeros((3,), np.float32), r"declared with shape \(2,\) but produce\(\) returned \(3,\)"),
    ],
)
def test_produce_mismatch_is_rejected_without_casting(tmp_path, produced, match):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=match):
        write_safetensors(path, [("t", "F32", (2,))], lambda name: produced)
    _assert_only(tmp_path, set())


@pytest.mark.parametrize(
    ("specs", "metadata", "error", "match"),
    [
        ([("a", "F32", (1,)), ("a", "F32", (1,))], None, ValueError, "duplicate tensor name 'a'"),
        ([("__metadata__", "F32", (1,))], None, ValueError, "reserved"),
        ([("a", "C64", (1,))], None, ValueError, "unsupported dtype"),
        ([("a", "F32", (-1,))], None, ValueError, "non-negative"),
        ([("a", "F32", (1,))], {"k": 1}, TypeError, "str to str"),
    ],
)
def test_bad_write_specs(tmp_path, specs, metadata, error, match):
    with pytest.raises(error, match=match):
        write_safetensors(tmp_path / "x.safetensors", specs, lambda n: np.zeros((1,), np.float32), metadata)
    _assert_only(tmp_path, set())


# -- memory mapping ---------------------------------------------------------------------------------------


def test_array_is_a_read_only_zero_copy_view_of_the_map(tmp_path):
    big = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024)  # 16 MiB
    path = tmp_path / "big.safetensors"
    save_file(path, {"big": big, "small": np.ones((3,), np.float32)})

    f = SafetensorsFile(path)
    array = f.array("big")
    assert not array.flags.writeable and not array.flags.owndata
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # numpy >= 2 keeps the exporting buffer via a memoryview
        base = base.obj
    assert isinstance(base, mmap.mmap)  # backed by the file mapping, not a copy
    rows = array[1000:1002]
    assert np.shares_memory(rows, f.array("big"))  # slicing and re-requesting never copy
    np.testing.assert_array_equal(rows, big[1000:1002])
    with pytest.raises(ValueError, match="read-only"):
        array[0, 0] = 1.0

    f.close()  # views handed out earlier stay valid until they are dropped
    np.testing.assert_array_equal(rows, big[1000:1002])
    with pytest.raises(ValueError, match="closed"):
        f.array("small")


def test_header_only_access_does_not_map(tmp_path):
    path = tmp_path / "h.safetensors"
    save_file(path, {"w": np.zeros((2, 3), np.float16)})
    f = SafetensorsFile(path)
    assert f.info("w").shape == (2, 3) and f._mmap is None
    f.close()


def test_file_shrunk_after_header_read_is_caught_before_mapping(tmp_path):
    path = tmp_path / "shrink.safetensors"
    save_file(path, {"w": np.zeros((1024,), np.float32)})
    f = SafetensorsFile(path)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="file changed since its header was read"):
        f.array("w")


# -- validation -------------------------------------------------------------------------------------------

GOOD_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def _bad_cases() -> dict[str, tuple[object, bytes, dict, str]]:
    """name -> (header, data, extra kwargs for raw_file, expected message regex)."""
    data = bytes(16)
    return {
        "not_utf8": (b"\xff\xfe{}      ", data, {}, "header is not valid JSON"),
        "not_json": (b'{"a": ', data, {}, "header is not valid JSON"),
        "json_array": ([1, 2], data, {}, "header is not valid JSON.*expected an object"),
        "duplicate_key": (
            b'{"w":' + json.dumps(GOOD_ENTRY).encode() + b',"w":' + json.dumps(GOOD_ENTRY).encode() + b"}",
            data,
            {},
            "duplicate key 'w'",
        ),
        "entry_not_object": ({"w": [1]}, data, {}, "tensor 'w': entry must be an object"),
        "missing_dtype": ({"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, data, {}, "'w'.*missing dtype"),
        "missing_shape": ({"w": {"dtype": "F32", "data_offsets": [0, 16]}}, data, {}, "'w'.*missing shape"),
        "missing_offsets": ({"w": {"dtype": "F32", "shape": [4]}}, data, {}, "'w'.*missing data_offsets"),
        "dtype_not_str": ({"w": {**GOOD_ENTRY, "dtype": 3}}, data, {}, "'w': dtype must be a string"),
        "unknown_dtype": ({"w": {**GOOD_ENTRY, "dtype": "F4"}}, data, {}, "tensor 'w': unknown dtype 'F4'"),
        "shape_not_list": ({"w": {**GOOD_ENTRY, "shape": "2x2"}}, data, {}, "'w': shape must be a list"),
        "shape_bool": ({"w": {**GOOD_ENTRY, "shape": [True, 4]}}, data, {}, "'w': shape must be a list"),
        "shape_negative": ({"w": {**GOOD_ENTRY, "shape": [-2, -2]}}, data, {}, "'w': shape must be a list"),
        "shape_float": ({"w": {**GOOD_ENTRY, "shape": [2.0, 2]}}, data, {}, "'w': shape must be a list"),
        "offsets_len3": (
            {"w": {**GOOD_ENTRY, "data_offsets": [0, 8, 16]}},
            data,
            {},
            "'w': data_offsets must",
        ),
        "offsets_str": (
            {"w": {**GOOD_ENTRY, "data_offsets": ["0", "16"]}},
            data,
            {},
            "'w': data_offsets must",
        ),
        "offsets_negative": (
            {"w": {**GOOD_ENTRY, "data_offsets": [-16, 0]}},
            data,
            {},
            r"'w': invalid data_offsets \[-16, 0\]",
        ),
        "offsets_reversed": (
            {"w": {**GOOD_ENTRY, "data_offsets": [16, 0]}},
            data,
            {},
            r"'w': invalid data_offsets \[16, 0\]",
        ),
        "length_mismatch": (
            {"w": {**GOOD_ENTRY, "data_offsets": [0, 12]}},
            data,
            {},
            r"'w': data_offsets \[0, 12\] span 12 bytes but F32 shape \(2, 2\) needs 16",
        ),
        "tensor_truncated": (
            {"w": GOOD_ENTRY},
            bytes(10),
            {},
            r"truncated: tensor 'w' needs bytes 0..16 of the data section but the data section has only 10",
        ),
        "overlap": (
            {"w": GOOD_ENTRY, "v": {"dtype": "U8", "shape": [4], "data_offsets": [12, 16]}},
            data,
            {},
            "tensors 'w' and 'v' overlap",
        ),
        "metadata_not_str": (
            {"__metadata__": {"steps": 100}, "w": GOOD_ENTRY},
            data,
            {},
            "'steps' must be a str",
        ),
        "metadata_not_obj": (
            {"__metadata__": ["a"], "w": GOOD_ENTRY},
            data,
            {},
            "__metadata__ must be an object",
        ),
        "header_len_too_big": (
            {"w": GOOD_ENTRY},
            data,
            {"header_len": 10_000},
            "header length 10000 bytes exceeds file",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_headers_raise_checkpoint_error_naming_the_file(tmp_path, case):
    header, data, kwargs, match = _bad_cases()[case]
    path = raw_file(tmp_path / f"bad_{case}.safetensors", header, data, **kwargs)
    with pytest.raises(CheckpointError, match=match) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_short_file_is_truncated(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="truncated") as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_absurd_header_length_is_rejected_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:  # sparse: costs no disk, but is larger than the header limit
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 8))
        f.truncate(MAX_HEADER_BYTES + 64)
    with pytest.raises(CheckpointError, match=f"header length {MAX_HEADER_BYTES + 8} bytes exceeds") as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        SafetensorsFile(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(info.value)
    with pytest.raises(CheckpointError, match="is a directory") as info:
        SafetensorsFile(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_key_names_file_and_key(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file(path, {"w": np.zeros((1,), np.float32)})
    with SafetensorsFile(path) as f, pytest.raises(CheckpointError, match="no tensor named 'v'") as info:
        f.array("v")
    assert str(path) in str(info.value)


def test_lenient_where_the_format_is(tmp_path):
    """Null metadata, zero-size tensors sharing an offset, and unknown extra entry fields are all legal."""
    header = {
        "__metadata__": None,
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "w": {**GOOD_ENTRY, "extra": "ignored"},
    }
    path = raw_file(tmp_path / "ok.safetensors", header, np.arange(4, dtype=np.float32).tobytes())
    with SafetensorsFile(path) as f:
        assert f.metadata == {}
        assert f.array("empty").shape == (0, 3)
        np.testing.assert_array_equal(f.array("w"), np.arange(4, dtype=np.float32).reshape(2, 2))


# -- atomic outputs ---------------------------------------------------------------------------------------


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and not tmp.exists()
        tmp.write_text("one")
        assert not path.exists()
    assert path.read_text() == "one"

    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        tmp.write_text("two")
        raise KeyboardInterrupt
    assert path.read_text() == "one"
    _assert_only(path.parent, {"f.txt"})

    with pytest.raises(OutputExistsError, match=r"already exists \(use --force to overwrite\)"):
        with atomic_file(path, force=False):
            pass


def test_atomic_dir(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1"

    with pytest.raises(OutputExistsError) as info:
        with atomic_dir(out):
            raise AssertionError("body must not run when the destination exists")
    assert isinstance(info.value, FluxJaxError) and isinstance(info.value, FileExistsError)
    assert "use --force" in str(info.value)

    with pytest.raises(RuntimeError), atomic_dir(out, force=True) as tmp:  # failure keeps the old directory
        (tmp / "b").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    _assert_only(tmp_path, {"ckpt"})

    with atomic_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    _assert_only(tmp_path, {"ckpt"})


# -- other formats under a .safetensors name (issue 16, case 8) --------------------------------------------------


def _torch_zip(path: pathlib.Path) -> None:
    import torch

    torch.save({"w": torch.zeros(4, 4)}, path)  # torch's default: a zip holding a pickle


def _torch_legacy(path: pathlib.Path) -> None:
    import torch

    torch.save({"w": torch.zeros(4, 4)}, path, _use_new_zipfile_serialization=False)  # a bare pickle stream


def _pickle(protocol: int):
    def write(path: pathlib.Path) -> None:
        import pickle

        path.write_bytes(pickle.dumps({"w": list(range(300))}, protocol=protocol))

    return write


@pytest.mark.parametrize(
    ("write", "what"),
    [
        (_torch_zip, "a zip archive (PyTorch's torch.save format"),
        (_torch_legacy, "a Python pickle"),
        (_pickle(2), "a Python pickle"),
        (_pickle(5), "a Python pickle"),
        (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64)), "a GGUF file"),
    ],
    ids=["torch_zip", "torch_legacy", "pickle2", "pickle5", "gguf"],
)
def test_other_formats_named_safetensors_say_what_they_are(tmp_path, write, what):
    path = tmp_path / "model.safetensors"
    write(path)
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    assert str(info.value).startswith(f"{path}: not a safetensors file: {what}")
    assert "truncated" not in str(info.value) and "exceeds" not in str(info.value)


def test_a_plausible_length_without_a_json_header_is_not_called_truncated(tmp_path):
    path = raw_file(tmp_path / "junk.safetensors", b"\x00junk", header_len=4096)
    with pytest.raises(CheckpointError, match="not a safetensors file") as info:
        SafetensorsFile(path)
    assert "truncated" not in str(info.value)


# -- atomic outputs: refused writes, cleanup, stale temporaries (issue 16, cases 8 and 9) ------------------------


def test_cleanup_never_hides_the_first_error(tmp_path, monkeypatch):
    """On a read-only filesystem even unlinking a never-created temporary fails (EROFS); the body's error wins."""
    import errno

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(RuntimeError, match="the first error"), atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
        raise RuntimeError("the first error")


def test_a_failed_restore_never_hides_the_first_error(tmp_path, monkeypatch, caplog):
    out = tmp_path / "ckpt"
    out.mkdir()
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((pathlib.Path(src).name, pathlib.Path(dst).name))
        if len(calls) == 2:  # the new directory into place
            raise RuntimeError("the first error")
        if len(calls) == 3:  # putting the old one back
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(RuntimeError, match="the first error"), atomic_dir(out, force=True) as tmp:
        (tmp / "a").write_text("1")
    assert len(calls) == 3 and "could not move the previous" in caplog.text


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_is_one_error_naming_the_destination(tmp_path, monkeypatch, code):
    import errno

    path = tmp_path / "out.safetensors"
    save_file(path, {"old": np.arange(3, dtype=np.int32)})
    before = path.read_bytes()

    def produce(name: str) -> np.ndarray:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    with pytest.raises(FluxJaxError) as info:
        write_safetensors(path, [("w", "F32", (2,))], produce)
    reason = os.strerror(getattr(errno, code))
    assert str(info.value) == f"{path}: cannot write ({reason[0].lower()}{reason[1:]}); the partial output was removed"
    assert isinstance(info.value, OSError) and info.value.errno == getattr(errno, code)
    assert path.read_bytes() == before
    _assert_only(tmp_path, {"out.safetensors"})


def test_an_unreadable_input_is_not_blamed_on_the_destination(tmp_path):
    """A permission error about another file (an input) passes through unchanged."""
    with pytest.raises(PermissionError) as info, atomic_file(tmp_path / "out.txt"):
        raise PermissionError(13, "Permission denied", "/somewhere/else/input.safetensors")
    assert info.value.filename == "/somewhere/else/input.safetensors"
    _assert_only(tmp_path, set())


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has this pid now
    return child.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, caplog):
    import subprocess

    from flux_jax.atomic import _host, remove_stale_temporaries

    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    try:
        path = tmp_path / "out"
        names = {
            "old_style": f".out.tmp-{dead}-deadbeef",  # what earlier versions wrote (no host)
            "dead": f".out.tmp-{dead}-{_host()}-0123abcd",
            "dead_dir": f".out.tmp-{dead}-{_host()}-89abcdef",
            "live": f".out.tmp-{live.pid}-{_host()}-00000000",
            "other_host": f".out.tmp-{dead}-{_host()}x-11111111",  # same pid, another machine
            "other_file": f".out2.tmp-{dead}-{_host()}-22222222",
            "old_copy": f".out.old-{dead}-{_host()}-33333333",  # out is missing: the only copy of the old output
        }
        for key, name in names.items():
            if key == "dead_dir":
                (tmp_path / name).mkdir()
                (tmp_path / name / "chunk").write_bytes(b"x" * 100)
            else:
                (tmp_path / name).write_bytes(b"partial")
        removed = remove_stale_temporaries(path)
        assert sorted(p.name for p in removed) == sorted([names["old_style"], names["dead"], names["dead_dir"]])
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names[k] for k in ("live", "other_host", "other_file", "old_copy")}
        assert f"left behind by process {dead}, which is no longer running" in caplog.text
        assert "holds its previous version" in caplog.text
        # Once `out` exists again, the set-aside old copy is stale too.
        path.mkdir()
        assert [p.name for p in remove_stale_temporaries(path)] == [names["old_copy"]]
    finally:
        live.kill()
        live.wait()


def test_temporaries_name_their_process_and_host(tmp_path):
    from flux_jax.atomic import _TEMP_RE, _host

    with atomic_file(tmp_path / "f.txt") as tmp:
        m = _TEMP_RE.fullmatch(tmp.name.removeprefix(".f.txt."))
        assert m is not None and int(m["pid"]) == os.getpid() and m["host"] == _host()
        tmp.write_text("x")
