"""Flax -> PyTorch: write a Flux transformer as a BFL single file or a diffusers sharded directory.

Input is anything with a config and BFL-keyed sources: an opened checkpoint (`open_checkpoint`, any layout, Flax
checkpoints included) or a live `Flux` model (its stacked leaves are sliced one layer at a time). Output streams
through `write_safetensors`: each tensor is read, cast and written before the next, so host memory stays at one
tensor. The key table (`flux_keys`) decides every name, split and half swap. With the dtype unchanged the bytes
round-trip exactly. Our FluxConfig travels in the safetensors metadata (`CONFIG_METADATA_KEY`) so that configs
the shapes cannot determine (a tiny test model's RoPE axes) are read back exactly. Every tensor is checked for
NaN / Inf as it is written (`weights.finite`): a non-finite one fails the write, naming it, unless
`allow_nonfinite`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping

import jax
import numpy as np

from flux_jax.atomic import OutputExistsError, atomic_dir
from flux_jax.errors import FluxJaxError
from flux_jax.model.config import CONFIG_METADATA_KEY, FluxConfig, config_metadata
from flux_jax.model.flux import Flux
from flux_jax.weights import flux_keys
from flux_jax.weights.checkpoint import DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS
from flux_jax.weights.finite import check_finite
from flux_jax.weights.fp8 import cast
from flux_jax.weights.handle import FluxCheckpoint
from flux_jax.weights.safetensors_file import write_safetensors
from flux_jax.weights.sources import Index, RowSlice, Source, Transposed, read_all, swap_halves

Progress = Callable[[int], object] | None
DEFAULT_SHARD_BYTES = 10 * 10**9  # diffusers' default max_shard_size ("10GB")


class _JaxLayer:
    """Layer `layer` (or all of an unstacked leaf) of a model parameter; reads slice on device, then copy out."""

    def __init__(self, array: jax.Array, layer: int | None):
        self.array, self.layer = array, layer
        self.shape = tuple(array.shape[1:] if layer is not None else array.shape)
        self.dtype = np.dtype(array.dtype)

    def read(self, index: Index) -> np.ndarray:
        index = tuple(index) if self.layer is None else (self.layer, *index)
        return np.asarray(jax.device_get(self.array[index]))


def model_tensors(model: Flux) -> dict[str, Source]:
    """BFL-keyed per-layer sources (PyTorch layout) of a model's base weights; LoRA adapters are not included."""
    from flax import nnx

    cfg = model.config
    flat = dict(nnx.state(model).flat_state())
    out: dict[str, Source] = {}
    for path, entry, suffix in flux_keys.flax_leaves(cfg):
        array = flat[path].get_value()
        if not array.is_fully_addressable:
            raise FluxJaxError(
                f"parameter {'/'.join(map(str, path))} spans several hosts; write PyTorch weights from one host "
                "(gather the model first or convert its Flax checkpoint with `flux-jax convert`)"
            )
        for i in flux_keys.layer_indices(cfg, entry):
            src: Source = _JaxLayer(array, i)
            out[f"{flux_keys.fill(entry.bfl, i)}.{suffix}"] = Transposed(src) if suffix == "weight" else src
    return out


def _config_and_tensors(source: FluxCheckpoint | Flux) -> tuple[FluxConfig, Mapping[str, Source]]:
    if isinstance(source, Flux):
        return source.config, model_tensors(source)
    return source.config, source.tensors


def _source_name(source: FluxCheckpoint | Flux) -> str:
    return "the model" if isinstance(source, Flux) else str(source.path)


def _target(src: Source, dtype) -> np.dtype:
    return np.dtype(src.dtype) if dtype is None else np.dtype(dtype)


def _producer(
    sources: Mapping[str, Source], targets: Mapping[str, np.dtype], finite_in: str | None
) -> Callable[[str], np.ndarray]:
    """Read, cast and (unless `finite_in` is None) check one tensor; `finite_in` names the source in errors."""

    def produce(key: str) -> np.ndarray:
        block = read_all(sources[key])
        # A kernel read back as a PyTorch weight is a transposed view: `cast` copies it in cache-sized tiles.
        if block.dtype != targets[key] or not block.flags.c_contiguous:
            block = cast(block, targets[key])
        if finite_in is not None:
            check_finite(block, key, finite_in, stored=sources[key].dtype)
        return block

    return produce


def _metadata(cfg: FluxConfig) -> dict[str, str]:
    # "format": "pt" is what torch's safetensors writer stores; transformers refuses files without a known format.
    return {"format": "pt", CONFIG_METADATA_KEY: config_metadata(cfg)}


def _refuse_existing(path: pathlib.Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists (use --force to overwrite)")


def write_flux_bfl(
    source: FluxCheckpoint | Flux,
    path: str | os.PathLike,
    *,
    dtype=None,
    force: bool = False,
    progress: Progress = None,
    allow_nonfinite: bool = False,
) -> pathlib.Path:
    """Write a BFL single file (`flux1-dev.safetensors` layout). dtype None keeps each tensor's stored dtype.

    A tensor holding NaN / Inf (after the cast) fails the write with `NonFiniteError` unless `allow_nonfinite`.
    """
    path = pathlib.Path(path)
    _refuse_existing(path, force)
    cfg, tensors = _config_and_tensors(source)
    shapes = flux_keys.bfl_shapes(cfg)
    targets = {key: _target(tensors[key], dtype) for key in shapes}
    specs = [(key, targets[key], shape) for key, shape in shapes.items()]
    produce = _producer(tensors, targets, None if allow_nonfinite else _source_name(source))
    write_safetensors(path, specs, produce, _metadata(cfg), progress=progress)
    return path


def diffusers_sources(cfg: FluxConfig, tensors: Mapping[str, Source]) -> dict[str, Source]:
    """diffusers-keyed sources cut lazily out of the BFL ones (q/k/v rows, final-layer half swap)."""
    out: dict[str, Source] = {}
    for piece in flux_keys.diffusers_pieces(cfg):
        src = tensors[piece.bfl_key]
        if piece.swap_halves:
            src = swap_halves(src)
        out[piece.key] = src if piece.length == src.shape[0] else RowSlice(src, piece.start, piece.length)
    return out


def _shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy packing in key-table order, like diffusers' `save_pretrained` (a tensor larger than the limit gets
    a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def write_flux_diffusers(
    source: FluxCheckpoint | Flux,
    directory: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: Progress = None,
    allow_nonfinite: bool = False,
) -> pathlib.Path:
    """Write a diffusers transformer directory: config.json, shards, and the index when there is more than one.

    Loadable with `FluxTransformer2DModel.from_pretrained(directory)`. dtype None keeps each stored dtype. A tensor
    holding NaN / Inf (after the cast) fails the write with `NonFiniteError` unless `allow_nonfinite`.
    """
    if max_shard_bytes <= 0:
        raise FluxJaxError(f"shard size must be positive, got {max_shard_bytes}")
    directory = pathlib.Path(directory)
    cfg, tensors = _config_and_tensors(source)
    sources = diffusers_sources(cfg, tensors)
    targets = {key: _target(src, dtype) for key, src in sources.items()}
    sizes = {key: math.prod(src.shape) * targets[key].itemsize for key, src in sources.items()}
    shards = _shards(sizes, max_bytes=max_shard_bytes)
    produce = _producer(sources, targets, None if allow_nonfinite else _source_name(source))
    with atomic_dir(directory, force=force) as tmp:
        weight_map = {}
        for k, keys in enumerate(shards, start=1):
            name = (
                DIFFUSERS_WEIGHTS
                if len(shards) == 1
                else f"diffusion_pytorch_model-{k:05d}-of-{len(shards):05d}.safetensors"
            )
            specs = [(key, targets[key], tuple(sources[key].shape)) for key in keys]
            write_safetensors(tmp / name, specs, produce, _metadata(cfg), progress=progress)
            weight_map.update(dict.fromkeys(keys, name))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg.to_diffusers(), indent=2) + "\n")
    return directory


def output_bytes(source: FluxCheckpoint, dtype=None) -> int:
    """Bytes of tensor data a conversion of `source` to `dtype` writes (for progress bars)."""
    return sum(math.prod(s.shape) * _target(s, dtype).itemsize for s in source.tensors.values())
