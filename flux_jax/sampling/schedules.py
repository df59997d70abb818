"""Sigma schedules and model timesteps of BFL, diffusers and ComfyUI (``match``), in numpy float32.

The three tools agree in exact arithmetic on FLUX.1's schedule, ``linspace(1, 0, steps + 1)`` shifted by
``e^mu / (e^mu + 1/t - 1)`` with ``mu`` linear in the packed token count, except ComfyUI, which rounds it onto a
10,000-entry sigma table. Each is reproduced here in its own float32 arithmetic, so the sigmas equal the tool's bit
for bit (the sources and the verification are in ``shared/reference/sampling_reference.md``):

- ``bfl`` (black-forest-labs/flux ``sampling.py::get_schedule``): torch's float32 ``linspace`` kernel, which counts
  from the start for the first half and back from the end for the second, with the step FMA-contracted; then
  ``time_shift`` in torch float32, where ``scalar / tensor`` is ``tensor.reciprocal() * scalar``.
- ``diffusers`` (``FluxPipeline`` + ``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting``): a float64
  ``np.linspace(1, 1/N, N)`` cast to float32, the shift in numpy float32 true division, then an appended 0.
  Schnell's scheduler config has no dynamic shifting and ``shift=1.0``: the unshifted linspace.
- ``comfyui`` (``comfy/model_sampling.py::ModelSamplingFlux`` and ``comfy/samplers.py::simple_scheduler``): a
  table ``flux_time_shift(shift, 1, i / 10000)`` for i = 1..10000 and the "simple" scheduler, which picks entry
  ``-(1 + int(x * 10000 / N))`` for step x. A plain checkpoint loader leaves ``shift`` at 1.15 at every resolution
  (``supported_models.Flux`` sets no sampling shift), so that is the default here; a workflow with the
  ``ModelSamplingFlux`` node patches it to the resolution's mu (pass ``comfy_shift=flux_mu(image_tokens)``).
  Schnell is ``ModelSamplingDiscreteFlow(shift=1, multiplier=1)``: a 1000-entry table sigma_i = i / 1000.
  Because 10000 / N is not an integer for most N, ComfyUI's sigmas differ from the others' (28 steps at 1024 px:
  up to 2.3e-4), while at 20 steps they agree bit for bit with BFL's.

``model_timesteps`` then gives the ``t`` our ``Flux`` model needs so that the value it embeds (``1000 * t`` in
float32) is the value the tool's model embeds, including the tool's bf16 rounding of the timestep.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from flux_jax.flow import BASE_SEQ_LEN, BASE_SHIFT, MAX_SEQ_LEN, MAX_SHIFT
from flux_jax.sampling.float32 import bf16_round, fma

Match = Literal["diffusers", "comfyui", "bfl"]
MATCHES: tuple[str, ...] = ("diffusers", "comfyui", "bfl")
TIMESTEP_DTYPES: tuple[str, ...] = ("fp32", "bf16")

# ComfyUI's ModelSamplingFlux: 10,000 table entries and shift (its mu) 1.15 unless a node patches it.
COMFY_FLUX_TABLE = 10_000
COMFY_FLUX_SHIFT = 1.15
# ComfyUI's FluxSchnell: ModelSamplingDiscreteFlow's default 1000 entries, shift 1 (no shift), multiplier 1.
COMFY_SCHNELL_TABLE = 1000
# Every tool's model multiplies t by 1000 before the sinusoidal embedding (BFL's time_factor).
TIME_FACTOR = 1000.0

_F32 = np.float32
_F64 = np.float64


def flux_mu(image_tokens: int) -> float:
    """mu of the resolution-dependent shift: linear in the packed token count, 0.5 at 256 and 1.15 at 4096.

    Python float arithmetic in the tools' order (BFL ``get_lin_function``, diffusers ``calculate_shift``, ComfyUI's
    ``ModelSamplingFlux`` node all compute ``m * L + b`` with these ``m`` and ``b``)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    b = BASE_SHIFT - m * BASE_SEQ_LEN
    return m * image_tokens + b


def torch_linspace_f32(start: float, end: float, count: int) -> np.ndarray:
    """``torch.linspace(start, end, count)`` (float32, CPU) bit for bit.

    ``linspace_kernel`` computes ``start + step * i`` for the first ``count // 2`` entries and
    ``end - step * (count - 1 - i)`` for the rest, with a float32 step; the wheel contracts both into FMAs."""
    start32, end32 = _F32(start), _F32(end)
    if count == 1:
        return np.array([start32], _F32)
    step = _F32((end32 - start32) / _F32(count - 1))
    i = np.arange(count)
    head = fma(np.full(count, step), i.astype(_F32), start32)
    tail = fma(np.full(count, -step), (count - 1 - i).astype(_F32), end32)
    return np.where(i < count // 2, head, tail)


def torch_time_shift(mu: float, t: np.ndarray) -> np.ndarray:
    """BFL / ComfyUI ``math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)`` as torch float32 evaluates it.

    torch turns ``scalar / tensor`` into ``tensor.reciprocal() * scalar``, with the Python float scalar rounded to
    float32; ``** 1.0`` is the identity. t = 0 gives 1/0 = inf and so sigma 0."""
    e = _F32(math.exp(mu))
    t = np.asarray(t, _F32)
    with np.errstate(divide="ignore"):
        return (_F32(1) / (e + (_F32(1) / t - _F32(1)))) * e


def _bfl_sigmas(steps: int, image_tokens: int, shift: bool) -> np.ndarray:
    t = torch_linspace_f32(1.0, 0.0, steps + 1)
    return torch_time_shift(flux_mu(image_tokens), t) if shift else t


def _diffusers_sigmas(steps: int, image_tokens: int, shift: bool) -> np.ndarray:
    # FluxPipeline passes np.linspace(1, 1/N, N) (float64); set_timesteps casts it to float32 first.
    s = np.linspace(1.0, 1.0 / steps, steps).astype(_F32)
    if shift:
        # _time_shift_exponential with a Python float e^mu on a float32 array: numpy keeps float32 (NEP 50), so
        # e^mu is rounded to float32 and the divisions are float32 true divisions.
        e = _F32(math.exp(flux_mu(image_tokens)))
        s = e / (e + (_F32(1) / s - _F32(1)))
    return np.append(s.astype(_F32), _F32(0))


def _comfy_simple(table: np.ndarray, steps: int) -> np.ndarray:
    """``simple_scheduler``: entry ``-(1 + int(x * len / steps))`` of the ascending table for x < steps, then 0.

    The index is Python float arithmetic (``x * ss`` with ``ss = len / steps``), which float64 numpy repeats."""
    idx = (np.arange(steps, dtype=_F64) * (len(table) / steps)).astype(np.int64)
    return np.append(table[len(table) - 1 - idx], _F32(0)).astype(_F32)


def comfy_flux_table(shift: float = COMFY_FLUX_SHIFT, entries: int = COMFY_FLUX_TABLE) -> np.ndarray:
    """``ModelSamplingFlux.set_parameters``: ``flux_time_shift(shift, 1, arange(1, entries + 1) / entries)``.

    The int64 arange divided by a Python int is a float32 true division in torch."""
    t = np.arange(1, entries + 1, dtype=_F32) / _F32(entries)
    return torch_time_shift(shift, t)


def comfy_schnell_table(entries: int = COMFY_SCHNELL_TABLE) -> np.ndarray:
    """``ModelSamplingDiscreteFlow(shift=1, multiplier=1)``: sigma_i = i / entries (``time_snr_shift`` at 1 is
    the identity and multiplying and dividing by 1.0 is exact)."""
    return np.arange(1, entries + 1, dtype=_F32) / _F32(entries)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def sigmas(
    match: Match, steps: int, image_tokens: int, *, shift: bool = True, comfy_shift: float | None = None
) -> np.ndarray:
    """float32 [steps + 1], from 1 down to a final 0, as ``match``'s tool computes it (shift=False: schnell).

    ``image_tokens`` is the packed sequence length (H/16 * W/16). ``comfy_shift`` is ComfyUI's ``ModelSamplingFlux``
    shift (its mu); None means 1.15, ComfyUI's value when no node patches the model; it is ignored otherwise.
    BFL's first sigma is 1 - 2**-24 rather than 1 at some sizes: that is what BFL's float32 arithmetic gives."""
    steps = _check_positive("steps", steps)
    image_tokens = _check_positive("image_tokens", image_tokens)
    if match == "bfl":
        return _bfl_sigmas(steps, image_tokens, shift)
    if match == "diffusers":
        return _diffusers_sigmas(steps, image_tokens, shift)
    if match == "comfyui":
        if not shift:
            return _comfy_simple(comfy_schnell_table(), steps)
        return _comfy_simple(comfy_flux_table(COMFY_FLUX_SHIFT if comfy_shift is None else comfy_shift), steps)
    raise ValueError(f"unknown match {match!r}; choose one of {', '.join(MATCHES)}")


def _t_embedding(embedded: np.ndarray) -> np.ndarray:
    """The float32 t whose ``fl32(1000 * t)`` is ``embedded``; where no float32 t gives it exactly (1000 t skips
    some values), ``embedded / 1000``, whose product is within one ulp of it."""
    factor = _F32(TIME_FACTOR)
    t = (embedded / factor).astype(_F32)
    best = t
    for candidate in (np.nextafter(t, _F32(np.inf)), np.nextafter(t, _F32(-np.inf)), t):
        best = np.where(candidate * factor == embedded, candidate, best)
    return best.astype(_F32)


def model_timesteps(match: Match, sigmas: np.ndarray, dtype: str) -> np.ndarray:
    """float32 [steps]: the ``t`` to feed ``Flux`` (which embeds ``1000 * t`` in float32) so the embedded value is
    the one ``match``'s tool embeds with activations in ``dtype`` ("fp32" or "bf16").

    ``sigmas`` is a schedule from ``sigmas()`` (its final 0 is not a model call). What each tool embeds:

    - bfl: ``timesteps=full((B,), sigma, dtype=img.dtype)``, then ``1000 * t`` in that dtype: ``fl32(1000 sigma)``
      in fp32, ``bf16(1000 * bf16(sigma))`` in bf16.
    - diffusers: the scheduler's float32 ``timesteps = 1000 sigma``; the pipeline passes
      ``t.to(latents.dtype) / 1000`` and the transformer multiplies by 1000 again in its dtype. In fp32 the t fed
      here is exactly ``fl32(fl32(1000 sigma) / 1000)``, so our product is diffusers' bit for bit; in bf16 the
      embedded value is ``bf16(bf16(bf16(1000 sigma) / 1000) * 1000)``.
    - comfyui: ``timestep(sigma) = sigma`` in float32 whatever the model dtype, embedded as ``fl32(1000 sigma)``.
    """
    if dtype not in TIMESTEP_DTYPES:
        raise ValueError(f"unknown sampling dtype {dtype!r}; choose one of {', '.join(TIMESTEP_DTYPES)}")
    s = np.asarray(sigmas, _F32)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of steps + 1 values; got shape {s.shape}")
    s = s[:-1]
    factor = _F32(TIME_FACTOR)
    if match == "comfyui" or (match == "bfl" and dtype == "fp32"):
        return s.copy()
    if match == "bfl":
        return _t_embedding(bf16_round(factor * bf16_round(s)))
    if match == "diffusers":
        scheduler_t = factor * s  # FlowMatchEulerDiscreteScheduler.timesteps
        if dtype == "fp32":
            return (scheduler_t / factor).astype(_F32)
        # torch computes bf16 / 1000 and bf16 * 1000 in float32 and rounds each result to bf16.
        return _t_embedding(bf16_round(bf16_round(bf16_round(scheduler_t) / factor) * factor))
    raise ValueError(f"unknown match {match!r}; choose one of {', '.join(MATCHES)}")
