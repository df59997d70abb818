"""Scaled dot-product attention behind one function with selectable kernels.

- "xla": plain einsum + fp32 softmax; runs everywhere and is the reference the parity tests use.
- "cudnn": cuDNN flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention(implementation="cudnn")`).
- "splash": the Pallas splash-attention kernel on TPU (full, unmasked attention as Flux needs).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn", "splash"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn", "splash")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: AttentionImpl = "xla") -> jax.Array:
    """q, k, v: [B, L, heads, head_dim] -> [B, L, heads * head_dim]. No mask (Flux attends to every token)."""
    b, length, heads, head_dim = q.shape
    if impl == "xla":
        out = _xla_attention(q, k, v)
    elif impl == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    elif impl == "splash":
        out = _splash_attention(q, k, v)
    else:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    return out.reshape(b, length, heads * head_dim)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)


@functools.cache
def _splash_kernel(q_len: int, kv_len: int, heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(heads)])
    sizes = sk.BlockSizes(
        block_q=block, block_kv_compute=block, block_kv=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Splash attention wants [heads, L, D] per example, L a multiple of its block size, and q pre-scaled."""
    b, length, heads, head_dim = q.shape
    block = min(512, 128 * math.ceil(length / 128))
    padded = block * math.ceil(length / block)
    pad = padded - length

    def prep(x):
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x

    qh, kh, vh = prep(q * (1.0 / math.sqrt(head_dim))), prep(k), prep(v)
    if pad:
        # Padded keys must not receive attention: push their logits to -inf by a segment mask.
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

        seg = jnp.concatenate([jnp.zeros((length,), jnp.int32), jnp.ones((pad,), jnp.int32)])
        segment_ids = sk.SegmentIds(q=seg, kv=seg)
    else:
        segment_ids = None
    kernel = _splash_kernel(padded, padded, heads, block, interpret)
    out = jax.vmap(lambda a, bb, c: kernel(a, bb, c, segment_ids=segment_ids))(qh, kh, vh)
    return jnp.transpose(out[:, :, :length], (0, 2, 1, 3))
