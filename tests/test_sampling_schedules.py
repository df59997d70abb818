"""Sigma schedules and model timesteps against each tool's torch code, bit for bit.

diffusers is its installed scheduler; BFL and ComfyUI are torch re-creations of their schedule code
(tests/helpers/sampling_reference.py). The pinned lists are the reference's verified values at 1024 px.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flux_jax.model.layers import timestep_embedding
from flux_jax.sampling import schedules
from tests.helpers import sampling_reference as ref

# (steps, image tokens): 1024 px (4096), 512 px (1024), the 256 base, odd 16-multiples above it, 768x1360 (48*85)
# and 1536 px (beyond the 4096 anchor: mu is extrapolated).
STEPS = (1, 4, 20, 28, 50)
TOKENS = (4096, 1024, 256, 256 + 16 * 7, 48 * 85, 96 * 96)
GRID = [(n, tokens) for n in STEPS for tokens in TOKENS]

# sampling_reference.md section 3, at 1024 px (L = 4096, mu = shift = 1.15), printed to 6 decimals.
PINNED_20 = [1, .983608, .966014, .947080, .926647, .904531, .880513, .854338, .825702, .794239, .759511, .720980,
             .677987, .629707, .575103, .512844, .441200, .357875, .259758, .142529, 0]  # fmt: skip
PINNED_28_BFL = [1, .988409, .976222, .963394, .949873, .935599, .920509, .904531, .887583, .869576, .850406, .829956,
                 .808095, .784672, .759511, .732413, .703145, .671435, .636964, .599357, .558163, .512844, .462748,
                 .407078, .344849, .274828, .195455, .104721, 0]  # fmt: skip
PINNED_28_COMFY = [1, .988413, .976233, .963410, .949895, .935628, .920546, .904531, .887590, .869591, .850429,
                   .829990, .808141, .784730, .759511, .732424, .703169, .671474, .637022, .599435, .558266, .512844,
                   .462769, .407125, .344928, .274947, .195624, .104954, 0]  # fmt: skip


def assert_same_bits(got: np.ndarray, want) -> None:
    want = np.asarray(want, np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert diff.size == 0, (
        f"{diff.size} of {want.size} differ, first at {diff[0]}: {got[diff[0]]!r} vs {want[diff[0]]!r}"
    )


def diffusers_sigmas(steps: int, tokens: int, *, schnell: bool = False) -> torch.Tensor:
    scheduler = ref.diffusers_flux_scheduler(schnell=schnell)
    ref.diffusers_set_flux_timesteps(scheduler, steps, tokens)
    return scheduler.sigmas


def test_flux_mu() -> None:
    m = (1.15 - 0.5) / (4096 - 256)
    assert schedules.flux_mu(256) == pytest.approx(0.5, abs=1e-15)
    assert schedules.flux_mu(4096) == pytest.approx(1.15, abs=1e-15)
    for tokens in (1, 1024, 48 * 85, 9216):
        assert schedules.flux_mu(tokens) == m * tokens + (0.5 - 256 * m)
        assert schedules.flux_mu(tokens) == ref.diffusers_calculate_shift()(tokens)
        assert schedules.flux_mu(tokens) == ref.bfl_get_lin_function()(tokens)


@pytest.mark.parametrize(("steps", "tokens"), GRID)
def test_diffusers_equals_flow_match_euler_scheduler(steps, tokens) -> None:
    got = schedules.sigmas("diffusers", steps, tokens)
    assert_same_bits(got, diffusers_sigmas(steps, tokens).numpy())
    assert got[0] <= 1 and got[-1] == 0 and np.all(np.diff(got) < 0)


@pytest.mark.parametrize("steps", STEPS)
def test_diffusers_schnell_is_the_unshifted_linspace(steps) -> None:
    got = schedules.sigmas("diffusers", steps, 4096, shift=False)
    assert_same_bits(got, diffusers_sigmas(steps, 4096, schnell=True).numpy())


@pytest.mark.parametrize(("steps", "tokens"), GRID)
def test_bfl_equals_get_schedule(steps, tokens) -> None:
    assert_same_bits(schedules.sigmas("bfl", steps, tokens), ref.bfl_get_schedule(steps, tokens))
    assert_same_bits(
        schedules.sigmas("bfl", steps, tokens, shift=False), ref.bfl_get_schedule(steps, tokens, shift=False)
    )


def test_torch_linspace_kernel() -> None:
    # BFL's schedule starts from torch's float32 linspace; its two-sided FMA kernel is not np.linspace.
    for count in range(1, 130):
        assert_same_bits(schedules.torch_linspace_f32(1.0, 0.0, count), torch.linspace(1, 0, count).numpy())
    assert_same_bits(schedules.torch_linspace_f32(-2.5, 7.0, 33), torch.linspace(-2.5, 7.0, 33).numpy())


@pytest.mark.parametrize(("steps", "tokens"), GRID)
def test_comfyui_equals_simple_scheduler_over_model_sampling_flux(steps, tokens) -> None:
    # A plain loader: shift 1.15 whatever the size. With the ModelSamplingFlux node: the size's mu.
    got = schedules.sigmas("comfyui", steps, tokens)
    assert_same_bits(got, ref.comfy_simple_scheduler(ref.ComfyModelSamplingFlux(), steps).numpy())
    mu = schedules.flux_mu(tokens)
    patched = schedules.sigmas("comfyui", steps, tokens, comfy_shift=mu)
    assert_same_bits(patched, ref.comfy_simple_scheduler(ref.ComfyModelSamplingFlux(shift=mu), steps).numpy())


@pytest.mark.parametrize("steps", STEPS)
def test_comfyui_schnell_is_the_discrete_flow_table(steps) -> None:
    got = schedules.sigmas("comfyui", steps, 4096, shift=False)
    assert_same_bits(got, ref.comfy_simple_scheduler(ref.ComfyModelSamplingDiscreteFlow(), steps).numpy())


def test_pinned_lists_at_1024px() -> None:
    np.testing.assert_allclose(schedules.sigmas("comfyui", 20, 4096), PINNED_20, rtol=0, atol=1e-6)
    np.testing.assert_allclose(schedules.sigmas("bfl", 20, 4096), PINNED_20, rtol=0, atol=1e-6)
    np.testing.assert_allclose(schedules.sigmas("comfyui", 28, 4096), PINNED_28_COMFY, rtol=0, atol=1e-6)
    np.testing.assert_allclose(schedules.sigmas("bfl", 28, 4096), PINNED_28_BFL, rtol=0, atol=1e-6)
    np.testing.assert_allclose(schedules.sigmas("diffusers", 28, 4096), PINNED_28_BFL, rtol=0, atol=1e-6)


def test_comfyui_differs_from_diffusers_at_28_steps_but_not_at_20() -> None:
    comfy, diffusers, bfl = (schedules.sigmas(m, 28, 4096) for m in ("comfyui", "diffusers", "bfl"))
    gap = np.abs(comfy - diffusers)
    assert 2.3e-4 < gap.max() < 2.4e-4 and gap.argmax() == 27
    # 10000/28 is not an integer: the table grid meets k/28 only where 7 divides k.
    np.testing.assert_array_equal(np.flatnonzero(comfy == bfl), [0, 7, 14, 21, 28])
    comfy, diffusers, bfl = (schedules.sigmas(m, 20, 4096) for m in ("comfyui", "diffusers", "bfl"))
    assert_same_bits(comfy, bfl)
    # diffusers' float64 linspace and true division differ from BFL's arithmetic by at most 1 ulp here.
    np.testing.assert_array_max_ulp(comfy, diffusers, maxulp=1)
    assert np.abs(comfy - diffusers).max() < 6e-8


def test_bfl_and_diffusers_agree_to_two_ulps() -> None:
    # Equal in exact arithmetic (diffusers' linspace(1, 1/N, N) is BFL's linspace(1, 0, N + 1) without the 0);
    # the float64 linspace with true division against the float32 one with reciprocal-multiply gives <= 2 ulps
    # (1.19e-7 near 1; the reference's "<= 1 ulp" means its absolute 1.19e-7).
    for steps, tokens in GRID:
        bfl, diffusers = schedules.sigmas("bfl", steps, tokens), schedules.sigmas("diffusers", steps, tokens)
        np.testing.assert_array_max_ulp(bfl, diffusers, maxulp=2)


@pytest.mark.parametrize("match", schedules.MATCHES)
def test_schnell_four_steps(match) -> None:
    assert_same_bits(schedules.sigmas(match, 4, 4096, shift=False), [1, 0.75, 0.5, 0.25, 0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("diffusers", 0, 4096), "steps must be a positive integer; got 0"),
        (("bfl", -3, 4096), "steps must be a positive integer; got -3"),
        (("comfyui", 2.5, 4096), "steps must be a positive integer; got 2.5"),
        (("diffusers", 28, 0), "image_tokens must be a positive integer; got 0"),
        (("a1111", 28, 4096), "unknown match 'a1111'"),
    ],
)
def test_bad_schedule_arguments(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        schedules.sigmas(*args)


# --- model timesteps: the t our model embeds as fl32(1000 t) ---

_embed = jax.jit(timestep_embedding, static_argnames=("time_factor",))
# The first line of flux_jax.model.layers.timestep_embedding, inside jit as the model runs it.
_times_1000 = jax.jit(lambda t: 1000.0 * t.astype(jnp.float32))


def our_embedded_value(t: np.ndarray) -> np.ndarray:
    """fl32(1000 t), the value our model embeds for ``t``."""
    return np.asarray(_times_1000(jnp.asarray(t)))


@pytest.mark.parametrize("steps", (20, 28, 50))
def test_diffusers_fp32_timesteps_embed_bit_for_bit(steps) -> None:
    scheduler = ref.diffusers_flux_scheduler()
    ref.diffusers_set_flux_timesteps(scheduler, steps, 4096)
    want = ref.diffusers_embedded_timesteps(scheduler.timesteps, torch.float32)
    t = schedules.model_timesteps("diffusers", schedules.sigmas("diffusers", steps, 4096), "fp32")
    assert t.shape == (steps,)
    assert_same_bits(our_embedded_value(t), want)
    if steps == 28:
        # So the whole sinusoidal embedding equals one of diffusers' embedded values, taken as they are.
        ours, theirs = _embed(jnp.asarray(t)), _embed(jnp.asarray(want), time_factor=1.0)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("steps", (20, 28, 50))
def test_bf16_timesteps_embed_each_tools_value(steps) -> None:
    scheduler = ref.diffusers_flux_scheduler()
    ref.diffusers_set_flux_timesteps(scheduler, steps, 4096)
    want = ref.diffusers_embedded_timesteps(scheduler.timesteps, torch.bfloat16)
    got = our_embedded_value(schedules.model_timesteps("diffusers", scheduler.sigmas.numpy(), "bf16"))
    # Exact wherever some float32 t has fl32(1000 t) equal to the value; 1000 t skips a few, then within an ulp.
    np.testing.assert_array_max_ulp(got, want, maxulp=1)
    assert (got == want).mean() > 0.9

    bfl = ref.bfl_get_schedule(steps, 4096)
    want = ref.bfl_embedded_timesteps(bfl, torch.bfloat16)
    got = our_embedded_value(schedules.model_timesteps("bfl", np.asarray(bfl, np.float32), "bf16"))
    np.testing.assert_array_max_ulp(got, want, maxulp=1)
    assert (got == want).mean() > 0.9
    fp32 = our_embedded_value(schedules.model_timesteps("bfl", np.asarray(bfl, np.float32), "fp32"))
    assert_same_bits(fp32, ref.bfl_embedded_timesteps(bfl, torch.float32))


@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_comfyui_timesteps_are_its_float32_sigmas(dtype) -> None:
    sampling = ref.ComfyModelSamplingFlux()
    comfy = ref.comfy_simple_scheduler(sampling, 28)
    t = schedules.model_timesteps("comfyui", comfy.numpy(), dtype)
    assert_same_bits(t, comfy.numpy()[:-1])
    assert_same_bits(our_embedded_value(t), ref.comfy_embedded_timesteps(sampling, comfy))


def test_embedded_values_of_the_reference_example() -> None:
    # sigma_7 = .904531 at 1024 px, 28 steps: BFL embeds 908, diffusers 904, ComfyUI 904.531 (bf16 activations).
    sigma = {m: schedules.sigmas(m, 28, 4096) for m in schedules.MATCHES}
    embedded = {m: our_embedded_value(schedules.model_timesteps(m, sigma[m], "bf16"))[7] for m in schedules.MATCHES}
    assert sigma["bfl"][7] == pytest.approx(0.904531, abs=1e-6)
    assert embedded["bfl"] == 908.0
    assert embedded["diffusers"] == 904.0
    assert embedded["comfyui"] == pytest.approx(904.531, abs=1e-3)


def test_bad_timestep_arguments() -> None:
    s = schedules.sigmas("diffusers", 4, 4096)
    with pytest.raises(ValueError, match="unknown sampling dtype 'fp16'"):
        schedules.model_timesteps("diffusers", s, "fp16")
    with pytest.raises(ValueError, match="unknown match 'a1111'"):
        schedules.model_timesteps("a1111", s, "fp32")
    with pytest.raises(ValueError, match="1-D schedule"):
        schedules.model_timesteps("diffusers", s[:1], "fp32")
