"""`model.attention`: the splash kernel against XLA attention, choosing the kernel, and splash in the TPU step.

Splash runs in Pallas interpret mode on CPU (the same kernel code, interpreted), unsharded and per shard under an
8-device mesh. The AOT test compiles the trainer's real step (``abstract_step`` on libtpu's compile-only devices)
in a subprocess with libtpu's environment, as ``flux-jax plan`` does; it is skipped where libtpu is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from flux_jax.model.attention import (
    SPLASH_AXES,
    AttentionError,
    _xla_attention,
    attention,
    resolve_attention,
    splash_attention,
    splash_padding,
)
from flux_jax.planning.topology import aot_environment, parse_target
from flux_jax.sharding import active_spec, make_mesh, use_mesh

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (tpu extra) not installed")

HEADS, HEAD_DIM = 2, 128


def _qkv(batch: int, length: int, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, length, HEADS, HEAD_DIM)), jnp.float32) for _ in range(3))


def _loss(fn):
    # A fixed, non-uniform cotangent, so every output element's gradient path is exercised.
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _splash(q, k, v):
    return splash_attention(q, k, v, interpret=True)


# 256 is a multiple of 128 (no padding, one 256-block); 200 pads to 256 with the padding masked by segment ids.
@pytest.mark.parametrize("length", [256, 200])
def test_splash_matches_xla_attention_and_its_gradient(length):
    q, k, v = _qkv(1, length)
    assert splash_padding(length) == (256, 256)
    ref = _xla_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(jax.jit(_splash)(q, k, v)), np.asarray(ref), atol=1e-5, rtol=0)
    for got, want in zip(_loss(_splash)(q, k, v), _loss(_xla_attention)(q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_splash_runs_per_shard_under_a_mesh():
    # data 2 x fsdp 2 split the 4 examples, tensor 2 the 2 heads: each device attends over its own (example, head)
    # with nothing moved between devices: the compiled program has no collective at all.
    q, k, v = _qkv(4, 128, seed=1)
    mesh = make_mesh(2, 2, 2)
    with use_mesh(mesh):
        _, spec = active_spec(SPLASH_AXES, q.shape)
        assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
        placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        fn = jax.jit(_splash)
        out = fn(*placed)
        hlo = fn.lower(*placed).compile().as_text()
    assert out.sharding.spec == spec
    np.testing.assert_allclose(np.asarray(out), np.asarray(_xla_attention(q, k, v)), atol=1e-5, rtol=0)
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert op not in hlo


def test_splash_blocks_for_flux_lengths():
    # 512 text tokens + 1024 (512 px) / 4096 (1024 px) image tokens: unpadded 512-blocks; other buckets pad to 128.
    assert splash_padding(512 + 1024) == (1536, 512)
    assert splash_padding(512 + 4096) == (4608, 512)
    assert splash_padding(512 + 56 * 16) == (1408, 128)  # a 256x896 bucket
    assert splash_padding(512 + 60 * 32) == (2432, 128)
    assert splash_padding(512 + 3840) == (4352, 256)  # a 512x1920 bucket
    assert splash_padding(640 + 77) == (768, 256)


# --------------------------------------------------------------------------------------------------
# Choosing the kernel


def test_auto_takes_the_platforms_kernel():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve_attention("auto", platform="cpu", head_dim=128, dtype=f32) == ("xla", None)
    assert resolve_attention("auto", platform="tpu", head_dim=128, dtype=bf16) == ("splash", None)
    assert resolve_attention("auto", platform="tpu", head_dim=16, dtype=f32) == ("splash", None)  # any head_dim
    assert resolve_attention("auto", platform="gpu", head_dim=128, dtype=bf16) == ("cudnn", None)
    assert resolve_attention("auto", platform="cuda", head_dim=128, dtype=bf16) == ("cudnn", None)
    assert resolve_attention("auto", platform="rocm", head_dim=128, dtype=bf16) == ("xla", None)
    assert resolve_attention("auto", platform="gpu", head_dim=256, dtype=bf16, compute_capability="9.0")[0] == "cudnn"
    # An explicit kernel that can run is kept as it is.
    assert resolve_attention("xla", platform="tpu", head_dim=16, dtype=f32) == ("xla", None)
    assert resolve_attention("splash", platform="tpu", head_dim=128, dtype=bf16) == ("splash", None)


def test_auto_falls_back_to_xla_with_the_reason():
    impl, why = resolve_attention("auto", platform="gpu", head_dim=4, dtype=jnp.bfloat16)
    assert impl == "xla"
    assert why == ("attention auto: cudnn cannot run here (cuDNN flash attention needs head_dim a multiple of 8 and "
                   "at most 128, not 4); using xla")  # fmt: skip
    impl, why = resolve_attention("auto", platform="gpu", head_dim=128, dtype=jnp.float32)
    assert impl == "xla" and "takes bfloat16 or float16, not float32" in why
    # 256 needs Hopper; without a compute capability (or before 9.0) cuDNN flash stops at 128.
    ampere = resolve_attention("auto", platform="gpu", head_dim=256, dtype=jnp.bfloat16, compute_capability="8.0")
    assert ampere[0] == "xla"


def test_a_kernel_that_cannot_run_is_a_clear_error():
    with pytest.raises(AttentionError, match="model.attention: splash cannot run here: the splash kernel runs on TPU"):
        resolve_attention("splash", platform="cpu", head_dim=128, dtype=jnp.float32)
    with pytest.raises(AttentionError, match="model.attention: cudnn cannot run here: .* not float32"):
        resolve_attention("cudnn", platform="gpu", head_dim=128, dtype=jnp.float32)
    with pytest.raises(AttentionError, match="unknown attention implementation 'flash3'"):
        resolve_attention("flash3", platform="tpu", head_dim=128, dtype=jnp.float32)


def test_the_trainers_builder_resolves_and_logs(caplog):
    from flux_jax.model.config import preset
    from flux_jax.run_config import ModelConfig
    from flux_jax.train.build import with_attention

    cpu = jax.devices()[0]
    with caplog.at_level(logging.INFO, logger="flux_jax"):
        resolved, why = with_attention(ModelConfig(compute_dtype="fp32"), preset("tiny"), device=cpu)
    assert (resolved.attention, why) == ("xla", None) and "attention auto -> xla" in caplog.text

    class FakeGpu:  # what `with_attention` reads from a device: an fp32 run on a GPU falls back, logged
        platform, compute_capability = "gpu", "9.0"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flux_jax"):
        resolved, why = with_attention(ModelConfig(compute_dtype="fp32"), preset("tiny"), device=FakeGpu())
    assert resolved.attention == "xla" and why in caplog.text and "cudnn cannot run here" in why
    with pytest.raises(AttentionError):
        with_attention(ModelConfig(attention="splash"), preset("tiny"), device=cpu)


def test_auto_in_a_built_model_is_xla_on_cpu():
    q, k, v = _qkv(1, 40)
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, impl="auto")), np.asarray(attention(q, k, v)))


# --------------------------------------------------------------------------------------------------
# The TPU step, compiled ahead of time (libtpu)

# The trainer's step for the recipe (configs/dev2pro_lora.yaml with its v5e-8 / v6e-8 mesh: FSDP over 8 chips,
# batch 8; remat pinned to full, a policy that saves memory as remat auto does for the full model) on a Flux
# narrowed to 2 heads of the real head_dim 128, one block of each kind, at the real sequence lengths (512 text
# tokens + the image's), so each compile takes seconds instead of minutes.
AOT_STEP = """
import json, re, sys
from flux_jax.model.config import FluxConfig
from flux_jax.planning.topology import devices, parse_target
from flux_jax.run_config import load_config
from flux_jax.sharding import make_mesh
from flux_jax.train.abstract import abstract_step

arch = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=256, num_heads=2,
                  depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))
mesh = make_mesh(1, 8, 1, devices=devices(parse_target(sys.argv[1])))
for item in sys.argv[2:]:
    resolution, attention = item.split(":")
    cfg = load_config("configs/dev2pro_lora.yaml", [f"model.attention={attention}", f"data.resolution={resolution}",
                                                    "model.remat=full"])
    step = abstract_step(cfg, mesh, model_config=arch)
    compiled = step.compile(step.batch(batch_size=8, grad_accum=1, resolution=int(resolution), text_len=512))
    lines, memory = compiled.as_text().splitlines(), compiled.memory_analysis()
    print(json.dumps({
        "resolution": int(resolution), "attention": attention, "kernel": step.attention,
        "kernels": [line.split(" = ", 1)[1].split(" custom-call(")[0] for line in lines
                    if 'custom_call_target="tpu_custom_call"' in line],
        "gathered": [line.split(" = ", 1)[1].split(" all-gather")[0] for line in lines
                     if re.search(r" all-gather(-start)?\\(", line)],
        "temp": memory.temp_size_in_bytes,
        "total": memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                 - memory.alias_size_in_bytes,
    }))
"""


def _shapes(hlo_type: str) -> list[tuple[int, ...]]:
    """The array shapes in an HLO result type such as ``(f32[512,128]{1,0}, bf16[2,1536,128]{2,1,0})``."""
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"[a-z0-9]+\[([\d,]*)\]", hlo_type)]


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["v5e-8", "v6e-8"])
def test_tpu_step_runs_splash_per_chip_and_saves_memory_at_1024px(name):
    items = [f"{resolution}:{attention}" for resolution in (512, 1024) for attention in ("auto", "xla")]
    env = {**os.environ, **aot_environment(parse_target(name))}
    run = subprocess.run([sys.executable, "-c", AOT_STEP, name, *items], env=env, text=True, capture_output=True)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    found = {(row["resolution"], row["attention"]): row for row in rows}
    for resolution in (512, 1024):
        auto, xla = found[resolution, "auto"], found[resolution, "xla"]
        length = 512 + (resolution // 16) ** 2  # 1536 / 4608: multiples of 512, so unpadded
        assert (auto["kernel"], xla["kernel"]) == ("splash", "xla")
        assert auto["kernels"] and not xla["kernels"]  # the Pallas kernels are TPU custom calls
        # Per chip: each kernel (forward, dq, dkv of both blocks) sees one example's 2 heads x 1536 x 128, never the
        # global batch of 8; and no all-gather assembles the global q, k or v (only FSDP's weight gathers remain).
        kernel_shapes = [s for result in auto["kernels"] for s in _shapes(result)]
        assert (HEADS, length, HEAD_DIM) in kernel_shapes
        assert max(math.prod(s) for s in kernel_shapes) <= HEADS * length * HEAD_DIM
        global_q = 8 * length * HEADS * HEAD_DIM
        assert max(math.prod(s) for result in auto["gathered"] for s in _shapes(result)) < global_q
        if resolution == 1024:
            # 4608 tokens: XLA's scores (heads x 4608^2 per example) dominate; splash needs about a quarter of the
            # memory (measured on v6e-8: 70.1 MB per chip against 255.3 MB).
            assert auto["total"] < 0.5 * xla["total"] and auto["temp"] < 0.5 * xla["temp"], (auto, xla)
        else:
            # 1536 tokens: the score matrix is only ~12 q-sized buffers, about what splash's f32 residuals (lane-
            # padded log-sum-exp, dq / dk / dv) and its [heads, L, D] layout copies cost, so the two are close: on
            # v5e-8 splash is lower, on v6e-8 4% higher (17.5 MB per chip against 16.9 MB); XLA's own fusion
            # decides. Splash is never worse by more than that.
            assert auto["total"] < 1.05 * xla["total"], (auto, xla)
