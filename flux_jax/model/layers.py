"""Flux building blocks that hold parameters: linear layers, embedders, norms, modulation, final layer.

Every parameter carries its logical axis names as the variable metadata `logical_axes`, so a mesh config can shard
the model without touching this code (see `flux_jax.sharding`). Layers that live in the stacked (scanned) blocks
are created with `stack=N` and get a leading "layers" axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]


def _stack_axes(stack: int | None, axes: Axes) -> Axes:
    return (("layers",) if stack else ()) + tuple(axes)


def _stack_shape(stack: int | None, shape: Sequence[int]) -> tuple[int, ...]:
    return ((stack,) if stack else ()) + tuple(shape)


class Linear(nnx.Module):
    """y = x @ kernel + bias, with the kernel in [in, out] (the transpose of PyTorch's weight).

    The kernel may be stored in a narrower dtype than the compute dtype (bf16, or float8_e4m3fn for a frozen base):
    it is cast inside the matmul, so under jit XLA fuses the dequantisation instead of materialising a copy.
    `lora` is an optional adapter (see `flux_jax.model.lora`) whose output is added to y.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        bias: bool = True,
        stack: int | None = None,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        # PyTorch's default Linear init (uniform +-1/sqrt(fan_in)); only used for random models.
        bound = 1.0 / math.sqrt(in_features)
        kshape = _stack_shape(stack, (in_features, out_features))
        self.kernel = nnx.Param(
            jax.random.uniform(rngs.params(), kshape, param_dtype, -bound, bound),
            logical_axes=_stack_axes(stack, axes),
        )
        self.bias = (
            nnx.Param(
                jax.random.uniform(rngs.params(), _stack_shape(stack, (out_features,)), param_dtype, -bound, bound),
                logical_axes=_stack_axes(stack, (axes[1],)),
            )
            if bias
            else None
        )
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.lora = nnx.data(None)  # a `flux_jax.model.lora.LoRA` once attached

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        # Accumulate in fp32 even for bf16 inputs (what the MXU / tensor cores do natively).
        y = jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora is not None:
            y = y + self.lora(x).astype(jnp.float32)
        return y.astype(self.dtype)


class MLPEmbedder(nnx.Module):
    """BFL `MLPEmbedder`: in_layer -> SiLU -> out_layer (time_in, vector_in, guidance_in)."""

    def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.in_layer = Linear(in_dim, hidden, axes=("in_feat", "embed"), **kw)
        self.out_layer = Linear(hidden, hidden, axes=("embed", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (BFL `nn.LayerNorm(elementwise_affine=False, eps=1e-6)`), in fp32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """BFL `RMSNorm` over head_dim: normalised in fp32, cast back, then scaled by the learnt `scale`."""

    def __init__(self, dim: int, *, stack: int | None = None, param_dtype=jnp.float32):
        self.scale = nnx.Param(
            jnp.ones(_stack_shape(stack, (dim,)), param_dtype), logical_axes=_stack_axes(stack, ("head_dim",))
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
        return (x32 * rrms).astype(x.dtype) * self.scale[...].astype(x.dtype)


class QKNorm(nnx.Module):
    def __init__(self, dim: int, *, stack: int | None = None, param_dtype=jnp.float32):
        self.query_norm = RMSNorm(dim, stack=stack, param_dtype=param_dtype)
        self.key_norm = RMSNorm(dim, stack=stack, param_dtype=param_dtype)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class Modulation(nnx.Module):
    """BFL `Modulation`: Linear(SiLU(vec)) split into (shift, scale, gate) triples, each [B, 1, H]."""

    def __init__(self, dim: int, *, double: bool, rngs: nnx.Rngs, stack: int | None, param_dtype, dtype):
        self.multiplier = 6 if double else 3
        self.lin = Linear(
            dim,
            self.multiplier * dim,
            axes=("embed", "mod"),
            rngs=rngs,
            stack=stack,
            param_dtype=param_dtype,
            dtype=dtype,
        )

    def __call__(self, vec: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        out = self.lin(jax.nn.silu(vec))[:, None, :]
        chunks = jnp.split(out, self.multiplier, axis=-1)
        return [tuple(chunks[i : i + 3]) for i in range(0, self.multiplier, 3)]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (1 + scale) * layer_norm(x) + shift


class Identity(nnx.Module):
    """Parameter-free placeholder that keeps sequence indices aligned with BFL's `nn.Sequential` (e.g. `mlp.2`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class LastLayer(nnx.Module):
    """BFL `LastLayer`: adaLN_modulation = [SiLU, Linear(H -> 2H)] giving (shift, scale); then `linear` H -> out."""

    def __init__(self, hidden: int, out_channels: int, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.adaLN_modulation = nnx.List([Identity(), Linear(hidden, 2 * hidden, axes=("embed", "mod"), **kw)])
        self.linear = Linear(hidden, out_channels, axes=("embed", "in_feat"), **kw)

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation[1](jax.nn.silu(vec)), 2, axis=-1)
        x = (1 + scale[:, None, :]) * layer_norm(x) + shift[:, None, :]
        return self.linear(x)


def timestep_frequencies(dim: int = 256, max_period: float = 10_000.0) -> np.ndarray:
    """BFL's frequency table exp(-ln(max_period) * k / half), as a constant with a correctly rounded exp.

    The exponent is formed in fp32 exactly as BFL does; the exp is taken in float64 and rounded once. fp32 `exp`
    kernels (XLA's, PyTorch's) are only accurate to about one ulp and disagree with each other in a few entries;
    with arguments up to 1000 x guidance, one ulp of a frequency moves sin/cos by up to ~2e-4, so a backend's
    libm would otherwise leak into the embedding. A constant makes it identical on CPU, GPU and TPU.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0):
    """BFL `timestep_embedding`: t (or guidance) x 1000 -> [cos(args), sin(args)], frequencies in fp32."""
    t = time_factor * t.astype(jnp.float32)
    freqs = jnp.asarray(timestep_frequencies(dim, max_period))
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb
