"""fp8 weights: exact, fast dtype casts and the dequantisation of ComfyUI "scaled fp8" checkpoints.

Plain fp8 checkpoints (Kijai's Flux fp8 files) are a dtype cast: every tensor, biases and norm scales included, is
converted by its declared dtype. "Scaled fp8" checkpoints (ComfyUI) store `w / s` in fp8 with a float32 scalar `s`
per Linear, so the real weight is `fp8 * s`. The markers, in the forms seen in the wild:

- `scaled_fp8`: an empty marker tensor whose dtype names the fp8 format (2 elements: "full-precision matmul", an
  inference hint that does not change the weights);
- `<layer>.scale_weight` (`s`) and `<layer>.scale_input` (an activation scale, irrelevant for the weights);
- ComfyUI's renamed forms `<layer>.weight_scale` / `<layer>.input_scale`, described per layer either by a
  `<layer>.comfy_quant` tensor (uint8 bytes of a JSON config such as `{"format": "float8_e4m3fn"}`) or by a
  `_quantization_metadata` JSON (`{"layers": {layer: config}}`) in the safetensors metadata.

Per-tensor float8 formats are applied exactly (`fp8 -> float32`, times the float32 scale). Anything else (nvfp4,
mxfp8, int8, block or per-channel scales, `weight_scale_2`, `pre_quant_scale`) raises a CheckpointError naming the
file, the layer and the format: such a file is never loaded with silently wrong weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from flux_jax.errors import CheckpointError
from flux_jax.weights.sources import Mapped, Source, read_all

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E5M2 = np.dtype(ml_dtypes.float8_e5m2)
FP8_DTYPES = (E4M3, E5M2)
FP8_FORMATS = {"float8_e4m3fn": E4M3, "float8_e5m2": E5M2}
# Targets of the lookup-table cast (ml_dtypes' bfloat16 has numpy kind "V", so list them rather than test kind).
_WIDE = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
FLOAT_DTYPES = (np.dtype(np.float64), *_WIDE, *FP8_DTYPES)

QUANT_METADATA_KEY = "_quantization_metadata"
MARKER = "scaled_fp8"
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
CONFIG_SUFFIX = ".comfy_quant"
# Parameters of quantisation schemes that are not a per-tensor scale; a file with them cannot be read correctly here.
UNSUPPORTED_SUFFIXES = (".weight_scale_2", ".pre_quant_scale", ".scale_weight_2")
# Layer config keys that do not change how the stored weight is dequantised.
HARMLESS_CONFIG_KEYS = {"format", "full_precision_matrix_mult", "orig_dtype"}


# -- casts --------------------------------------------------------------------------------------------------------

_LUT_CACHE: dict[tuple[np.dtype, np.dtype], np.ndarray] = {}


def _lut(src: np.dtype, dst: np.dtype) -> np.ndarray:
    """The 256-entry table of every fp8 bit pattern converted to `dst`, as raw unsigned integers of dst's width.

    A table lookup is the conversion itself (the table is built by ml_dtypes' own cast), as one gather instead of
    `astype`'s per-element conversion through float32, which matters for the 12 billion elements of a full model.
    """
    key = (src, dst)
    if key not in _LUT_CACHE:
        values = np.arange(256, dtype=np.uint8).view(src).astype(np.float32).astype(dst)
        _LUT_CACHE[key] = values.view(np.dtype(f"u{dst.itemsize}"))
    return _LUT_CACHE[key]


_PAIR_CACHE: dict[tuple[np.dtype, np.dtype], np.ndarray] = {}


def _pair_lut(src: np.dtype, dst: np.dtype) -> np.ndarray | None:
    """65536 entries: two adjacent fp8 bytes (read as one little-endian uint16) -> both converted values, packed.

    Half as many lookups as `_lut` (about 40% less CPU per element measured here); the table (256-512 KiB) stays
    in cache.
    """
    if sys.byteorder != "little" or dst.itemsize > 4:
        return None
    key = (src, dst)
    if key not in _PAIR_CACHE:
        single = _lut(src, dst).astype(np.uint64)
        pairs = np.arange(65536, dtype=np.uint64)
        packed = single[pairs & 0xFF] | (single[pairs >> 8] << np.uint64(8 * dst.itemsize))
        _PAIR_CACHE[key] = packed.astype(np.dtype(f"u{2 * dst.itemsize}"))
    return _PAIR_CACHE[key]


def _lookup(raw: np.ndarray, src: np.dtype, dst: np.dtype, out: np.ndarray) -> None:
    """out (unsigned ints of dst's width) = fp8 bytes `raw` converted to dst; pairwise when the layout allows."""
    pair = _pair_lut(src, dst)
    if pair is not None and raw.ndim and raw.shape[-1] % 2 == 0 and raw.flags.c_contiguous and out.flags.c_contiguous:
        np.take(pair, raw.view(np.uint16), out=out.view(pair.dtype))
    else:
        np.take(_lut(src, dst), raw, out=out)


def fp8_max(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).max)


def _cast_contiguous(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if block.dtype in FP8_DTYPES and dtype in _WIDE:
        out = np.empty(block.shape, dtype)
        _lookup(np.ascontiguousarray(block).view(np.uint8), block.dtype, dtype, out.view(f"u{dtype.itemsize}"))
        return out
    # A value beyond the target's range becomes Inf without numpy's RuntimeWarning: the writers' finite check
    # names the tensor instead (weights.finite), in one line.
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype in FP8_DTYPES and block.dtype != dtype:
            wide = np.asarray(block, dtype=np.float32)
            limit = fp8_max(dtype)
            return np.clip(wide, -limit, limit).astype(dtype)  # clip keeps NaN; then one rounding step
        return np.array(block, dtype=dtype, order="C", copy=True)


# Rows of the source converted per tile of a transposing cast: the tile (and its transpose) stays in L2 cache.
TILE_ROWS = 128
_TILED_MIN = 1 << 20
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="flux_jax_cast")


def _transposing_cast(block: np.ndarray, dtype: np.dtype, out: np.ndarray | None) -> np.ndarray:
    """`block` is the transpose of a C-contiguous [rows, cols] array: convert rows in tiles, write them transposed.

    numpy's own copy of a transposed view walks memory with a large stride and is several times slower. The
    tiles are spread over a few threads (numpy releases the GIL in these copies); fp8 tiles are looked up into a
    reused per-thread buffer.
    """
    src = block.T  # C-contiguous [rows, cols]
    out = np.empty(block.shape, dtype) if out is None else out
    rows, cols = src.shape
    lut = _lut(src.dtype, dtype) if src.dtype in FP8_DTYPES and dtype in _WIDE else None

    def work(lo: int, hi: int) -> None:
        if lut is not None:
            raw, out_raw = src.view(np.uint8), out.view(lut.dtype)
            buf = np.empty((TILE_ROWS, cols), lut.dtype)
            for r in range(lo, hi, TILE_ROWS):
                part = buf[: min(TILE_ROWS, hi - r)]
                _lookup(raw[r : r + len(part)], src.dtype, dtype, part)
                out_raw[:, r : r + len(part)] = part.T
        else:
            for r in range(lo, hi, TILE_ROWS):
                out[:, r : min(r + TILE_ROWS, hi)] = _cast_contiguous(src[r : min(r + TILE_ROWS, hi)], dtype).T

    n = _WORKERS
    bounds = [rows * k // n // TILE_ROWS * TILE_ROWS for k in range(n)] + [rows]
    for fut in [_POOL.submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]:
        fut.result()
    return out


def cast(block: np.ndarray, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous copy of `block` in `dtype` (written into `out` when given: a reused buffer).

    fp8 -> wider floats go through a lookup table (exact). Casts to fp8 saturate at +-max (448 for e4m3fn) like
    PyTorch's `.to(torch.float8_e4m3fn)`, where ml_dtypes and XLA would turn an out-of-range value into NaN; NaN
    stays NaN. A transposed view (a PyTorch weight read as a JAX kernel) is converted in cache-sized tiles.
    Always a copy: the block may be a view of a memory map that is released after the read.
    """
    dtype = np.dtype(dtype)
    if out is not None and (out.shape != block.shape or out.dtype != dtype or not out.flags.c_contiguous):
        raise ValueError(f"out buffer {out.dtype}{out.shape} does not fit a {dtype}{block.shape} cast")
    if block.ndim == 2 and block.size >= _TILED_MIN and not block.flags.c_contiguous and block.T.flags.c_contiguous:
        return _transposing_cast(block, dtype, out)
    result = _cast_contiguous(block, dtype)
    if out is None:
        return result
    out[...] = result
    return out


# -- scaled fp8 ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dequantized:
    """The tensors of a checkpoint with scaled-fp8 weights replaced by their dequantised (float32) values."""

    tensors: dict[str, Source]
    scaled_layers: tuple[str, ...]


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _json_bytes(src: Source, where: str, key: str) -> dict:
    raw = read_all(src)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{where}: {key} must be a 1-D uint8 tensor of JSON bytes, got {raw.dtype} {raw.shape}")
    try:
        conf = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: {key} is not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: {key} must hold a JSON object, got {conf!r:.80}")
    return conf


def _metadata_layers(metadata: Mapping[str, str], prefix: str, where: str) -> dict[str, dict]:
    if QUANT_METADATA_KEY not in metadata:
        return {}
    try:
        layers = json.loads(metadata[QUANT_METADATA_KEY])["layers"]
        if not isinstance(layers, dict):
            raise TypeError(f"'layers' is a {type(layers).__name__}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: unreadable {QUANT_METADATA_KEY} metadata ({e})") from None
    out = {}
    for name, conf in layers.items():
        if isinstance(conf, str):  # some tools write the bare format name
            conf = {"format": conf}
        if not isinstance(conf, dict):
            raise CheckpointError(f"{where}: {QUANT_METADATA_KEY} entry for {name!r} is not an object: {conf!r:.80}")
        out[name[len(prefix) :] if prefix and name.startswith(prefix) else name] = conf
    return out


def _scale_value(src: Source, where: str, key: str) -> np.float32:
    if np.dtype(src.dtype) not in FLOAT_DTYPES or int(np.prod(src.shape)) != 1:
        raise CheckpointError(
            f"{where}: {key} has dtype {src.dtype} and shape {tuple(src.shape)}; only a single float per layer "
            "(per-tensor scaled fp8) can be applied, per-channel or block scales are not supported"
        )
    value = np.float32(read_all(src).astype(np.float32).reshape(()))
    if not np.isfinite(value):
        raise CheckpointError(f"{where}: {key} is {value}, not a usable scale")
    return value


def dequantize(tensors: Mapping[str, Source], metadata: Mapping[str, str], where: str, prefix: str = "") -> Dequantized:
    """Apply (and remove) every scaled-fp8 marker of a checkpoint, or raise for markers that cannot be applied.

    tensors: the checkpoint's tensors with any key prefix already stripped. metadata: its safetensors metadata
    (`prefix` is stripped from the layer names of `_quantization_metadata` too). Unscaled tensors pass through
    untouched, fp8 or not; a scaled weight becomes a float32 source computing `fp8 * scale` per read.
    """
    out = dict(tensors)
    marker_dtype = None
    if MARKER in out:
        marker_dtype = np.dtype(out.pop(MARKER).dtype)
    configs = _metadata_layers(metadata, prefix, where)
    scales: dict[str, tuple[str, Source]] = {}
    for key in list(out):
        if (bad := _strip(key, UNSUPPORTED_SUFFIXES)) is not None:
            raise CheckpointError(
                f"{where}: {key} belongs to a quantisation scheme other than per-tensor scaled fp8 (layer {bad}); "
                "flux-jax cannot dequantise it"
            )
        if (layer := _strip(key, (CONFIG_SUFFIX,))) is not None:
            configs[layer] = _json_bytes(out.pop(key), where, key)
        elif _strip(key, INPUT_SCALE_SUFFIXES) is not None:
            out.pop(key)  # scales activations at inference; the stored weights do not depend on it
        elif (layer := _strip(key, WEIGHT_SCALE_SUFFIXES)) is not None:
            if layer in scales:
                raise CheckpointError(f"{where}: layer {layer} has two weight scales ({scales[layer][0]} and {key})")
            scales[layer] = (key, out.pop(key))

    for layer, conf in configs.items():
        fmt = conf.get("format")
        if fmt not in FP8_FORMATS:
            raise CheckpointError(
                f"{where}: layer {layer} uses quantisation format {fmt!r}; only per-tensor "
                f"{' / '.join(FP8_FORMATS)} can be dequantised"
            )
        extra = sorted(set(conf) - HARMLESS_CONFIG_KEYS)
        if extra:
            raise CheckpointError(
                f"{where}: layer {layer} ({fmt}) has quantisation options {extra} that flux-jax cannot apply"
            )
        if f"{layer}.weight" in out and layer not in scales:
            raise CheckpointError(f"{where}: layer {layer} is marked {fmt} but has no weight scale tensor")

    for layer, (key, scale_src) in scales.items():
        weight_key = f"{layer}.weight"
        if weight_key not in out:
            raise CheckpointError(f"{where}: {key} scales a weight {weight_key} that is not in the file")
        weight = out[weight_key]
        want = FP8_FORMATS.get(configs.get(layer, {}).get("format"), marker_dtype)
        if np.dtype(weight.dtype) not in FP8_DTYPES:
            raise CheckpointError(
                f"{where}: {weight_key} has a weight scale but is stored as {weight.dtype}, not fp8; "
                "scaled fp8 markers on a non-fp8 weight cannot be interpreted"
            )
        if want is not None and want in FP8_DTYPES and np.dtype(weight.dtype) != want:
            raise CheckpointError(
                f"{where}: {weight_key} is stored as {weight.dtype} but its quantisation config says {want}"
            )
        scale = _scale_value(scale_src, where, key)
        out[weight_key] = Mapped(weight, lambda x, s=scale: cast(x, np.float32) * s, np.float32)
    return Dequantized(out, tuple(sorted(scales)))
