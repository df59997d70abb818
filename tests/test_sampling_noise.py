"""The numpy noise against torch's CPU ``randn`` bit for bit: float32 and bfloat16, every code path.

The block path reproduces torch's AVX2 kernel (which AVX512 CPUs run too); on a CPU where torch falls back to its
scalar kernel the two differ by design, so those comparisons skip with that reason. The double path (< 16
elements) is ISA-independent and always runs.
"""

from __future__ import annotations

import time
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from flux_jax.sampling import noise
from flux_jax.sampling.float32 import fma

# torch registers no AVX512 normal kernel (REGISTER_NO_AVX512_DISPATCH): AVX512 CPUs run the AVX2 one.
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
needs_avx2 = pytest.mark.skipif(
    CPU_CAPABILITY not in ("AVX2", "AVX512"),
    reason=f"torch runs its scalar normal kernel on this CPU ({CPU_CAPABILITY}); the numpy noise matches AVX2",
)

SEEDS = (0, 42, 2**32 + 7, 2**63 - 1, -1, -(2**40) - 3)
BLOCK_SHAPES = (
    (1, 16, 128, 128),  # 1024 px latents
    (2, 16, 64, 96),  # a batch, non-square
    (1, 16, 3, 5),  # odd latent sides (240 elements, still whole blocks)
    (3, 5, 7, 11),  # 1155 = 72 blocks + 3: the tail block is recomputed from fresh draws
    (16,),
    (17,),
    (31,),
    (33,),
)
SMALL_SHAPES = ((0,), (1,), (2,), (5,), (15,), (3, 5))


def torch_f32(shape, seed: int) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).numpy()


def torch_bf16_bits(shape, seed: int) -> np.ndarray:
    draw = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.bfloat16)
    return draw.view(torch.int16).numpy().view(np.uint16)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """The bf16 bit patterns of float32 values that must be bf16-representable (checked: no rounding here)."""
    as_bf16 = values.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(as_bf16.astype(np.float32).view(np.uint32), values.view(np.uint32))
    return as_bf16.view(np.uint16)


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    mismatches = int((got.view(np.uint32) != want.view(np.uint32)).sum())
    assert mismatches == 0, f"{mismatches} of {want.size} values differ (max {np.abs(got - want).max()})"


@needs_avx2
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=str)
def test_float32_equals_torch_randn(shape) -> None:
    for seed in SEEDS:
        assert_same_bits(noise.torch_randn(shape, seed), torch_f32(shape, seed))


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_fewer_than_16_elements_equal_torch_double_path(shape) -> None:
    for seed in SEEDS:
        assert_same_bits(noise.torch_randn(shape, seed), torch_f32(shape, seed))


@needs_avx2
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=str)
def test_bfloat16_equals_torch_bf16_randn(shape) -> None:
    for seed in SEEDS:
        got = noise.torch_randn_bf16(shape, seed)
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_array_equal(bf16_bits(got), torch_bf16_bits(shape, seed))


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_bfloat16_fewer_than_16_elements(shape) -> None:
    for seed in SEEDS:
        np.testing.assert_array_equal(bf16_bits(noise.torch_randn_bf16(shape, seed)), torch_bf16_bits(shape, seed))


@needs_avx2
def test_bfloat16_of_whole_blocks_is_the_rounded_float32_draw() -> None:
    # What makes BFL's and diffusers' bf16 noise the same as ComfyUI's float32 noise, rounded (torch 2.13).
    f32 = noise.torch_randn((1, 16, 8, 8), 7)
    np.testing.assert_array_equal(
        noise.torch_randn_bf16((1, 16, 8, 8), 7), f32.astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_seeds_reduce_as_torch_does() -> None:
    # torch keeps a seed mod 2**64 (-1 is 2**64 - 1) and seeds mt19937 with its low 32 bits.
    assert torch.Generator("cpu").manual_seed(-1).initial_seed() == 2**64 - 1
    shape = (2, 16, 4, 4)
    assert_same_bits(noise.torch_randn(shape, -1), noise.torch_randn(shape, 2**64 - 1))
    assert_same_bits(noise.torch_randn(shape, 2**32 + 7), noise.torch_randn(shape, 7))
    assert_same_bits(noise.torch_randn(shape, -1), torch_f32(shape, -1))
    assert not np.array_equal(noise.torch_randn(shape, 0), noise.torch_randn(shape, 1))
    with pytest.raises(TypeError):
        noise.torch_randn(shape, 1.5)


def test_full_size_draw_is_fast() -> None:
    start = time.process_time()
    out = noise.torch_randn((1, 16, 128, 128), 1234)
    elapsed = time.process_time() - start
    assert out.shape == (1, 16, 128, 128)
    assert elapsed < 1.0, f"a 1x16x128x128 draw took {elapsed:.2f} s of CPU time"


@needs_avx2
@pytest.mark.parametrize(
    ("match", "dtype", "torch_dtype"),
    [
        ("diffusers", "fp32", torch.float32),  # the pipeline's dtype
        ("diffusers", "bf16", torch.bfloat16),
        ("bfl", "fp32", torch.bfloat16),  # BFL's CLI always passes bfloat16
        ("bfl", "bf16", torch.bfloat16),
        ("comfyui", "fp32", torch.float32),  # EmptySD3LatentImage is float32
        ("comfyui", "bf16", torch.float32),
    ],
)
def test_initial_noise_draws_in_each_tools_dtype(match, dtype, torch_dtype) -> None:
    shape, seed = (2, 16, 6, 10), 2**32 + 5
    got = noise.initial_noise(match, shape, seed, dtype)
    want = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch_dtype).float().numpy()
    assert_same_bits(got, want)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown match 'a1111'"):
        noise.initial_noise("a1111", (1, 16, 2, 2), 0, "fp32")
    with pytest.raises(ValueError, match="unknown sampling dtype 'fp8'"):
        noise.initial_noise("diffusers", (1, 16, 2, 2), 0, "fp8")
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        noise.initial_noise("diffusers", (16, 2, 2), 0, "fp32")
    with pytest.raises(ValueError, match="negative dimension"):
        noise.torch_randn((1, -16), 0)


def correctly_rounded(exact: Fraction, r: np.float32) -> bool:
    """Whether float32 ``r`` is ``exact`` rounded to nearest, ties to even (checked against both neighbours)."""
    err = abs(Fraction(float(r)) - exact)
    for n in (np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))):
        other = abs(Fraction(float(n)) - exact)
        if other < err or (other == err and int(np.array(r).view(np.uint32)) & 1):
            return False
    return True


def test_fma_is_the_correctly_rounded_float32_multiply_add() -> None:
    # The noise and linspace emulation rest on this. Three groups of (a, b, c):
    f32 = np.float32
    rng = np.random.default_rng(0)
    ra = rng.standard_normal(3000).astype(f32) * f32(4)
    rb = rng.standard_normal(3000).astype(f32)
    jitter = f32(1) + rng.standard_normal(1000).astype(f32) * f32(1e-6)
    # random c; c = -round(a * b) (massive cancellation); c ~ -a * b (the float64 sum is inexact: round-to-odd).
    rc = np.concatenate(
        [rng.standard_normal(1000).astype(f32), -(ra[1000:2000] * rb[1000:2000]), -(ra[2000:] * rb[2000:]) * jitter]
    )
    random_ops = (ra, rb, rc)
    # Exact ties: products of 1 + i 2**-12 fall halfway between float32 values (ties-to-even).
    ks = f32(1) + np.arange(1, 40, dtype=f32) * f32(2.0**-12)
    tie_ops = (np.repeat(ks, ks.size), np.tile(ks, ks.size), np.zeros(ks.size**2, f32))
    # Double-rounding traps: a * b = 2**-24 -/+ 2**-60 puts a * b + c a hair off a float32 midpoint; the float64
    # sum lands on the midpoint, so rounding it to float32 would tie the wrong way.
    odd = np.tile(f32(1) + np.arange(1, 201, dtype=f32) * f32(2.0**-23), 2)
    scale = f32(2.0) ** rng.integers(-20, 20, odd.size).astype(f32)
    eps = np.repeat(np.array([2.0**-18, -(2.0**-18)], f32), odd.size // 2)
    trap_ops = (f32(2.0**-24) * (1 + eps) * scale, 1 - eps, odd * scale)
    groups = {"random": random_ops, "ties": tie_ops, "double rounding": trap_ops}
    for name, (a, b, c) in groups.items():
        got = fma(a, b, c)
        exact = [Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)) for x, y, z in zip(a, b, c, strict=True)]
        bad = [i for i in range(a.size) if not correctly_rounded(exact[i], got[i])]
        assert not bad, f"{name}: {len(bad)} of {a.size} inexact, first {a[bad[0]]!r} * {b[bad[0]]!r} + {c[bad[0]]!r}"
    # The groups do what they say: the ties are ties, and a float64 multiply-add rounded to float32 fails the traps.
    a, b, c = tie_ops
    got = fma(a, b, c)
    assert (np.abs(a.astype(np.float64) * b - got) == np.spacing(got).astype(np.float64) / 2).sum() > 100
    a, b, c = trap_ops
    assert (fma(a, b, c) != (a.astype(np.float64) * b + c).astype(f32)).sum() > 100
