"""Optimizer and schedule construction from OptimConfig."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flux_jax.errors import ConfigError
from flux_jax.run_config import OptimConfig
from flux_jax.train.optim import build_optimizer, build_schedule


def lrs(cfg: OptimConfig, total: int, steps: list[int]) -> np.ndarray:
    schedule = build_schedule(cfg, total)
    return np.array([float(schedule(s)) for s in steps])


def test_constant_with_warmup() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=4)
    np.testing.assert_allclose(lrs(cfg, 10, [0, 1, 2, 4, 9, 50]), [0, 2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lrs(OptimConfig(lr=2e-4), 10, [0, 9]), [2e-4, 2e-4], rtol=1e-6)


def test_cosine_and_linear_decay() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", final_lr_ratio=0.1)
    total, decay = 12, 10
    got = lrs(cfg, total, [0, 1, 2, 7, 12])
    want = [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 5 / decay)), 0.1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    cfg = OptimConfig(lr=1.0, schedule="linear")
    np.testing.assert_allclose(lrs(cfg, 10, [0, 5, 10]), [1.0, 0.5, 0.0], atol=1e-7)


def test_schedule_rejects_warmup_past_the_end() -> None:
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_schedule(OptimConfig(schedule="cosine", warmup_steps=10), 10)
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_schedule(OptimConfig(warmup_steps=11), 10)
    with pytest.raises(ConfigError, match="total_steps"):
        build_schedule(OptimConfig(), 0)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_each_optimizer_minimises_a_quadratic(name: str) -> None:
    # A decaying schedule lets sign-based Lion settle instead of oscillating around the minimum.
    b2 = 0.99 if name == "lion" else 0.999
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=0.0, b2=b2, schedule="cosine", warmup_steps=5)
    tx = build_optimizer(cfg, 60)
    params = {"a": jnp.full((4, 3), 2.0), "b": jnp.full((3,), -1.5)}
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = float(loss(params))
    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.1 * start


def test_clipping_bounds_the_global_norm() -> None:
    # With clipping, a huge first gradient is scaled to norm 1, so AdamW's moments after [1e6 d, d]
    # match those after [d, d] for a unit-norm d; without clipping the first gradient dominates.
    d = {"w": jnp.array([0.6, 0.8])}
    huge = jax.tree.map(lambda x: 1e6 * x, d)

    def second_update(clip_norm: float | None, first: dict) -> np.ndarray:
        tx = build_optimizer(OptimConfig(lr=1.0, weight_decay=0.0, clip_norm=clip_norm), 10)
        state = tx.init(d)
        _, state = tx.update(first, state, d)
        updates, _ = tx.update(d, state, d)
        return np.asarray(updates["w"])

    np.testing.assert_allclose(second_update(1.0, huge), second_update(1.0, d), rtol=1e-6)
    assert not np.allclose(second_update(None, huge), second_update(None, d), rtol=1e-3)


def test_grad_accumulation_applies_every_k_calls() -> None:
    cfg = OptimConfig(lr=0.1, weight_decay=0.0, clip_norm=None)
    tx = build_optimizer(cfg, 10, grad_accum=2)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    g1, g2 = {"w": jnp.full(3, 1.0)}, {"w": jnp.full(3, 3.0)}
    u1, state = tx.update(g1, state, params)
    np.testing.assert_array_equal(np.asarray(u1["w"]), 0.0)
    u2, state = tx.update(g2, state, params)
    # Equals one plain AdamW step on the mean gradient.
    plain = build_optimizer(cfg, 10)
    want, _ = plain.update({"w": jnp.full(3, 2.0)}, plain.init(params), params)
    np.testing.assert_allclose(np.asarray(u2["w"]), np.asarray(want["w"]), rtol=1e-6)
    with pytest.raises(ConfigError, match="grad_accum"):
        build_optimizer(cfg, 10, grad_accum=0)
