"""flux_jax.lora_io.combine: several LoRAs at their scales as one LoRA whose delta is exactly the sum of theirs."""

from __future__ import annotations

import numpy as np
import pytest

from flux_jax.lora_io.combine import combine_loras
from flux_jax.lora_io.weights import LoraWeights, validate
from tests.helpers.lora_modules import CFG, MODULES, lora, weight_shape


def other_lora(seed: int) -> dict[str, LoraWeights]:
    """Rank 3, alpha 1.5, on two of MODULES and one module the first LoRA does not cover."""
    rng = np.random.default_rng(seed)
    out = {}
    for path in (MODULES[0], MODULES[2], "double_blocks.1.img_attn.proj"):
        rows, cols = weight_shape(path)
        out[path] = LoraWeights(rng.standard_normal((3, cols)), rng.standard_normal((rows, 3)), 1.5)
    return out


def assert_delta(combined: LoraWeights, expected: np.ndarray) -> None:
    np.testing.assert_allclose(combined.delta(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_combined_delta_is_the_sum_of_the_scaled_deltas():
    a, b = lora(alpha=8.0, seed=1), other_lora(seed=2)  # rank 4 alpha 8; rank 3 alpha 1.5
    combined = combine_loras([(a, 0.75), (b, -0.5)])
    assert set(combined) == set(a) | set(b)
    validate(combined, CFG, "combined")  # still a LoRA of the tiny model
    for path, w in combined.items():
        expected = sum(scale * lora[path].delta() for lora, scale in ((a, 0.75), (b, -0.5)) if path in lora)
        assert_delta(w, expected)
        assert w.scale == 1.0  # alpha = rank: every factor is folded into up
    shared = combined[MODULES[0]]
    assert shared.rank == 4 + 3  # concatenated along the rank, nothing truncated
    np.testing.assert_array_equal(shared.down, np.concatenate([a[MODULES[0]].down, b[MODULES[0]].down]))


def test_one_lora_keeps_its_delta_and_scale_zero_drops_it():
    a = lora(alpha=2.0, seed=3)
    alone = combine_loras([(a, 1.0)])
    for path, w in a.items():
        assert alone[path].rank == w.rank
        assert_delta(alone[path], w.delta())
    assert combine_loras([(a, 0.0)]) == {}
    with_zero = combine_loras([(a, 0.0), (other_lora(4), 2.0)])
    assert set(with_zero) == set(other_lora(4))
    assert combine_loras([]) == {}


def test_same_lora_twice_is_the_lora_at_the_summed_scale():
    a = lora(alpha=4.0, seed=5)
    twice = combine_loras([(a, 0.25), (a, 0.5)])
    for path, w in a.items():
        assert_delta(twice[path], 0.75 * w.delta())


def test_bad_scale_and_mismatched_shapes_are_refused():
    a = lora(alpha=1.0)
    with pytest.raises(ValueError, match="scale must be finite, got nan"):
        combine_loras([(a, float("nan"))])
    rows, cols = weight_shape(MODULES[0])
    wrong = {MODULES[0]: LoraWeights(np.ones((2, cols + 1)), np.ones((rows, 2)), 2.0)}
    with pytest.raises(ValueError, match=f"LoRA module {MODULES[0]}: the LoRAs disagree on its shape"):
        combine_loras([(a, 1.0), (wrong, 1.0)])
