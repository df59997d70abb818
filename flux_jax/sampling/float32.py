"""Exact float32 operations numpy lacks, for reproducing torch's CPU kernels bit for bit on the host.

torch's wheels contract multiply-adds into FMA instructions (the ``randn`` polynomials, the ``linspace`` steps);
numpy has no fused multiply-add, and rounding ``a * b`` before adding ``c`` differs in the last bit often enough to
change the noise and the schedules. bfloat16 rounding is ml_dtypes' round-to-nearest-even, as torch's ``.to``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

_F32 = np.float32
_F64 = np.float64


def fma(a, b, c) -> np.ndarray:
    """``round_f32(a * b + c)`` with one rounding, elementwise over float32 inputs (broadcast).

    a * b is exact in float64 (24 + 24 bits <= 53). The float64 sum s = p + c is rounded; TwoSum recovers its error
    and, when it is not zero, s moves to its odd neighbour on the error's side (round-to-odd). Rounding that to
    float32 gives the correctly rounded result, because float64 keeps more than 24 + 1 bits beyond it."""
    p = np.asarray(a, _F32).astype(_F64) * np.asarray(b, _F32).astype(_F64)
    c = np.asarray(c, _F32).astype(_F64)
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(_F32)


def bf16_round(x) -> np.ndarray:
    """float32 -> nearest-even bfloat16, returned as float32 (torch's ``.to(torch.bfloat16)``)."""
    return np.asarray(x, _F32).astype(ml_dtypes.bfloat16).astype(_F32)
