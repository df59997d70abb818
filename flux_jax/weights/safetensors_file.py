"""Torch-free safetensors reading (memory-mapped) and streaming, atomic writing.

Why not the `safetensors` package: its numpy/flax API cannot read `F8_E4M3` tensors (one fp8 tensor breaks
`load_file` for the whole file), bf16 needs ml_dtypes imported first, and its writers need every tensor in
memory at once, which for a 12B-parameter Flux transformer is tens of GB of host RAM. This module parses the
header itself, validates it strictly (a corrupt or truncated download should fail with a message naming the
file and the problem, not with a numpy error or a SIGBUS later), and hands out zero-copy read-only views of
the memory-mapped data, so slicing a tensor touches only the pages it needs. The writer emits the header from
(name, dtype, shape) specs first and then streams one tensor at a time, so peak host memory is one tensor.

File layout (identical to the official format): 8-byte little-endian unsigned header length N, N bytes of
UTF-8 JSON padded with spaces to a multiple of 8, then the data section; each tensor's `data_offsets` are
[begin, end) byte offsets relative to the start of the data section, and all data is little-endian.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import pathlib
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import ml_dtypes
import numpy as np

from flux_jax.atomic import atomic_file
from flux_jax.errors import CheckpointError

# Same limit as the official Rust implementation; a larger value is a corrupt length prefix, not a header.
MAX_HEADER_BYTES = 100_000_000

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux; elsewhere release() does nothing
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def _as_dtype(dtype: Any) -> np.dtype:
    """A safetensors dtype name ("BF16") or anything `np.dtype` accepts, as a supported numpy dtype."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    try:
        resolved = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unsupported dtype {dtype!r} for safetensors: {e}") from None
    if resolved not in _NAMES:
        raise ValueError(f"unsupported dtype {resolved} for safetensors (supported: {', '.join(DTYPES)})")
    return resolved


def dtype_name(dtype: Any) -> str:
    """The safetensors header string for a numpy dtype (e.g. ml_dtypes.bfloat16 -> "BF16").

    Raises ValueError for dtypes safetensors cannot store (complex, float128, big-endian, ...).
    """
    return _NAMES[_as_dtype(dtype)]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `start`/`end` are absolute byte offsets in the file (not data-relative)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _is_int(value: Any) -> bool:
    # JSON true/false parse as bool, which is an int subclass; a shape of [true] is corrupt, not [1].
    return isinstance(value, int) and not isinstance(value, bool)


# Formats that are sometimes saved under a .safetensors name; recognised so the error says what the file is.
_PICKLE = "a Python pickle (a PyTorch .pt / .ckpt / .bin checkpoint?), which flux-jax never loads: pickles can run code"
_MAGIC = (
    (b"PK\x03\x04", "a zip archive (PyTorch's torch.save format, a pickle inside), which flux-jax never loads"),
    (b"GGUF", "a GGUF file (llama.cpp / ComfyUI-GGUF quantised weights)"),
    (b"\x89HDF", "an HDF5 file"),
)


def _foreign_format(prefix: bytes) -> str | None:
    """What the file is instead, when its first bytes are another format's signature (None when unrecognised)."""
    for magic, what in _MAGIC:
        if prefix.startswith(magic):
            return what
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:  # pickle PROTO opcode, protocols 2-5
        return _PICKLE
    return None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of duplicate keys; two entries for one tensor means corruption.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class SafetensorsFile:
    """Memory-mapped, header-validated safetensors file; never uses pickle, never needs torch.

    The header is parsed and validated in the constructor, so a bad file fails before any work starts.
    The file is memory-mapped lazily on the first `array()` call. Arrays returned by `array()` are read-only
    views into the map and stay valid after `close()` (the map is released once the last view is gone).
    """

    path: pathlib.Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        self._mmap: mmap.mmap | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._file_size, self.metadata, self.tensors = self._read_header()

    # -- header parsing and validation ----------------------------------------------------------------

    def _error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")

    def _read_header(self) -> tuple[int, dict[str, str], dict[str, TensorInfo]]:
        if not self.path.exists():
            raise self._error("file does not exist")
        if self.path.is_dir():
            raise self._error("is a directory, expected a .safetensors file")
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._error(f"truncated: file has {size} bytes, fewer than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", prefix)
                foreign = _foreign_format(prefix)
                if foreign is not None and (header_len > min(size - 8, MAX_HEADER_BYTES) or f.read(1) != b"{"):
                    raise self._error(f"not a safetensors file: {foreign}")
                if header_len > MAX_HEADER_BYTES:
                    raise self._error(
                        f"header length {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit "
                        f"(file size {size} bytes): not a safetensors file"
                    )
                if header_len > size - 8:
                    f.seek(8)
                    why = (
                        "truncated, or its length prefix is corrupt"
                        if f.read(1) == b"{"
                        else "not a safetensors file (no JSON header follows the length prefix)"
                    )
                    raise self._error(
                        f"header length {header_len} bytes exceeds file size ({size} bytes, "
                        f"{size - 8} after the length prefix): {why}"
                    )
                f.seek(8)
                raw = f.read(header_len)
        except OSError as e:
            raise self._error(f"cannot read: {e}") from e
        if len(raw) != header_len:
            raise self._error(f"truncated: header needs {header_len} bytes but only {len(raw)} could be read")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise self._error(f"header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._error(f"header is not valid JSON for safetensors: expected an object, got {header!r:.80}")

        data_start = 8 + header_len
        data_size = size - data_start
        metadata: dict[str, str] = {}
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                metadata = self._parse_metadata(entry)
            else:
                begin, end = self._parse_entry(name, entry, data_size)
                tensors[name] = TensorInfo(
                    name, DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin, data_start + end
                )
        self._check_overlaps(tensors, data_start)
        return size, metadata, tensors

    def _parse_metadata(self, entry: Any) -> dict[str, str]:
        if entry is None:
            return {}
        if not isinstance(entry, dict):
            raise self._error(f"__metadata__ must be an object of strings, got {type(entry).__name__}")
        for key, value in entry.items():
            if not isinstance(value, str):
                raise self._error(
                    f"__metadata__ value for {key!r} must be a string, got {type(value).__name__} {value!r:.80}"
                )
        return dict(entry)

    def _parse_entry(self, name: str, entry: Any, data_size: int) -> tuple[int, int]:
        """Validate one tensor entry; return its data-relative [begin, end)."""
        if not isinstance(entry, dict):
            raise self._error(f"tensor {name!r}: entry must be an object, got {type(entry).__name__}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise self._error(f"tensor {name!r}: entry is missing {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise self._error(f"tensor {name!r}: dtype must be a string, got {dtype!r:.80}")
        if dtype not in DTYPES:
            raise self._error(f"tensor {name!r}: unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._error(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r:.80}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise self._error(f"tensor {name!r}: data_offsets must be [begin, end] integers, got {offsets!r:.80}")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise self._error(f"tensor {name!r}: invalid data_offsets [{begin}, {end}] (need 0 <= begin <= end)")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._error(
                f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes but {dtype} "
                f"shape {tuple(shape)} needs {expected}"
            )
        if end > data_size:
            raise self._error(
                f"truncated: tensor {name!r} needs bytes {begin}..{end} of the data section but the data "
                f"section has only {data_size} bytes"
            )
        return begin, end

    def _check_overlaps(self, tensors: dict[str, TensorInfo], data_start: int) -> None:
        # Zero-byte tensors occupy no bytes and cannot overlap anything.
        spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
        for (_, prev_end, prev_name), (start, end, name) in zip(spans, spans[1:], strict=False):
            if start < prev_end:
                raise self._error(
                    f"tensors {prev_name!r} and {name!r} overlap in the data section "
                    f"(..{prev_end - data_start} vs {start - data_start}..{end - data_start})"
                )

    # -- mapping-like access --------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file (header) order."""
        return list(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._error(f"no tensor named {name!r} (file has {len(self.tensors)} tensors)") from None

    def _map(self) -> mmap.mmap:
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path}: SafetensorsFile is closed")
            if self._mmap is None:
                try:
                    with open(self.path, "rb") as f:  # the mmap keeps its own handle; the file can close
                        size = os.fstat(f.fileno()).st_size
                        # Pages past EOF of a file shortened after the header check would SIGBUS on access.
                        if size != self._file_size:
                            raise self._error(
                                f"file changed since its header was read ({self._file_size} -> {size} bytes)"
                            )
                        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except OSError as e:
                    raise self._error(f"cannot memory-map: {e}") from e
            return self._mmap

    def array(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of one tensor with its declared dtype and shape.

        Nothing is read until the array is touched, and then only the touched pages: `array(k)[3:5]` on a
        multi-GB tensor reads a few pages. Tensors at offsets that are not a multiple of their itemsize (a
        legal layout) come back as unaligned views, which numpy handles.
        """
        info = self.info(name)
        flat = np.frombuffer(self._map(), dtype=info.dtype, count=math.prod(info.shape), offset=info.start)
        return flat.reshape(info.shape)

    def release(self, start: int, end: int) -> None:
        """Drop this process's mapping of the file's bytes [start, end) (absolute offsets, as in TensorInfo): the
        pages leave the resident set and stay in the page cache, so streaming a file larger than RAM keeps the
        process small. Safe at any time on a read-only map: a later access faults the pages in again."""
        mm = self._mmap
        if mm is None or end <= start or _DONTNEED is None:
            return
        lo = start - start % mmap.PAGESIZE
        try:
            mm.madvise(_DONTNEED, lo, end - lo)
        except (OSError, ValueError):
            pass  # an optimisation only

    def close(self) -> None:
        """Release the map; views handed out earlier keep it alive until they are garbage collected."""
        with self._lock:
            self._closed = True
            if self._mmap is not None:
                try:
                    self._mmap.close()
                except BufferError:
                    pass  # exported views still exist; the map is unmapped when the last one is freed
                self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- writing ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


def _normalize_specs(tensors: Iterable[tuple[str, np.dtype | str, tuple[int, ...]]]) -> list[_Spec]:
    specs: list[_Spec] = []
    seen: set[str] = set()
    for name, dtype, shape in tensors:
        if not isinstance(name, str):
            raise ValueError(f"tensor name must be a string, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        np_dtype = _as_dtype(dtype)
        shape = tuple(shape)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape must be non-negative integers, got {shape}")
        shape = tuple(int(d) for d in shape)
        specs.append(_Spec(name, np_dtype, shape, math.prod(shape) * np_dtype.itemsize))
    return specs


def _encode_header(specs: list[_Spec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r:.80}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    # Compact UTF-8 JSON as the official (serde_json) writer emits it; spaces pad it to a multiple of 8 so the
    # data section starts 8-byte aligned.
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    return raw


def _checked(path: pathlib.Path, spec: _Spec, value: Any) -> np.ndarray:
    """The produced tensor as a C-contiguous array, after checking it against its header spec.

    No casting: the header is already on disk, so a dtype or shape mismatch is a bug in the producer and
    silently converting would hide it.
    """
    array = np.asarray(value)
    if array.dtype != spec.dtype:
        raise ValueError(
            f"{path}: tensor {spec.name!r} was declared {_NAMES[spec.dtype]} ({spec.dtype}) but produce() "
            f"returned {array.dtype}"
        )
    if array.shape != spec.shape:
        raise ValueError(
            f"{path}: tensor {spec.name!r} was declared with shape {spec.shape} but produce() returned {array.shape}"
        )
    return np.ascontiguousarray(array)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, np.dtype | str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Stream tensors into a safetensors file without holding more than one in memory.

    The header is written first from the (name, dtype, shape) specs (dtype: a numpy dtype or a safetensors
    name such as "BF16"), then `produce(name)` is called once per tensor in spec order; its result (anything
    `np.asarray` accepts, e.g. a jax.Array) must match the spec's dtype and shape exactly, is written, and is
    released before the next call. Tensors are laid out contiguously in spec order. Output is atomic: it goes
    to a hidden temp sibling that is fsynced and renamed onto `path` (replacing it) only after every tensor
    was written; on any exception the temp file is removed and `path` is untouched. `progress(nbytes)` is
    called after each tensor with the bytes just written.
    """
    path = pathlib.Path(path)
    specs = _normalize_specs(tensors)
    header = _encode_header(specs, metadata)
    expected_size = 8 + len(header) + sum(spec.nbytes for spec in specs)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in specs:
            array = _checked(path, spec, produce(spec.name))
            f.write(array.reshape(-1).view(np.uint8))
            del array  # drop our reference before producing the next tensor
            if progress is not None:
                progress(spec.nbytes)
        f.flush()
        if f.tell() != expected_size:  # guards the header/data consistency the reader relies on
            raise RuntimeError(f"{path}: wrote {f.tell()} bytes, expected {expected_size}")


def save_file(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write in-memory arrays (in mapping order) to `path`, atomically; see `write_safetensors`."""
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    write_safetensors(path, [(n, a.dtype, a.shape) for n, a in arrays.items()], arrays.__getitem__, metadata)
