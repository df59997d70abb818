"""The NaN / Inf check the checkpoint writers run on every block: exact for every bit pattern of the small floats."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from flux_jax.weights.finite import NonFiniteError, all_finite, check_finite

SMALL = [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


@pytest.mark.parametrize("dtype", SMALL, ids=lambda d: np.dtype(d).name)
def test_every_bit_pattern_agrees_with_isfinite(dtype):
    dtype = np.dtype(dtype)
    values = np.arange(2 ** (8 * dtype.itemsize), dtype=np.uint32).astype(f"u{dtype.itemsize}").view(dtype)
    expected = np.isfinite(values)
    assert not expected.all()  # each of these formats has NaN patterns
    assert [all_finite(values[i : i + 1]) for i in range(values.size)] == expected.tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, *SMALL], ids=lambda d: np.dtype(d).name)
def test_one_bad_value_anywhere_in_a_large_block(dtype):
    block = np.linspace(-3, 3, 300_001, dtype=np.float32).astype(dtype).reshape(-1, 1)  # more than one piece
    assert all_finite(block) and all_finite(block.T)
    for where in (0, 65_535, 65_536, 300_000):
        broken = block.copy()
        broken[where] = np.nan
        assert not all_finite(broken) and not all_finite(broken.T), where


def test_integers_and_empty_blocks_are_finite():
    assert all_finite(np.arange(10)) and all_finite(np.zeros((0, 4), np.float32))
    assert all_finite(np.array([True, False]))


def test_the_error_names_the_tensor_and_counts():
    block = np.array([1.0, np.nan, np.inf, -np.inf], np.float16)
    with pytest.raises(NonFiniteError) as info:
        check_finite(block, "img_in.weight", "base.safetensors", stored=np.float32)
    assert str(info.value).startswith("base.safetensors: tensor img_in.weight as float16 holds non-finite values ")
    assert "(1 NaN, 2 Inf of 4)" in str(info.value) and "--allow-nonfinite" in str(info.value)
