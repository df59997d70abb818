"""torch's CPU ``randn`` in numpy, bit for bit: the initial noise diffusers, ComfyUI and BFL draw for a seed.

All three tools draw the starting latents with ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(S))``
(then move them to the GPU), so the noise for a seed is a property of torch's CPU kernel, not of the accelerator.
This module re-implements that kernel (torch 2.13, ``aten/src/ATen/native/cpu/DistributionTemplates.h``):

- the generator is mt19937 seeded with the low 32 bits of the seed (``CPUGeneratorImpl``), the legacy numpy
  ``RandomState`` seeding;
- a float32 tensor of 16 or more elements is filled with uniforms ``(random() & 0xFFFFFF) * 2**-24`` and turned into
  normals 16 at a time by Box-Muller (element j pairs with j + 8), using the AVX2 kernel's Cephes ``log``/``sincos``
  polynomials (``avx_mathfun.h``) with the fused multiply-adds the shipped wheel's compiler emitted. A size that is
  not a multiple of 16 recomputes its last 16 values from 16 fresh draws;
- fewer than 16 elements go through ``normal_distribution<double>`` instead (53-bit uniforms, libm in double);
- bfloat16 (torch 2.13) runs the same float32 blocks and rounds each to bf16, but draws its tail block right after
  the whole blocks instead of after all ``n`` uniforms.

The float32 results equal torch's wherever torch runs its AVX2 kernel (every x86-64 CPU with AVX2; AVX512 CPUs use
the AVX2 kernel too). torch's scalar fallback (no AVX2, or non-x86) gives slightly different noise (about 38% of
values differ by up to ~2e-6), so there the tools themselves do not agree with an AVX2 machine.

Everything is numpy on the host: XLA is free to reorder or contract float operations, which would break exactness.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

from flux_jax.sampling.float32 import bf16_round, fma
from flux_jax.sampling.schedules import MATCHES, Match

_F32 = np.float32
_F64 = np.float64
# Box-Muller works on blocks of 16 uniforms: 8 radii and 8 angles.
_BLOCK = 16
_HALF = _BLOCK // 2
NOISE_DTYPES: tuple[str, ...] = ("fp32", "bf16")


def _seed32(seed: int) -> int:
    """The 32-bit mt19937 seed torch uses for ``seed``: ``manual_seed`` keeps it mod 2**64 (so -1 is 2**64 - 1),
    and ``mt19937`` is initialised from its low 32 bits (so ``seed`` and ``seed + 2**32`` give the same stream).

    torch itself rejects seeds outside [-2**63, 2**64); here any integer is reduced the same way."""
    return operator.index(seed) % 2**64 & 0xFFFFFFFF


def _mt19937_u32(seed: int, count: int) -> np.ndarray:
    """The first ``count`` 32-bit outputs of torch's ``at::mt19937`` for ``seed``.

    torch's ``init_with_uint32`` is the reference ``init_genrand``, which is also how numpy's legacy ``RandomState``
    seeds from an integer; a full-range uint32 ``randint`` returns one raw output per value, in order, and
    ``RandomState``'s stream is frozen by numpy's compatibility policy."""
    rng = np.random.RandomState(_seed32(seed))
    return rng.randint(0, 2**32, size=count, dtype=np.uint32)


# Cephes logf coefficients (avx_mathfun.h log256_ps), highest power first.
_LOG_P = tuple(
    _F32(v)
    for v in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
)
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_SQRTHF = _F32(0.707106781186547524)
_MIN_NORM_POS = np.array(0x00800000, np.int32).view(_F32)


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """float32 natural log as ``avx_mathfun.h::log256_ps`` computes it for x > 0, with the wheel's FMA contractions
    (the polynomial's multiply-add pairs and the final ``e * ln2_hi + (x + y)``)."""
    x = np.maximum(x, _MIN_NORM_POS)
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(_F32) + _F32(1)
    # Mantissa in [0.5, 1).
    x = ((bits & ~0x7F800000) | np.array(_F32(0.5)).view(np.int32)).view(_F32)
    small = x < _SQRTHF
    e = e - np.where(small, _F32(1), _F32(0))
    x = (x - _F32(1)) + np.where(small, x, _F32(0))
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for coef in _LOG_P[1:]:
        y = fma(y, x, coef)
    y = fma(y * x, z, e * _LOG_Q1)
    y = fma(-z, _F32(0.5), y)
    return fma(e, _LOG_Q2, x + y)


_FOPI = _F32(1.27323954473516)  # 4 / pi
_DP = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))
_COS_P = (_F32(2.443315711809948e-5), _F32(-1.388731625493765e-3), _F32(4.166664568298827e-2))
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))


def _sincos256_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (sin x, cos x) as ``avx_mathfun.h::sincos256_ps`` computes them for x >= 0 (Box-Muller angles are
    in [0, 2 pi)), with the wheel's FMA contractions: Cody-Waite reduction by pi/4 in three parts, then the Cephes
    sine and cosine polynomials, picked and signed by the octant."""
    j = ((x * _FOPI).astype(np.int32) + 1) & ~1
    y = j.astype(_F32)
    for dp in _DP:
        x = fma(y, dp, x)
    z = x * x
    c = fma(fma(np.full_like(z, _COS_P[0]), z, _COS_P[1]), z, _COS_P[2])
    c = fma(c * z, z, -(z * _F32(0.5))) + _F32(1)
    s = fma(fma(np.full_like(z, _SIN_P[0]), z, _SIN_P[1]), z, _SIN_P[2])
    s = fma(s * z, x, x)
    use_sin_poly = (j & 2) == 0
    sin = np.where(use_sin_poly, s, c)
    cos = np.where(use_sin_poly, c, s)
    return np.where((j & 4) != 0, -sin, sin), np.where((~(j - 2) & 4) != 0, -cos, cos)


_TWO_PI_F32 = _F32(2 * math.pi)


def _box_muller_blocks(u: np.ndarray) -> np.ndarray:
    """[k, 16] float32 uniforms -> [k, 16] normals, as ``normal_fill_16_AVX2``: element j (< 8) is r cos(theta)
    and element j + 8 is r sin(theta), with r = sqrt(-2 log(1 - u[j])) and theta = 2 pi u[j + 8]."""
    r = np.sqrt(_F32(-2) * _log256_ps(_F32(1) - u[:, :_HALF]))
    sin, cos = _sincos256_ps(_TWO_PI_F32 * u[:, _HALF:])
    # The kernel ends with fmadd(n, std=1, mean=0), which is n + 0: it turns -0 into +0.
    return np.concatenate([r * cos, r * sin], axis=1) + _F32(0)


def _uniforms_f32(raw: np.ndarray) -> np.ndarray:
    """``uniform_real_distribution<float>(0, 1)``: the low 24 bits of each 32-bit draw, times 2**-24 (exact)."""
    return (raw & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)


def _normal_double(seed: int, count: int) -> np.ndarray:
    """float32 normals from ``at::normal_distribution<double>`` (what torch uses below 16 elements).

    Each pair takes two 53-bit uniforms from ``random64()`` (two 32-bit draws, the first one high): u1 gives the
    angle and u2 the radius; the first element is r cos(theta), the second the cached r sin(theta). Python's
    ``math`` calls the same libm as torch does here."""
    pairs = (count + 1) // 2
    raw = _mt19937_u32(seed, 4 * pairs).astype(np.uint64).reshape(-1, 2)
    r64 = (raw[:, 0] << np.uint64(32)) | raw[:, 1]
    u = ((r64 & np.uint64(2**53 - 1)).astype(_F64) * 2.0**-53).tolist()
    out = []
    for u1, u2 in zip(u[0::2], u[1::2], strict=True):
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        out += [radius * math.cos(theta), radius * math.sin(theta)]
    return np.asarray(out[:count], _F64).astype(_F32)


def _numel(shape: Sequence[int]) -> int:
    dims = [operator.index(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"noise shape {tuple(dims)} has a negative dimension")
    return math.prod(dims)


def torch_randn(shape: Sequence[int], seed: int) -> np.ndarray:
    """float32, equal to ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` (AVX2 kernel)."""
    n = _numel(shape)
    shape = tuple(shape)
    if n < _BLOCK:
        return _normal_double(seed, n).reshape(shape)
    blocks, tail = divmod(n, _BLOCK)
    # All n uniforms are drawn first; a ragged size then draws 16 more to recompute its last 16 values.
    u = _uniforms_f32(_mt19937_u32(seed, n + (_BLOCK if tail else 0)))
    out = np.empty(n, _F32)
    out[: blocks * _BLOCK] = _box_muller_blocks(u[: blocks * _BLOCK].reshape(blocks, _BLOCK)).ravel()
    if tail:
        out[n - _BLOCK :] = _box_muller_blocks(u[n:].reshape(1, _BLOCK)).ravel()
    return out.reshape(shape)


def torch_randn_bf16(shape: Sequence[int], seed: int) -> np.ndarray:
    """float32 holding bfloat16 values, equal to ``torch.randn(shape, dtype=torch.bfloat16, generator=...)``.

    torch 2.13 semantics: float32 Box-Muller blocks rounded to nearest-even bf16 (so for a multiple of 16 elements,
    every Flux latent, this is ``torch_randn`` rounded), with the ragged tail drawn right after the whole blocks.
    Older torch builds (2.6, 2.7) computed bf16 noise in bf16 arithmetic and give unrelated values."""
    n = _numel(shape)
    shape = tuple(shape)
    if n < _BLOCK:
        values = _normal_double(seed, n)
    else:
        blocks, tail = divmod(n, _BLOCK)
        u = _uniforms_f32(_mt19937_u32(seed, _BLOCK * (blocks + (1 if tail else 0))))
        values = np.empty(n, _F32)
        values[: blocks * _BLOCK] = _box_muller_blocks(u[: blocks * _BLOCK].reshape(blocks, _BLOCK)).ravel()
        if tail:
            values[n - _BLOCK :] = _box_muller_blocks(u[blocks * _BLOCK :].reshape(1, _BLOCK)).ravel()
    return bf16_round(values).reshape(shape)


def initial_noise(match: Match, shape: Sequence[int], seed: int, dtype: str) -> np.ndarray:
    """float32 [B, C, h, w] (torch's NCHW): the noise ``match``'s tool starts from for ``seed`` with activations in
    ``dtype``: diffusers draws in the pipeline dtype, BFL always bf16, ComfyUI float32.

    diffusers' ``prepare_latents`` draws in ``prompt_embeds.dtype`` (the pipeline's dtype); BFL's CLI passes
    ``torch.bfloat16`` to ``get_noise`` whatever it computes in; ComfyUI draws the shape of its float32 empty latent.
    """
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; choose one of {', '.join(MATCHES)}")
    if dtype not in NOISE_DTYPES:
        raise ValueError(f"unknown sampling dtype {dtype!r}; choose one of {', '.join(NOISE_DTYPES)}")
    if len(shape) != 4:
        raise ValueError(f"initial noise is [B, C, h, w]; got shape {tuple(shape)}")
    if match == "bfl" or (match == "diffusers" and dtype == "bf16"):
        return torch_randn_bf16(shape, seed)
    return torch_randn(shape, seed)
