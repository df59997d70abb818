"""Pieces the text encoders (T5, CLIP) share: activations by transformers name, sharded dense layers, attention."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# transformers ACT2FN names used by the T5 and CLIP configs Flux ships with. gelu_new is the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def dense(
    din: int,
    dout: int,
    axes: tuple[str, str],
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
    *,
    use_bias: bool = True,
) -> nnx.Linear:
    """An nnx.Linear whose kernel (and bias) carry logical axis names for sharding."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, divisor: float | None) -> jax.Array:
    """Softmax attention in float32: q, k, v [B, L, H, D]; bias additive, broadcast to [B, H, L, L].

    divisor: the scores are divided by it before the bias is added (CLIP: sqrt(head_dim); T5 folds that factor
    into its weights, None). Returns [B, L, H * D].
    """
    b, n = q.shape[:2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if divisor is not None:
        scores = scores / np.float32(divisor)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, -1)
