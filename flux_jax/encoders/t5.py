"""The T5 v1.1 encoder (transformers `T5EncoderModel`) in Flax NNX; Flux's context encoder.

T5 specifics that matter for parity: RMS layer norm without mean subtraction (statistics in
float32), no 1/sqrt(d) attention scaling (T5 folds it into the initialisation), one relative
position bias table owned by layer 0 and added to the scores of every layer, gated GELU feed
forward, and a final RMS norm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax.encoders.keys import (
    KeyRule,
    KeyTable,
    Transform,
    abstract_params,
    export_state,
    import_state,
    merge_params,
    model_params,
    param_shapes,
)
from flux_jax.encoders.layers import ACTIVATIONS, attention, dense
from flux_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder hyperparameters (transformers `T5Config` names); only the gated (v1.1) feed-forward."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"

    def __post_init__(self) -> None:
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported T5 activation {self.dense_act_fn!r}; known: {sorted(ACTIVATIONS)}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def xxl(cls) -> T5Config:
        """google/t5-v1_1-xxl encoder, as in FLUX.1 `text_encoder_2/`."""
        return cls()

    @classmethod
    def tiny(cls) -> T5Config:
        return cls(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> T5Config:
        """From a transformers `T5Config` dict (`config.json` or `T5Config.to_dict()`)."""
        proj = str(cfg.get("feed_forward_proj", "gated-gelu"))
        # transformers parses "gated-<act>"; v1.1 checkpoints say "gated-gelu" and mean gelu_new.
        if not proj.startswith("gated-"):
            raise ValueError(f"only gated T5 feed-forward (v1.1) is supported, got feed_forward_proj={proj!r}")
        act = proj.removeprefix("gated-")
        act = cfg.get("dense_act_fn") or ("gelu_new" if act == "gelu" else act)
        default = cls()
        fields = {f.name for f in dataclasses.fields(cls)} - {"dense_act_fn"}
        return cls(dense_act_fn=act, **{k: type(getattr(default, k))(cfg[k]) for k in fields if k in cfg})

    def to_hf(self) -> dict[str, Any]:
        """Keyword arguments for transformers `T5Config` giving the same encoder."""
        out = dataclasses.asdict(self)
        out["feed_forward_proj"] = "gated-gelu" if self.dense_act_fn == "gelu_new" else f"gated-{self.dense_act_fn}"
        return out


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket index for every (query, key) pair, [q_len, k_len] int32.

    Computed on the host in float32 with transformers' exact operation order, so the truncation at
    bucket boundaries matches bit for bit (a float64 or fused version moves some boundaries).
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # memory - query
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):  # log(0) only occurs where is_small selects the exact branch
        scaled = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class RMSNorm(nnx.Module):
    """T5LayerNorm: x / rms(x) * weight, no mean subtraction and no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        w = self.scale.get_value()
        # Like transformers: cast back to a half-precision weight dtype before scaling.
        return w * y.astype(w.dtype) if w.dtype != jnp.float32 else w * y


class T5Layer(nnx.Module):
    """One encoder block: pre-norm self-attention, then pre-norm gated feed-forward."""

    def __init__(self, cfg: T5Config, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.d_kv = cfg.d_kv
        self.act = cfg.dense_act_fn
        d, inner = cfg.d_model, cfg.inner_dim
        self.attn_norm = RMSNorm(d, cfg.layer_norm_epsilon, param_dtype)
        self.q = dense(d, inner, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=False)
        self.k = dense(d, inner, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=False)
        self.v = dense(d, inner, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=False)
        self.o = dense(inner, d, ("heads", "embed"), dtype, param_dtype, rngs, use_bias=False)
        self.ff_norm = RMSNorm(d, cfg.layer_norm_epsilon, param_dtype)
        self.wi_0 = dense(d, cfg.d_ff, ("embed", "mlp"), dtype, param_dtype, rngs, use_bias=False)
        self.wi_1 = dense(d, cfg.d_ff, ("embed", "mlp"), dtype, param_dtype, rngs, use_bias=False)
        self.wo = dense(cfg.d_ff, d, ("mlp", "embed"), dtype, param_dtype, rngs, use_bias=False)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x [B, L, D]; bias [B or 1, H, L, L] = position bias plus additive padding mask."""
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).reshape(b, n, self.num_heads, self.d_kv) for p in (self.q, self.k, self.v))
        x = x + self.o(attention(q, k, v, bias, divisor=None))  # T5 folds 1/sqrt(d_kv) into its weights
        h = self.ff_norm(x)
        h = ACTIVATIONS[self.act](self.wi_0(h)) * self.wi_1(h)
        return x + self.wo(h)


class T5Encoder(nnx.Module):
    """`T5EncoderModel`: token ids [B, L] -> last_hidden_state [B, L, d_model]."""

    def __init__(
        self,
        config: T5Config,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_metadata={"logical_axes": ("vocab", "embed")},
            rngs=rngs,
        )
        # transformers keeps this table in block 0 and reuses its output in every block; it lives
        # at the top level here because it is shared.
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets,
            config.num_heads,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            embedding_metadata={"logical_axes": (None, "heads")},
            rngs=rngs,
        )
        self.blocks = nnx.List([T5Layer(config, dtype, param_dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """`attention_mask` [B, L] (1 = attend) is optional; Flux passes none and attends to padding."""
        cfg = self.config
        n = input_ids.shape[1]
        buckets = relative_position_buckets(
            n, n, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        bias = self.relative_attention_bias(jnp.asarray(buckets)).astype(jnp.float32)  # [L, L, H]
        bias = bias.transpose(2, 0, 1)[None]  # [1, H, L, L]
        if attention_mask is not None:
            # Same additive mask as transformers: the most negative finite float on masked keys.
            masked = jnp.asarray(attention_mask)[:, None, None, :] == 0
            bias = bias + jnp.where(masked, jnp.finfo(jnp.float32).min, 0.0)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)


# --------------------------------------------------------------------------------------------------
# Checkpoint key table

_BLOCK = "encoder.block.{i}.layer"
T5_KEY_RULES: tuple[KeyRule, ...] = (
    # T5EncoderModel ties `shared` and `encoder.embed_tokens`; checkpoints hold one or both.
    KeyRule("embed.embedding", "shared.weight", aliases=("encoder.embed_tokens.weight",)),
    KeyRule(
        "relative_attention_bias.embedding",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    KeyRule("blocks.{i}.attn_norm.scale", f"{_BLOCK}.0.layer_norm.weight"),
    KeyRule("blocks.{i}.q.kernel", f"{_BLOCK}.0.SelfAttention.q.weight", Transform.LINEAR),
    KeyRule("blocks.{i}.k.kernel", f"{_BLOCK}.0.SelfAttention.k.weight", Transform.LINEAR),
    KeyRule("blocks.{i}.v.kernel", f"{_BLOCK}.0.SelfAttention.v.weight", Transform.LINEAR),
    KeyRule("blocks.{i}.o.kernel", f"{_BLOCK}.0.SelfAttention.o.weight", Transform.LINEAR),
    KeyRule("blocks.{i}.ff_norm.scale", f"{_BLOCK}.1.layer_norm.weight"),
    KeyRule("blocks.{i}.wi_0.kernel", f"{_BLOCK}.1.DenseReluDense.wi_0.weight", Transform.LINEAR),
    KeyRule("blocks.{i}.wi_1.kernel", f"{_BLOCK}.1.DenseReluDense.wi_1.weight", Transform.LINEAR),
    KeyRule("blocks.{i}.wo.kernel", f"{_BLOCK}.1.DenseReluDense.wo.weight", Transform.LINEAR),
    KeyRule("final_norm.scale", "encoder.final_layer_norm.weight"),
)
T5_KEY_TABLE = KeyTable(name="T5 encoder", rules=T5_KEY_RULES)


def infer_t5_config(state: Mapping[str, Any], base: T5Config = T5Config()) -> T5Config:
    """Read every size from tensor shapes; eps, max distance and activation come from `base`."""
    embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    rel = state.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    wi = state.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    if embed is None or rel is None or wi is None:
        raise CheckpointError("T5: cannot infer the architecture (embedding, bias or wi_0 missing); pass a T5Config")
    layers = 0
    while f"encoder.block.{layers}.layer.0.layer_norm.weight" in state:
        layers += 1
    num_heads = rel.shape[1]
    inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    return dataclasses.replace(
        base,
        vocab_size=embed.shape[0],
        d_model=embed.shape[1],
        d_ff=wi.shape[0],
        num_layers=layers,
        num_heads=num_heads,
        d_kv=inner // num_heads,
        relative_attention_num_buckets=rel.shape[0],
    )


def load_t5(
    state: Mapping[str, np.ndarray], config: T5Config | None = None, dtype: jnp.dtype = jnp.float32
) -> T5Encoder:
    """Build the encoder from a `T5EncoderModel` state dict; decoder keys (full T5) are rejected."""
    config = config or infer_t5_config(state)
    graphdef, abstract = abstract_params(lambda: T5Encoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    flat = import_state(T5_KEY_TABLE, state, param_shapes(abstract))
    return merge_params(graphdef, abstract, flat, dtype)


def export_t5(model: T5Encoder) -> dict[str, np.ndarray]:
    """The weights as a `T5EncoderModel` state dict (both tied embedding names, as `state_dict()` has)."""
    return export_state(T5_KEY_TABLE, model_params(model))
