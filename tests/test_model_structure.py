"""Structure of the Flax Flux model: full-size shapes, parameter count, logical axes, compile-once, dtypes."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax import Flux, configure, preset
from flux_jax.model.attention import attention
from flux_jax.weights import flux_keys
from flux_jax.weights.flax_layout import abstract_model, flax_sources
from flux_jax.weights.sources import ArraySource
from tests.helpers.torch_reference import forward_inputs, jax_forward

DEV_PARAMS = 11_901_408_320


def _flat(model):
    return {path: var for path, var in nnx.state(model).flat_state()}


def test_dev_preset_abstract_param_count_and_shapes():
    cfg = preset("dev")
    model = abstract_model(cfg)  # nnx.eval_shape: shapes only, no memory
    flat = _flat(model)
    assert sum(math.prod(v.get_value().shape) for v in flat.values()) == DEV_PARAMS

    bfl = flux_keys.bfl_shapes(cfg)
    assert len(bfl) == 780
    assert sum(math.prod(s) for s in bfl.values()) == DEV_PARAMS
    # Every Flax leaf is exactly the (transposed, stacked) BFL tensors of the real key list, and vice versa.
    sources = flax_sources(
        cfg,
        {
            k: ArraySource(np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), s, [0] * len(s)))
            for k, s in bfl.items()
        },
    )  # noqa: E501
    assert set(sources) == set(flat)
    for path, var in flat.items():
        assert tuple(sources[path].shape) == tuple(var.get_value().shape), path
    # Spot-check the famous fused shapes, in the Flax [in, out] layout with the stacked layer axis.
    assert flat[("double_blocks", "img_attn", "qkv", "kernel")].get_value().shape == (19, 3072, 9216)
    assert flat[("single_blocks", "linear1", "kernel")].get_value().shape == (38, 3072, 21504)
    assert flat[("single_blocks", "linear2", "kernel")].get_value().shape == (38, 15360, 3072)
    assert flat[("final_layer", "adaLN_modulation", 1, "kernel")].get_value().shape == (3072, 6144)


def test_schnell_has_no_guidance_embedding():
    cfg = preset("schnell")
    model = abstract_model(cfg)
    assert model.guidance_in is None
    assert not any(k.startswith("guidance_in") for k in flux_keys.bfl_shapes(cfg))
    assert sum(math.prod(v.get_value().shape) for v in _flat(model).values()) == DEV_PARAMS - (
        256 * 3072 + 3072 + 3072 * 3072 + 3072
    )


def test_every_parameter_has_logical_axes_matching_its_rank():
    model = abstract_model(preset("dev"))
    for path, var in _flat(model).items():
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None, path
        assert len(axes) == len(var.get_value().shape), (path, axes)
        if path[0] in ("double_blocks", "single_blocks"):
            assert axes[0] == "layers", path


def test_scanned_model_compiles_once():
    cfg = preset("tiny")
    model = Flux(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def forward(state, img, img_ids, txt, txt_ids, t, y, g):
        traces.append(1)
        return nnx.merge(graphdef, state)(img, img_ids, txt, txt_ids, t, y, g)

    for seed in range(3):
        x = forward_inputs(cfg, batch=2, h=4, w=4, txt_len=6, seed=seed)
        forward(state, *(jnp.asarray(x[k]) for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")))
    assert len(traces) == 1
    # The scan body holds one double and one single block, whatever the depth: the HLO does not grow with it.
    deeper = Flux(dataclasses.replace(cfg, depth=6, depth_single_blocks=9), rngs=nnx.Rngs(0))

    def hlo_size(m):
        g, s = nnx.split(m)
        x = forward_inputs(cfg, batch=1, h=2, w=2, txt_len=2)
        args = [jnp.asarray(x[k]) for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")]
        return len(jax.jit(lambda s, *a: nnx.merge(g, s)(*a)).lower(s, *args).as_text())

    assert hlo_size(deeper) == hlo_size(model)


def _remat_gradients(policy: str) -> list[np.ndarray]:
    """Gradients of a fixed loss of the tiny model (same weights, same inputs) under one remat policy, jitted."""
    cfg = preset("tiny")
    model = Flux(cfg, rngs=nnx.Rngs(0))
    configure(model, remat=policy)
    x = forward_inputs(cfg, batch=2, h=2, w=3, txt_len=3)
    args = [jnp.asarray(x[k]) for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")]
    graphdef, state = nnx.split(model)
    grads = jax.jit(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(*args) ** 2)))(state)
    return [np.asarray(g) for g in jax.tree.leaves(grads)]


@functools.cache
def _gradients_without_remat() -> list[np.ndarray]:
    return _remat_gradients("none")


@pytest.mark.parametrize("remat", ["full", "save_matmuls"])
def test_remat_policies_give_identical_gradients(remat):
    for a, b in zip(_gradients_without_remat(), _remat_gradients(remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_bf16_parameters_and_compute():
    cfg = preset("tiny")
    model32 = Flux(cfg, rngs=nnx.Rngs(0))
    model16 = Flux(cfg, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    nnx.update(model16, jax.tree.map(lambda v: v.astype(jnp.bfloat16), nnx.state(model32)))
    assert all(v.get_value().dtype == jnp.bfloat16 for v in _flat(model16).values())
    x = forward_inputs(cfg, batch=1, h=3, w=3, txt_len=4)
    out32, out16 = jax_forward(model32, x), jax_forward(model16, x)
    assert out16.dtype == jnp.bfloat16
    # bf16 keeps ~3 significant digits: the two agree to bf16 accuracy, not bit-exactly.
    assert np.abs(out16.astype(np.float32) - out32).max() < 0.05 * np.abs(out32).max()


def test_fp8_kernels_are_dequantised_inside_the_matmul():
    cfg = preset("tiny")
    model = Flux(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    fp8 = jax.tree.map(lambda v: v.astype(jnp.float8_e4m3fn) if v.ndim >= 2 else v, state)
    deq = jax.tree.map(lambda v: v.astype(jnp.float32), fp8)
    graphdef = nnx.graphdef(model)
    x = forward_inputs(cfg, batch=1, h=2, w=2, txt_len=2)
    out_fp8 = jax_forward(nnx.merge(graphdef, fp8), x)
    out_deq = jax_forward(nnx.merge(graphdef, deq), x)
    # Same values, different fusion of the cast into the matmul: equal up to fp32 summation order.
    np.testing.assert_allclose(out_fp8, out_deq, atol=1e-6, rtol=0)


def test_guidance_required_for_dev_models():
    cfg = preset("tiny")
    model = Flux(cfg, rngs=nnx.Rngs(0))
    x = forward_inputs(cfg, batch=1, h=2, w=2, txt_len=2)
    with pytest.raises(ValueError, match="guidance"):
        model(*(jnp.asarray(x[k]) for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")))


def test_attention_implementations_agree_on_cpu():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 200, 3, 64)), jnp.float32) for _ in range(3))
    ref = attention(q, k, v, impl="xla")
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla").reshape(2, 200, 192)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), atol=1e-5)
    from flux_jax.model.attention import splash_attention

    try:  # the Pallas TPU kernel in interpret mode runs on CPU; skip only if this jax build lacks the interpreter
        splash = splash_attention(q, k, v, interpret=True).reshape(2, 200, 192)
    except NotImplementedError as e:  # pragma: no cover
        pytest.skip(f"splash interpret mode unavailable: {e}")
    np.testing.assert_allclose(np.asarray(splash), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        attention(q, k, v, impl="flash3")
