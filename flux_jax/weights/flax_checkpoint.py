"""Flax checkpoints: an orbax PyTree checkpoint of the Flux parameters, written one layer at a time.

Layout of a checkpoint directory DST (written by `write_flax_checkpoint`, read by `open_flax_checkpoint`):

    DST/
      flux_jax.json                       {"format": "flux_jax.flax_checkpoint", "version": 1,
                                           "config": {FluxConfig fields}, "dtype": "bfloat16"}
      _METADATA                           orbax tree metadata: one entry per parameter
      _CHECKPOINT_METADATA                orbax checkpoint metadata (handler name, timestamps)
      double_blocks.img_attn.qkv.kernel/  one zarr v2 array per parameter, named by its nnx.State path joined
        .zarray                           with "." (orbax's non-OCDBT naming), holding uncompressed chunks of
        0.0.0  0.1.0  1.0.0 ...           [1 layer, <= 64 MiB of rows, all columns] (kernels are [layers, in, out])
      ...

The tree is `nnx.state(model).to_pure_dict()` of the Flux module: kernels [in, out] (stacked blocks [layers, in,
out]), biases and norm scales. "dtype" is the storage dtype of the base; with float8_e4m3fn only the kernels are
fp8 and biases / norm scales are bf16 (`flux_jax.dtypes.storage_dtype`). The files are exactly what orbax's
own `PyTreeCheckpointer(use_ocdbt=False, use_zarr3=False).save(DST, state)` writes, apart from chunking and
compression, which zarr records per array (the tests compare `_METADATA` with orbax's), so

    ocp.StandardCheckpointer().restore(DST, abstract_state_with_shardings)

restores it straight into any sharding. `load_flux(DST, mesh=...)` instead reads each device's shard with
tensorstore through `jax.make_array_from_callback`, like every other format.

Why not orbax's save: it serialises whole arrays, a stacked Flux leaf is up to 5 GB in bf16 (the 38 single-block
linear1 kernels), and the whole model does not fit a 24 GiB host at all. Here each layer of each parameter is read,
cast, written and released before the next, so host memory stays at a few layers whatever the model size. The
`.zarray` files come from tensorstore; the chunk files (raw bytes) are written directly from the layer buffers.
Reading accepts any orbax PyTree checkpoint of this tree, including OCDBT / zarr3 ones that orbax's default save
writes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorstore as ts

from flux_jax.atomic import atomic_dir
from flux_jax.dtypes import storage_dtype
from flux_jax.errors import CheckpointError
from flux_jax.model.config import FluxConfig
from flux_jax.weights import flux_keys
from flux_jax.weights.finite import check_finite
from flux_jax.weights.flax_layout import StatePath, expected_leaves, flax_layer_sources
from flux_jax.weights.fp8 import cast
from flux_jax.weights.handle import FileTensor, FluxCheckpoint, validate_keys
from flux_jax.weights.sources import Index, Source, Transposed

META_FILE = "flux_jax.json"
FORMAT = "flux_jax.flax_checkpoint"
VERSION = 1
ORBAX_METADATA = "_METADATA"
ORBAX_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
ORBAX_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
CHUNK_BYTES = 64 * 2**20
# At most this many layer writes in flight: the next layer is read and cast while the previous one is written.
WRITES_IN_FLIGHT = 2


def is_flax_checkpoint(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / META_FILE).exists()


def leaf_name(path: StatePath) -> str:
    """orbax's name for a leaf: its key path joined with "." (the zarr directory name)."""
    return ".".join(str(p) for p in path)


# -- writing ------------------------------------------------------------------------------------------------------


def _chunks(shape: tuple[int, ...], stacked: bool, itemsize: int) -> list[int]:
    """[1 layer, a divisor of the rows such that a chunk is <= CHUNK_BYTES, all columns]."""
    lead, rest = ([1], list(shape[1:])) if stacked else ([], list(shape))
    if len(rest) < 2:
        return lead + rest
    rows, row_bytes = rest[0], math.prod(rest[1:]) * itemsize
    parts = next((k for k in range(1, rows + 1) if rows % k == 0 and rows // k * row_bytes <= CHUNK_BYTES), rows)
    return lead + [rows // parts] + rest[1:]


def _write_json(path: pathlib.Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _orbax_metadata(paths: list[StatePath], shapes: Mapping[StatePath, tuple[int, ...]]) -> dict[str, Any]:
    """The `_METADATA` orbax writes for a pure-dict tree of jax.Arrays (non-OCDBT, zarr v2)."""
    tree = {}
    for path in paths:
        keys = [str(p) for p in path]
        tree[str(tuple(keys))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],  # 2: a dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shapes[path])},
        }
    return {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def _read_cast(src: Source, target: np.dtype, out: np.ndarray) -> np.ndarray:
    """One whole per-layer tensor, cast into `out`. The hot path of a conversion, a PyTorch weight in a
    safetensors file read as a kernel, casts straight out of the memory map (no intermediate copy)."""
    if isinstance(src, Transposed) and isinstance(src.src, FileTensor):
        with src.src.borrow() as weight:
            return cast(weight.T, target, out=out)
    return cast(src.read(tuple(slice(0, n) for n in src.shape)), target, out=out)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _write_layer(
    leaf_dir: pathlib.Path,
    block: np.ndarray,
    layer: int | None,
    rows_per_chunk: int,
    finite: tuple[str, str, np.dtype] | None = None,
) -> list[pathlib.Path]:
    """Write one layer's zarr v2 chunk files: raw little-endian C-order bytes, named by chunk index ("3.1.0").

    Our chunks tile the array exactly (whole layers, a divisor of the rows, all columns), so every chunk is a
    contiguous run of `block` and goes to disk straight from it, with no copy. Not fsynced here: the kernel
    writes back in the background while the next layers are converted (see `_fsync_all`). `finite`: (tensor name,
    source name, source dtype) to check the block for NaN / Inf first (here, in the writer thread, so the check
    overlaps the next layer's read and cast).
    """
    if finite is not None:
        check_finite(block, finite[0], finite[1], stored=finite[2])
    data = np.ascontiguousarray(block).view(np.uint8).reshape(block.shape[0], -1)
    lead = [] if layer is None else [layer]
    trailing = [0] * (block.ndim - 1)
    written = []
    for j, row in enumerate(range(0, block.shape[0], rows_per_chunk)):
        path = leaf_dir / ".".join(map(str, [*lead, j, *trailing]))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, memoryview(data[row : row + rows_per_chunk]).cast("B"))
        finally:
            os.close(fd)
        written.append(path)
    return written


def _fsync_all(paths: list[pathlib.Path]) -> None:
    """Make every written file and directory durable before the checkpoint is renamed into place.

    One pass at the end instead of an fsync per chunk: by now most pages are written back already, and the disk
    was kept busy with deep queues instead of one synchronous 64 MB flush at a time.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_flax_checkpoint(
    ckpt: FluxCheckpoint,
    dst: str | os.PathLike,
    *,
    dtype,
    force: bool = False,
    progress: Callable[[int], object] | None = None,
    allow_nonfinite: bool = False,
) -> pathlib.Path:
    """Write `ckpt` (any opened checkpoint) as a Flax checkpoint at `dst`, streaming one layer at a time.

    dtype: the storage dtype (fp32 / bf16 / fp16 / float8_e4m3fn; fp8 applies to kernels only). The output is
    atomic: written into a temporary sibling and renamed into place only when complete; an existing `dst` is
    refused unless `force`. `progress(nbytes)` is called after each layer with the bytes written. A layer holding
    NaN / Inf (after the cast) fails the write with `NonFiniteError`, naming its BFL tensor, unless
    `allow_nonfinite`.

    Each zarr array's `.zarray` is created by tensorstore (so the metadata is exactly what tensorstore and orbax
    read); its chunk files are written here directly, which costs about half the CPU of tensorstore's writer.
    A writer thread writes layer k while the main thread reads and casts layer k + 1; everything is fsynced
    before the directory is renamed into place.
    """
    cfg = ckpt.config
    dst = pathlib.Path(dst)
    layers = flax_layer_sources(cfg, ckpt.tensors)
    # The BFL key of each layer of each leaf, to name a non-finite tensor the way the source file does.
    bfl_names = {
        path: [f"{flux_keys.fill(entry.bfl, i)}.{suffix}" for i in flux_keys.layer_indices(cfg, entry)]
        for path, entry, suffix in flux_keys.flax_leaves(cfg)
    }
    with atomic_dir(dst, force=force) as tmp, ThreadPoolExecutor(1, thread_name_prefix="flux_jax_write") as writer:
        shapes: dict[StatePath, tuple[int, ...]] = {}
        # Writes in flight, with their buffers; a buffer of the current shape is recycled once written (a fresh
        # 100 MB array per layer costs page faults), buffers of other shapes are dropped rather than hoarded.
        pending: list[tuple[Future, np.ndarray]] = []
        free: list[np.ndarray] = []
        free_key: tuple | None = None
        written: list[pathlib.Path] = []
        for path, (stacked, per_layer) in layers.items():
            target = storage_dtype(path, dtype)
            shape = (len(per_layer), *per_layer[0].shape) if stacked else tuple(per_layer[0].shape)
            shapes[path] = shape
            chunks = _chunks(shape, stacked, target.itemsize)
            leaf_dir = tmp / leaf_name(path)
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(leaf_dir)},
                "metadata": {"shape": list(shape), "chunks": chunks, "compressor": None, "order": "C"},
                "dtype": target.name,
                "create": True,
            }
            ts.open(spec).result()  # writes .zarray only
            key = (tuple(per_layer[0].shape), target)
            free = free if key == free_key else []
            free_key = key
            rows_per_chunk = chunks[1 if stacked else 0]
            for i, src in enumerate(per_layer):
                block = _read_cast(src, target, free.pop() if free else np.empty(src.shape, target))
                layer = i if stacked else None
                finite = None if allow_nonfinite else (bfl_names[path][i], str(ckpt.path), src.dtype)
                job = writer.submit(_write_layer, leaf_dir, block, layer, rows_per_chunk, finite)
                pending.append((job, block))
                while len(pending) >= WRITES_IN_FLIGHT:
                    fut, done = pending.pop(0)
                    written += fut.result()
                    if (done.shape, done.dtype) == free_key:
                        free.append(done)
                if progress is not None:
                    progress(math.prod(src.shape) * target.itemsize)
            written.append(leaf_dir)
        for fut, _ in pending:
            written += fut.result()
        _fsync_all([*written, *(tmp / leaf_name(p) / ".zarray" for p in shapes)])
        order = sorted(shapes, key=lambda p: tuple(str(k) for k in p))
        now = time.time_ns()
        _write_json(tmp / ORBAX_METADATA, _orbax_metadata(order, shapes))
        _write_json(
            tmp / ORBAX_CHECKPOINT_METADATA,
            {
                "item_handlers": ORBAX_HANDLER,
                "metrics": {},
                "performance_metrics": {},
                "init_timestamp_nsecs": now,
                "commit_timestamp_nsecs": now,
                "custom_metadata": {},
            },
        )
        _write_json(
            tmp / META_FILE,
            {"format": FORMAT, "version": VERSION, "config": cfg.to_json(), "dtype": np.dtype(dtype).name},
        )
    return dst


# -- reading ------------------------------------------------------------------------------------------------------


class ZarrLeaf:
    """One parameter of a Flax checkpoint (or one layer of a stacked one) as a slice-readable source."""

    def __init__(self, store: ts.TensorStore, where: str, layer: int | None = None):
        self.store, self.where, self.layer = store, where, layer
        full = tuple(int(n) for n in store.shape)
        self.shape = full[1:] if layer is not None else full
        self.dtype = np.dtype(store.dtype.numpy_dtype)

    def read(self, index: Index) -> np.ndarray:
        index = tuple(index) if self.layer is None else (self.layer, *index)
        try:
            return np.asarray(self.store[index].read().result())
        except ValueError as e:  # tensorstore reports missing / corrupt chunks as ValueError
            raise CheckpointError(f"{self.where}: cannot read {index}: {e}") from None


def _kvstore(directory: pathlib.Path, name: str, use_ocdbt: bool) -> dict[str, Any]:
    if use_ocdbt:
        return {"driver": "ocdbt", "base": {"driver": "file", "path": str(directory) + "/"}, "path": name}
    return {"driver": "file", "path": str(directory / name)}


def _read_meta(path: pathlib.Path) -> tuple[FluxConfig, np.dtype]:
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a flux-jax Flax checkpoint description (format {FORMAT!r} expected)")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{meta_path}: unsupported version {meta.get('version')!r} (this flux-jax reads {VERSION})"
        )
    try:
        dtype = np.dtype(meta["dtype"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: missing or unknown 'dtype' ({e})") from None
    return FluxConfig.from_json(meta.get("config"), str(meta_path)), dtype


def _orbax_leaves(path: pathlib.Path) -> tuple[set[str], bool, bool]:
    """Leaf names in orbax's `_METADATA`, and whether the arrays are in OCDBT / zarr3 form."""
    meta_path = path / ORBAX_METADATA
    try:
        meta = json.loads(meta_path.read_text())
        tree = meta["tree_metadata"]
        names = {".".join(str(k["key"]) for k in entry["key_metadata"]) for entry in tree.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: missing or unreadable orbax metadata ({e})") from None
    return names, bool(meta.get("use_ocdbt", False)), bool(meta.get("use_zarr3", False))


def open_flax_checkpoint(path: str | os.PathLike, *, config: FluxConfig | None = None) -> FluxCheckpoint:
    """Open a Flax checkpoint directory: validate every leaf's presence, shape and dtype, then expose lazy sources.

    The result has BFL-keyed per-layer sources (`tensors`, for writing PyTorch files) and per-leaf sources in the
    Flax layout (`flax_leaves`, for `load_flux`).
    """
    path = pathlib.Path(path)
    cfg, dtype = _read_meta(path)
    if config is not None and config != cfg:
        raise CheckpointError(f"{path}: the checkpoint holds config {cfg}, which differs from the requested {config}")
    names, use_ocdbt, use_zarr3 = _orbax_leaves(path)
    expected = expected_leaves(cfg, dtype)
    by_name = {leaf_name(p): p for p in expected}
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    stores: dict[StatePath, ts.TensorStore] = {}
    found: dict[str, tuple[int, ...]] = {n: () for n in names if n not in by_name}  # unexpected leaves
    wrong_dtype = []
    for name, state_path in by_name.items():
        if name not in names:
            continue
        spec = {
            "driver": "zarr3" if use_zarr3 else "zarr",
            "kvstore": _kvstore(path, name, use_ocdbt),
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
            # A lost chunk is an error, never silently zeros (tensorstore's default fills them).
            "fill_missing_data_reads": False,
        }
        try:
            store = ts.open(spec, context=ctx, open=True, read=True).result()
        except ValueError as e:
            raise CheckpointError(f"{path}: cannot open parameter {name} ({e})") from None
        stores[state_path] = store
        found[name] = tuple(int(n) for n in store.shape)
        if np.dtype(store.dtype.numpy_dtype) != expected[state_path][1]:
            wrong_dtype.append(f"{name} {store.dtype.numpy_dtype} (expected {expected[state_path][1]})")
    validate_keys(str(path), found, {leaf_name(p): shape for p, (shape, _) in expected.items()})
    if wrong_dtype:
        raise CheckpointError(f"{path}: {len(wrong_dtype)} parameter(s) with the wrong dtype: {', '.join(wrong_dtype)}")

    leaves: dict[tuple, Source] = {p: ZarrLeaf(s, f"{path}/{leaf_name(p)}") for p, s in stores.items()}
    tensors: dict[str, Source] = {}
    for state_path, entry, suffix in flux_keys.flax_leaves(cfg):
        store = stores[state_path]
        for i in flux_keys.layer_indices(cfg, entry):
            src: Source = ZarrLeaf(store, f"{path}/{leaf_name(state_path)}", i)
            tensors[f"{flux_keys.fill(entry.bfl, i)}.{suffix}"] = Transposed(src) if suffix == "weight" else src
    return FluxCheckpoint(path, "flax", cfg, tensors, [], np.dtype(dtype), (), leaves)
