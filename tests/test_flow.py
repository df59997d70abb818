"""Flow-matching math against NumPy transcriptions of the formulas the torch trainers use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import flow

KEY = jax.random.key(0)
# Jitted once per (batch, method): eager op-by-op dispatch is slow with 8 fake CPU devices. Every call
# passes the full keyword set (BASE_KW), so the tests below share the compiled programs.
_sample = jax.jit(flow.sample_timesteps, static_argnums=1, static_argnames="method")
BASE_KW = dict(seq_len=1024, logit_mean=0.0, logit_std=1.0, shift=3.0, mode_scale=1.29)


def sample(key: jax.Array, batch: int, method: str, **kw: float) -> jax.Array:
    return _sample(key, batch, method=method, **{**BASE_KW, **kw})


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_flux_mu(seq_len: float) -> float:
    # kohya get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15)
    m = (1.15 - 0.5) / (4096 - 256)
    return m * seq_len + (0.5 - m * 256)


def np_time_shift(mu: float, t: np.ndarray) -> np.ndarray:
    # BFL / kohya time_shift(mu, sigma=1, t)
    return np.exp(mu) / (np.exp(mu) + (1 / t - 1) ** 1.0)


def test_flux_mu_anchors() -> None:
    np.testing.assert_allclose(float(flow.flux_mu(256)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(flow.flux_mu(4096)), 1.15, rtol=1e-6)
    for n in (1024, 2304, 8192):
        np.testing.assert_allclose(float(flow.flux_mu(n)), np_flux_mu(n), rtol=1e-6)
    # 1024px -> 4096 tokens -> S = e^1.15 = kohya's "3.1582".
    assert flow.packed_seq_len(1024, 1024) == 4096
    np.testing.assert_allclose(np.exp(float(flow.flux_mu(4096))), 3.1582, atol=1e-4)


def test_time_shift_matches_bfl_form() -> None:
    t = np.linspace(0.01, 0.99, 50).astype(np.float32)
    for mu in (0.5, 0.63, 1.15):
        np.testing.assert_allclose(np.asarray(flow.time_shift(mu, jnp.asarray(t))), np_time_shift(mu, t), rtol=1e-5)
    # Finite at the ends, where the 1/t form is not.
    np.testing.assert_allclose(np.asarray(flow.time_shift(1.15, jnp.array([0.0, 1.0]))), [0.0, 1.0])
    s = 3.0
    np.testing.assert_allclose(
        np.asarray(flow.shift_timesteps(jnp.asarray(t), s)), s * t / (1 + (s - 1) * t), rtol=1e-6
    )


def reference_timesteps(method: str, key: jax.Array, batch: int, **kw: float) -> np.ndarray:
    """The same draws as sample_timesteps, transformed in NumPy."""
    if method in ("uniform", "mode"):
        u = np.asarray(jax.random.uniform(key, (batch,), jnp.float32), np.float64)
        if method == "uniform":
            t = u
        else:
            t = 1 - u - kw["mode_scale"] * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    else:
        z = np.asarray(jax.random.normal(key, (batch,), jnp.float32), np.float64)
        t = np_sigmoid(kw["logit_std"] * z + kw["logit_mean"])
        if method == "shift":
            t = kw["shift"] * t / (1 + (kw["shift"] - 1) * t)
        elif method == "flux_shift":
            t = np_time_shift(np_flux_mu(kw["seq_len"]), t)
    return np.clip(t, flow.T_EPS, 1 - flow.T_EPS)


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "shift", "flux_shift", "mode"])
def test_sample_timesteps_matches_reference(method: str) -> None:
    kw = dict(seq_len=1024, logit_mean=0.3, logit_std=1.2, shift=3.1582, mode_scale=1.29)
    t = np.asarray(sample(KEY, 4096, method, **kw))
    assert t.shape == (4096,) and t.dtype == np.float32
    assert np.all((t > 0) & (t < 1))
    np.testing.assert_allclose(t, reference_timesteps(method, KEY, 4096, **kw), rtol=2e-5, atol=1e-6)


def test_timestep_distributions() -> None:
    mean = lambda method, **kw: float(np.mean(sample(KEY, 4096, method, **kw)))
    assert abs(mean("uniform") - 0.5) < 0.015
    assert abs(mean("logit_normal") - 0.5) < 0.015  # symmetric around 0.5 for mean 0
    assert mean("shift", shift=3.0) > 0.6  # shift pushes towards noise
    # A longer sequence gives a larger flux shift.
    assert mean("flux_shift", seq_len=4096) > mean("flux_shift", seq_len=1024) > mean("logit_normal")
    # mode_scale 0 is plain uniform (reversed).
    t0 = sample(KEY, 4096, "mode", mode_scale=0.0)
    u = jax.random.uniform(KEY, (4096,), jnp.float32)
    np.testing.assert_allclose(np.asarray(t0), np.clip(1 - np.asarray(u), flow.T_EPS, 1 - flow.T_EPS), rtol=1e-6)


def test_flux_shift_seq_len_may_be_traced() -> None:
    # seq_len is an ordinary traced argument (one compile for every bucket size).
    traced = sample(KEY, 4096, "flux_shift", seq_len=jnp.int32(2304))
    np.testing.assert_allclose(
        np.asarray(traced),
        reference_timesteps("flux_shift", KEY, 4096, **{**BASE_KW, "seq_len": 2304}),
        rtol=2e-5,
    )


def test_unknown_choices_raise() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        flow.sample_timesteps(KEY, 2, method="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bell"):
        flow.loss_weights(jnp.ones(2), "bell")  # type: ignore[arg-type]


def test_noisy_input_and_target() -> None:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 16, 64)).astype(np.float32)
    noise = rng.standard_normal((3, 16, 64)).astype(np.float32)
    t = np.array([0.1, 0.5, 0.9], np.float32)
    xt = np.asarray(jax.jit(flow.noisy_input)(x0, noise, t))
    np.testing.assert_allclose(xt, (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(flow.velocity_target(x0, noise)), noise - x0)
    # The target is d x_t / d t.
    eps = 1e-3
    fd = (np.asarray(flow.noisy_input(x0, noise, t + eps)) - np.asarray(flow.noisy_input(x0, noise, t - eps))) / (
        2 * eps
    )
    np.testing.assert_allclose(fd, noise - x0, atol=2e-3)
    # End points are the data and the noise; bf16 inputs stay bf16.
    np.testing.assert_allclose(np.asarray(flow.noisy_input(x0, noise, np.zeros(3, np.float32))), x0)
    np.testing.assert_allclose(np.asarray(flow.noisy_input(x0, noise, np.ones(3, np.float32))), noise)
    out = flow.noisy_input(jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), t)
    assert out.dtype == jnp.bfloat16


def test_loss_weights() -> None:
    t = np.array([0.05, 0.3, 0.5, 0.8], np.float32)
    np.testing.assert_array_equal(np.asarray(flow.loss_weights(t, "none")), np.ones(4))
    np.testing.assert_allclose(np.asarray(flow.loss_weights(t, "sigma_sqrt")), t**-2.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(flow.loss_weights(t, "cosmap")), 2 / (np.pi * (1 - 2 * t + 2 * t**2)), rtol=1e-6
    )


def test_flow_matching_loss() -> None:
    rng = np.random.default_rng(1)
    pred = rng.standard_normal((4, 8, 5)).astype(np.float32)
    target = rng.standard_normal((4, 8, 5)).astype(np.float32)
    w = np.array([1.0, 2.0, 0.5, 0.0], np.float32)
    per = ((pred - target) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(np.asarray(flow.per_sample_mse(pred, target)), per, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(flow.flow_matching_loss)(pred, target)), per.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(flow.flow_matching_loss(pred, target, w)), (w * per).mean(), rtol=1e-6)
    # bf16 predictions are compared in fp32.
    loss = flow.flow_matching_loss(jnp.asarray(pred, jnp.bfloat16), target)
    assert loss.dtype == jnp.float32


def test_sample_guidance() -> None:
    g = flow.sample_guidance(KEY, 4, 1.0)
    np.testing.assert_array_equal(np.asarray(g), np.ones(4, np.float32))
    g = np.asarray(jax.jit(flow.sample_guidance, static_argnums=(1, 3))(KEY, 1000, 1.0, (1.0, 4.0)))
    assert g.shape == (1000,) and g.min() >= 1.0 and g.max() <= 4.0 and g.std() > 0.5
