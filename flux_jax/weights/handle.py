"""The handle of an opened base checkpoint, whatever its layout: `FluxCheckpoint`, and the pieces every reader shares.

`flux_jax.weights.checkpoint.open_checkpoint` returns one for any layout (BFL / diffusers safetensors, or a Flax
checkpoint): its config and one lazy source per BFL tensor key. Loading, converting, merging and planning all take
this one type.

Tensor data of safetensors files is read through `FileTensor`: a slice is copied out of a read-only memory map and
the map's pages are handed back to the kernel right away (`madvise(MADV_DONTNEED)`), so reading a 24 GB checkpoint
does not leave 24 GB of file pages counted in the process's resident set; the page cache still serves repeated
reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator, Mapping
from typing import Literal, Protocol

import numpy as np

from flux_jax.errors import CheckpointError
from flux_jax.model.config import FluxConfig
from flux_jax.weights.safetensors_file import SafetensorsFile, TensorInfo
from flux_jax.weights.sources import Index, Source

Layout = Literal["bfl", "diffusers", "flax"]


class _Closeable(Protocol):
    def close(self) -> None: ...


@dataclasses.dataclass
class FluxCheckpoint:
    """A validated checkpoint: its config and one lazy source per BFL tensor key (PyTorch layout, per layer).

    stored_dtype: the dtype holding most of the bytes (what "keep the dtype" means for a conversion).
    scaled_layers: layers whose scaled-fp8 weights are dequantised on read (empty for everything else).
    """

    path: pathlib.Path
    layout: Layout
    config: FluxConfig
    tensors: dict[str, Source]
    files: list[_Closeable]
    stored_dtype: np.dtype | None = None
    scaled_layers: tuple[str, ...] = ()
    # Flax checkpoints only: one source per Flax leaf (already stacked / transposed), keyed by its state path.
    flax_leaves: dict[tuple, Source] | None = None

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> FluxCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileTensor:
    """A tensor of a safetensors file whose reads are copies, with the touched pages released after each read."""

    def __init__(self, file: SafetensorsFile, info: TensorInfo):
        self.file, self.info = file, info
        self.shape = tuple(info.shape)
        self.dtype = info.dtype

    @contextlib.contextmanager
    def borrow(self) -> Iterator[np.ndarray]:
        """Zero-copy read-only view of the whole tensor, valid inside the block; its pages are released after.

        For converters that cast straight out of the map (one copy fewer than `read`); the view must not escape.
        """
        view = self.file.array(self.info.name)
        try:
            yield view
        finally:
            del view
            self.file.release(self.info.start, self.info.end)

    def read(self, index: Index) -> np.ndarray:
        info = self.info
        view = self.file.array(info.name)
        out = np.array(view[index], copy=True)
        del view
        if self.shape and self.shape[0]:
            row = info.nbytes // self.shape[0]
            self.file.release(info.start + index[0].start * row, info.start + index[0].stop * row)
        else:
            self.file.release(info.start, info.end)
        return out


def short(items, limit: int = 20) -> str:
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def validate_keys(where: str, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise one CheckpointError listing every missing, unexpected and wrongly shaped tensor."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {short(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {short(wrong)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
