"""bf16 master weights with stochastic rounding (optim.master_dtype) and the optimizers' state shardings."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flux_jax.errors import ConfigError
from flux_jax.run_config import OptimConfig, from_dict
from flux_jax.train.optim import build_optimizer, opt_state_shardings
from flux_jax.train.rounding import apply_updates, master_params, stochastic_round_bf16
from flux_jax.train.state import state_shardings_for

N_KEYS = 4096


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    """Spacing of bf16 values around ``x`` (normal range): 2**(exponent - 7)."""
    return 2.0 ** (np.floor(np.log2(np.abs(x))) - 7)


def rounded_samples(x: np.ndarray, n: int = N_KEYS) -> np.ndarray:
    keys = jax.random.split(jax.random.key(7), n)
    out = jax.jit(jax.vmap(lambda k: stochastic_round_bf16(jnp.asarray(x, jnp.float32), k)))(keys)
    return np.asarray(out.astype(jnp.float32), np.float64)


def test_threefry_is_partitionable() -> None:
    # The rounding bits are generated per shard (not replicated, then sliced) only in this mode; the values are
    # sharding-independent either way (test_rounding_is_deterministic_and_independent_of_sharding).
    assert jax.config.jax_threefry_partitionable


def test_stochastic_rounding_is_unbiased() -> None:
    """Each sample is one of the two neighbouring bf16 values, with error below one ulp u, so its variance is at most
    u**2 / 4 and the mean of N samples has std at most u / (2 sqrt N): the mean must be within 5 of those."""
    rng = np.random.default_rng(0)
    exps = np.arange(-20, 21, 4)
    mant = 1.0 + rng.uniform(0.0, 1.0, size=exps.size)
    signs = np.where(np.arange(exps.size) % 2 == 0, 1.0, -1.0)
    x = (signs * mant * 2.0**exps).astype(np.float32)
    assert not np.any(x.astype(jnp.bfloat16).astype(np.float32) == x)  # none is exactly representable
    samples = rounded_samples(x)
    u = bf16_ulp(x.astype(np.float64))
    lo = np.floor(np.abs(x) / u) * u
    assert np.all((np.abs(samples) == lo) | (np.abs(samples) == lo + u))  # only the two neighbours
    assert np.all(np.sign(samples) == signs)
    err = np.abs(samples.mean(axis=0) - x)
    bound = 5 * u / (2 * math.sqrt(N_KEYS))
    assert np.all(err <= bound), (err / bound).max()
    # Both neighbours actually occur (it is not just rounding one way that happens to be close).
    assert np.all((samples == samples[0]).mean(axis=0) < 1.0)


def test_representable_values_round_to_themselves() -> None:
    x = np.array([0.0, -0.0, 1.0, -1.0, 0.5, 3.140625, -1024.0, 2.0**-30, 2.0**40], np.float32)
    assert np.all(x.astype(jnp.bfloat16).astype(np.float32) == x)
    samples = rounded_samples(x, 256)
    assert np.all(samples == x[None, :])  # zero variance
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    out = np.asarray(jax.jit(stochastic_round_bf16)(jnp.asarray(special), jax.random.key(0)).astype(jnp.float32))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])


def test_nearest_rounding_loses_a_small_update_that_stochastic_rounding_keeps() -> None:
    p = {"w": jnp.ones((N_KEYS,), jnp.bfloat16)}
    u = {"w": jnp.full((N_KEYS,), 1e-3, jnp.float32)}  # well below half a bf16 ulp at 1.0 (2**-8)
    nearest = optax.apply_updates(p, u)["w"]
    assert np.all(np.asarray(nearest, np.float32) == 1.0)  # the update vanished
    sr = np.asarray(apply_updates(p, u, jax.random.key(1), "bf16")["w"].astype(jnp.float32), np.float64)
    ulp = 2.0**-7
    assert abs(sr.mean() - (1.0 + 1e-3)) <= 5 * ulp / (2 * math.sqrt(N_KEYS))

    # 500 such steps on one weight: nearest never moves, stochastic rounding moves by about 0.5 on average.
    def walk(rounding: str) -> jax.Array:
        def body(i, w):
            ws = {"w": w}
            us = {"w": jnp.full_like(w, 1e-3, jnp.float32)}
            if rounding == "nearest":
                return optax.apply_updates(ws, us)["w"]
            return apply_updates(ws, us, jax.random.fold_in(jax.random.key(2), i), "bf16")["w"]

        return jax.lax.fori_loop(0, 500, body, jnp.ones((256,), jnp.bfloat16))

    assert np.all(np.asarray(walk("nearest"), np.float32) == 1.0)
    moved = np.asarray(walk("stochastic"), np.float64)
    assert abs(moved.mean() - 1.5) < 0.02, moved.mean()


def test_fp32_master_is_optax_apply_updates() -> None:
    p = {"a": jnp.arange(4.0), "b": jnp.ones((2,), jnp.bfloat16)}
    u = {"a": jnp.full((4,), 0.25), "b": jnp.full((2,), 1e-3)}
    got = apply_updates(p, u, jax.random.key(0), "fp32")
    want = optax.apply_updates(p, u)
    assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in p)
    assert master_params(p, "fp32") is p
    assert master_params(p, "bf16")["a"].dtype == jnp.bfloat16


def mesh8() -> Mesh:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()), ("fsdp",))


def test_rounding_is_deterministic_and_independent_of_sharding() -> None:
    rng = np.random.default_rng(3)
    params = {
        "a": jnp.asarray(rng.normal(size=(64, 16)), jnp.bfloat16),
        "b": jnp.asarray(rng.normal(size=(16, 40)), jnp.bfloat16),
    }
    updates = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, jnp.float32), params)
    key = jax.random.key(11)
    step = jax.jit(lambda p, u, k: apply_updates(p, u, k, "bf16"))
    one = step(params, updates, key)
    again = step(params, updates, key)
    other = step(params, updates, jax.random.key(12))
    assert all(np.array_equal(one[k], again[k]) for k in params)
    assert not np.array_equal(one["a"], other["a"])  # the key matters
    assert not np.array_equal(one["a"], optax.apply_updates(params, updates)["a"])  # and it is not nearest
    zero = step(params, jax.tree.map(jnp.zeros_like, updates), key)  # MultiSteps' skipped micro-steps
    assert all(np.array_equal(zero[k], params[k]) for k in params)

    mesh = mesh8()
    specs = {"a": PartitionSpec("fsdp", None), "b": PartitionSpec(None, "fsdp")}
    sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    on1 = jax.devices()[0]
    single = jax.jit(lambda p, u, k: apply_updates(p, u, k, "bf16"))(
        jax.device_put(params, on1), jax.device_put(updates, on1), key
    )
    sharded_step = jax.jit(
        lambda p, u, k: apply_updates(p, u, k, "bf16"), in_shardings=(sh, sh, None), out_shardings=sh
    )
    sharded = sharded_step(jax.device_put(params, sh), jax.device_put(updates, sh), key)
    for k in params:
        assert sharded[k].sharding.spec == specs[k]
        assert np.array_equal(np.asarray(sharded[k]), np.asarray(single[k]))
        assert np.array_equal(np.asarray(sharded[k]), np.asarray(one[k]))
    # The bits are generated inside the step with the param's sharding: no chip holds more random words than its
    # shard has elements (non-partitionable threefry would generate all 64*16 bits, as u32[512], on every chip).
    hlo = sharded_step.lower(jax.device_put(params, sh), jax.device_put(updates, sh), key).compile().as_text()
    sizes = [math.prod(int(d) for d in dims.split(",")) for dims in re.findall(r"\bu(?:32|16)\[([0-9,]+)\]", hlo)]
    assert sizes and max(sizes) <= 64 * 16 // 8, sorted(set(sizes))


def toy_losses(name: str, master: str, *, nearest: bool = False, steps: int = 300) -> np.ndarray:
    """Linear regression from weights near 1.0 (bf16 ulp 2**-7) with lr 1e-3: updates far below half an ulp."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
    w0 = 1.0 + 0.1 * rng.normal(size=(32, 8))
    y = x @ jnp.asarray(w0 + 0.3 * rng.normal(size=(32, 8)), jnp.float32)
    b2 = 0.99 if name == "lion" else 0.999
    cfg = OptimConfig(name=name, lr=1e-3, weight_decay=0.0, b2=b2, clip_norm=None, master_dtype=master)
    tx = build_optimizer(cfg, steps)
    params = {"w": jnp.asarray(w0, jnp.float32)}
    if master == "bf16" or nearest:
        params = master_params(params, "bf16")

    def loss_fn(p):
        return jnp.mean((x @ p["w"].astype(jnp.float32) - y) ** 2)

    def step(carry, i):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        if nearest:
            p = optax.apply_updates(p, u)
        else:
            p = apply_updates(p, u, jax.random.fold_in(jax.random.key(0), i), master)
        return (p, s), loss

    run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jnp.arange(steps))[1])
    return np.asarray(run(params))


def test_bf16_stochastic_rounding_tracks_fp32_masters_where_nearest_stalls() -> None:
    fp32 = toy_losses("adamw", "fp32")
    sr = toy_losses("adamw", "bf16")
    nearest = toy_losses("adamw", "fp32", nearest=True)
    assert fp32[-1] < 0.25 * fp32[0]
    # Measured: at most 3.6% apart over the 300 steps; 10% leaves room for another platform's rounding.
    assert np.max(np.abs(sr - fp32) / fp32) < 0.10
    # Round-to-nearest bf16 masters never move: every AdamW step is below half an ulp.
    assert nearest[-1] > 0.99 * nearest[0]


@pytest.mark.parametrize("name", ["adafactor", "lion"])
@pytest.mark.parametrize("master", ["fp32", "bf16"])
def test_adafactor_and_lion_train_the_toy(name: str, master: str) -> None:
    losses = toy_losses(name, master)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.25 * losses[0]  # measured 0.16 to 0.19


def test_bf16_master_keeps_fp32_moments() -> None:
    params = {"w": jnp.ones((256, 512), jnp.bfloat16), "b": jnp.ones((8,), jnp.bfloat16)}
    for name in ["adamw", "adafactor", "lion"]:
        for accum in [1, 2]:
            tx = build_optimizer(OptimConfig(name=name, master_dtype="bf16"), 10, grad_accum=accum)
            state = jax.eval_shape(tx.init, params)
            floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
            assert floats and all(d == jnp.float32 for d in floats), (name, accum, floats)
            grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), params)
            updates, _ = jax.eval_shape(tx.update, grads, state, params)
            assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


def test_master_dtype_is_validated() -> None:
    assert from_dict({"optim": {"master_dtype": "bf16"}, "lora": {"dtype": "bf16"}}).optim.master_dtype == "bf16"
    assert OptimConfig().master_dtype == "fp32"
    with pytest.raises(ConfigError, match=r"lora\.dtype: is 'fp32', but optim\.master_dtype is bf16"):
        from_dict({"optim": {"master_dtype": "bf16"}})  # the adapters are the masters: they must be bf16
    with pytest.raises(ConfigError, match="master_dtype"):
        from_dict({"optim": {"master_dtype": "fp16"}})


def per_device_bytes(x: jax.Array) -> int:
    return max(s.data.nbytes for s in x.addressable_shards)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
@pytest.mark.parametrize("master", ["fp32", "bf16"])
def test_state_shardings_follow_the_params_on_8_devices(name: str, master: str) -> None:
    mesh = mesh8()
    dt = jnp.bfloat16 if master == "bf16" else jnp.float32
    specs = {
        "lora_a": PartitionSpec("fsdp", None),  # (3072, 16): Adafactor keeps it unfactored (16 < 128)
        "w_rows": PartitionSpec("fsdp", None),  # (1024, 256) and (256, 1024): Adafactor factors them
        "w_cols": PartitionSpec(None, "fsdp"),
    }
    shapes = {"lora_a": (3072, 16), "w_rows": (1024, 256), "w_cols": (256, 1024)}
    sh = {k: NamedSharding(mesh, specs[k]) for k in specs}
    params = {k: jax.device_put(jnp.ones(shapes[k], dt), sh[k]) for k in specs}
    tx = build_optimizer(OptimConfig(name=name, master_dtype=master), 10, grad_accum=2)
    state_sh = opt_state_shardings(tx, params, mesh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)

    # Walk the state's params-shaped trees leaf by leaf next to their params.
    seen = []

    def check(leaf, param):
        seen.append(tuple(leaf.shape))
        total = leaf.size * leaf.dtype.itemsize
        if tuple(leaf.shape) == tuple(param.shape):
            assert per_device_bytes(leaf) == total // 8  # the params' own split: no full copy anywhere
        elif leaf.ndim == param.ndim - 1 and leaf.shape[0] == 1024:
            assert leaf.sharding.spec == PartitionSpec("fsdp")  # factored statistic along the param's split dim
            assert abs(per_device_bytes(leaf) - total / 8) <= 0.05 * total / 8
        else:  # Adafactor's (1,) slots and the statistic along the unsplit dim (nothing there to split it over)
            assert leaf.size <= 256
        return leaf

    optax.tree_map_params(tx, check, state, params)
    assert seen
    if name == "adafactor":
        assert (1024,) in seen and (256,) in seen  # the factored path was exercised
    # And a real update runs with these shardings and keeps them.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    step = jax.jit(tx.update, in_shardings=(sh, state_sh, sh), out_shardings=(None, state_sh))
    _, new_state = step(grads, state, params)
    assert jax.tree.map(lambda a: a.sharding.spec, new_state) == jax.tree.map(lambda a: a.sharding.spec, state)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_opt_state_shardings_is_the_trainers_rule(name: str) -> None:
    """``state_shardings_for`` (the trainer's and the planner's) takes its optimizer-state shardings from it; on a
    factored param (Adafactor, a dim >= 128) the row / column statistic along the split dim is split too."""
    mesh = mesh8()
    lora = {
        "a": jax.ShapeDtypeStruct((3072, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None))),
        "b": jax.ShapeDtypeStruct((16, 3072), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp"))),
    }
    tx = build_optimizer(OptimConfig(name=name), 10, grad_accum=2)
    assert opt_state_shardings(tx, lora, mesh) == state_shardings_for(tx, lora, mesh, ema=False).opt_state
    if name == "adafactor":
        big = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=lora["a"].sharding)}
        ours = [s.spec for s in jax.tree.leaves(opt_state_shardings(tx, big, mesh))]
        theirs = [s.spec for s in jax.tree.leaves(state_shardings_for(tx, big, mesh, ema=False).opt_state)]
        assert PartitionSpec("fsdp") in ours and ours == theirs
