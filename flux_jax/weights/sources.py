"""Lazy tensors: read any slice of a checkpoint tensor without materialising the whole tensor.

A loader asks each device for its shard (`jax.make_array_from_callback` hands over an index); the key table
composes these sources so that the request becomes a slice of a memory-mapped file: a transpose swaps the index,
a row concatenation (diffusers q/k/v -> BFL fused qkv) reads only the parts the rows fall in, a layer stack reads
only the requested layers. Peak host memory stays near the size of one device shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

Index = tuple[slice, ...]


def normalize_index(index: Sequence[slice | int] | None, shape: Sequence[int]) -> Index:
    """Turn a (possibly partial, None-bounded) index into one explicit step-1 slice per dimension."""
    index = tuple(index or ())
    out = []
    for dim, size in enumerate(shape):
        s = index[dim] if dim < len(index) else slice(None)
        if isinstance(s, int | np.integer):
            s = slice(int(s), int(s) + 1)
        start, stop, step = s.indices(size)
        if step != 1:
            raise ValueError(f"strided reads are not supported (index {index})")
        out.append(slice(start, stop))
    return tuple(out)


class Source(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: Index) -> np.ndarray:
        """Return the block at `index` (one explicit slice per dim) as a NumPy array."""
        ...


class ArraySource:
    """An in-memory or memory-mapped array."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def read(self, index: Index) -> np.ndarray:
        return np.asarray(self.array[index])


class Transposed:
    """PyTorch Linear weight [out, in] seen as a JAX kernel [in, out]; 1-D tensors pass through."""

    def __init__(self, src: Source):
        self.src = src
        self.shape = tuple(reversed(src.shape))
        self.dtype = src.dtype

    def read(self, index: Index) -> np.ndarray:
        return self.src.read(tuple(reversed(index))).T


class RowConcat:
    """Concatenation along dim 0 of parts with equal trailing shape; reads touch only the overlapping parts."""

    def __init__(self, parts: Sequence[Source]):
        trailing = {tuple(p.shape[1:]) for p in parts}
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(trailing) != 1 or len(dtypes) != 1:
            raise ValueError(f"cannot concatenate parts of shapes {[p.shape for p in parts]} / dtypes {dtypes}")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.offsets[-1]), *trailing.pop())
        self.dtype = dtypes.pop()

    def read(self, index: Index) -> np.ndarray:
        rows, rest = index[0], index[1:]
        chunks = []
        for part, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:], strict=True):
            a, b = max(rows.start, lo), min(rows.stop, hi)
            if a < b:
                chunks.append(part.read((slice(a - lo, b - lo), *rest)))
        if len(chunks) == 1:
            return chunks[0]
        return np.concatenate(chunks, axis=0)


class RowSlice:
    """Rows [start, start + length) of a source (diffusers to_q out of a BFL fused qkv)."""

    def __init__(self, src: Source, start: int, length: int):
        self.src, self.start = src, start
        self.shape = (length, *src.shape[1:])
        self.dtype = src.dtype

    def read(self, index: Index) -> np.ndarray:
        rows = index[0]
        return self.src.read((slice(rows.start + self.start, rows.stop + self.start), *index[1:]))


def swap_halves(src: Source) -> Source:
    """[a; b] -> [b; a] along dim 0: BFL final-layer (shift, scale) <-> diffusers (scale, shift). Self-inverse."""
    half = src.shape[0] // 2
    return RowConcat([RowSlice(src, half, src.shape[0] - half), RowSlice(src, 0, half)])


class Stacked:
    """Per-layer sources stacked along a new leading "layers" axis (the scanned blocks)."""

    def __init__(self, layers: Sequence[Source]):
        shapes = {tuple(s.shape) for s in layers}
        if len(shapes) != 1:
            raise ValueError(f"stacked layers differ in shape: {sorted(shapes)}")
        self.layers = list(layers)
        self.shape = (len(layers), *shapes.pop())
        self.dtype = np.result_type(*[np.dtype(s.dtype) for s in layers])

    def read(self, index: Index) -> np.ndarray:
        first, rest = index[0], index[1:]
        return np.stack(
            [self.layers[i].read(rest).astype(self.dtype, copy=False) for i in range(first.start, first.stop)]
        )


class Mapped:
    """Element-wise transform of a source (dequantisation, dtype casts)."""

    def __init__(self, src: Source, fn: Callable[[np.ndarray], np.ndarray], dtype):
        self.src, self.fn = src, fn
        self.shape = src.shape
        self.dtype = np.dtype(dtype)

    def read(self, index: Index) -> np.ndarray:
        return self.fn(self.src.read(index))


def read_all(src: Source) -> np.ndarray:
    return src.read(normalize_index(None, src.shape))
