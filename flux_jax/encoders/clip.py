"""The CLIP text tower (transformers `CLIPTextModel`, no projection) in Flax NNX; Flux's pooled encoder.

Token + learned position embeddings, causal pre-LN encoder layers with quick_gelu MLPs, a final
LayerNorm, and the pooled output taken at the end-of-text position. Flux uses only the pooled
output (`vector_in`), but the last hidden state is returned too.
"""

from __future__ import annotations

import dataclasses
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

# transformers' marker for checkpoints from before it fixed eos_token_id (PR #24773): those pool at
# argmax(input_ids), which is the end-of-text token only because it has the largest id.
LEGACY_EOS_TOKEN_ID = 2
# transformers >= 5 saves CLIPTextModel without this prefix; older files (FLUX.1 `text_encoder/`) have it.
LEGACY_PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Text-tower hyperparameters (transformers `CLIPTextConfig` names)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # FLUX.1's text_encoder config still says 2 (legacy pooling); new configs say 49407.
    eos_token_id: int = LEGACY_EOS_TOKEN_ID

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP activation {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def clip_l(cls) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14 text tower, as in FLUX.1 `text_encoder/`."""
        return cls()

    @classmethod
    def tiny(cls, eos_token_id: int = LEGACY_EOS_TOKEN_ID) -> CLIPTextConfig:
        return cls(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            eos_token_id=eos_token_id,
        )

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> CLIPTextConfig:
        """From a `CLIPTextConfig` dict, or a full `CLIPConfig` dict (its `text_config` is used)."""
        cfg = cfg.get("text_config", cfg)
        default = cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: type(getattr(default, k))(cfg[k]) for k in fields if cfg.get(k) is not None})

    def to_hf(self) -> dict[str, Any]:
        """Keyword arguments for transformers `CLIPTextConfig` giving the same model."""
        return dataclasses.asdict(self)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Where transformers' CLIPTextModel pools, per sequence [B] (argmax returns the first maximum, as
    torch's does)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    # First occurrence of the configured id: the pad token may equal it, so "last" would be wrong.
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis, statistics in float32."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=-1, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(x.dtype)


class CLIPLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.act = cfg.hidden_act
        d = cfg.hidden_size
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, param_dtype)
        self.q_proj = dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.k_proj = dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.v_proj = dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.out_proj = dense(d, d, ("heads", "embed"), dtype, param_dtype, rngs)
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, param_dtype)
        self.fc1 = dense(d, cfg.intermediate_size, ("embed", "mlp"), dtype, param_dtype, rngs)
        self.fc2 = dense(cfg.intermediate_size, d, ("mlp", "embed"), dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
        """x [B, L, D]; mask_bias [B or 1, 1, L, L] additive (causal, plus padding if given)."""
        b, n, _ = x.shape
        h = self.layer_norm1(x)
        q, k, v = (p(h).reshape(b, n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.out_proj(attention(q, k, v, mask_bias, divisor=np.sqrt(self.head_dim)))
        return x + self.fc2(ACTIVATIONS[self.act](self.fc1(self.layer_norm2(x))))


class CLIPTextModel(nnx.Module):
    """Token ids [B, L] -> (last_hidden_state [B, L, D], pooled [B, D])."""

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        d = config.hidden_size

        def embed(n: int, axes: tuple[str | None, str]) -> nnx.Embed:
            return nnx.Embed(
                n,
                d,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_metadata={"logical_axes": axes},
                rngs=rngs,
            )

        self.token_embedding = embed(config.vocab_size, ("vocab", "embed"))
        self.position_embedding = embed(config.max_position_embeddings, (None, "embed"))
        self.layers = nnx.List([CLIPLayer(config, dtype, param_dtype, rngs) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = LayerNorm(d, config.layer_norm_eps, param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`attention_mask` [B, L] (1 = attend) is optional; Flux passes none (the mask is causal anyway)."""
        input_ids = jnp.asarray(input_ids)
        n = input_ids.shape[1]
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {n} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        neg = jnp.finfo(jnp.float32).min
        allowed = jnp.tril(jnp.ones((n, n), dtype=bool))[None, None]  # [1, 1, Lq, Lk]
        if attention_mask is not None:
            allowed = allowed & (jnp.asarray(attention_mask)[:, None, None, :] != 0)
        mask_bias = jnp.where(allowed, 0.0, neg)

        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(n))[None]
        for layer in self.layers:
            x = layer(x, mask_bias)
        x = self.final_layer_norm(x)
        return x, x[jnp.arange(x.shape[0]), eos_positions(input_ids, self.config.eos_token_id)]


# --------------------------------------------------------------------------------------------------
# Checkpoint key table (transformers >= 5 names; the legacy `text_model.` prefix is stripped on load)

_LAYER = "encoder.layers.{i}"
CLIP_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("token_embedding.embedding", "embeddings.token_embedding.weight"),
    KeyRule("position_embedding.embedding", "embeddings.position_embedding.weight"),
    *(
        KeyRule(f"layers.{{i}}.{name}.{leaf}", f"{_LAYER}.{torch_mod}.{torch_leaf}", tr)
        for name, torch_mod in (
            ("q_proj", "self_attn.q_proj"),
            ("k_proj", "self_attn.k_proj"),
            ("v_proj", "self_attn.v_proj"),
            ("out_proj", "self_attn.out_proj"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
        )
        for leaf, torch_leaf, tr in (("kernel", "weight", Transform.LINEAR), ("bias", "bias", Transform.COPY))
    ),
    *(
        KeyRule(f"{nnx_mod}.{leaf}", f"{torch_mod}.{torch_leaf}")
        for nnx_mod, torch_mod in (
            ("layers.{i}.layer_norm1", f"{_LAYER}.layer_norm1"),
            ("layers.{i}.layer_norm2", f"{_LAYER}.layer_norm2"),
            ("final_layer_norm", "final_layer_norm"),
        )
        for leaf, torch_leaf in (("scale", "weight"), ("bias", "bias"))
    ),
)
# position_ids is a non-persistent buffer that checkpoints from older transformers saved anyway.
CLIP_KEY_TABLE = KeyTable(name="CLIP text model", rules=CLIP_KEY_RULES, ignored=(r"embeddings\.position_ids",))


def _strip_legacy_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    if not any(k.startswith(LEGACY_PREFIX) for k in state):
        return dict(state)
    # Keys without the prefix in a prefixed file stay as they are and are reported as unexpected.
    return {k.removeprefix(LEGACY_PREFIX): v for k, v in state.items()}


def infer_clip_config(state: Mapping[str, Any], base: CLIPTextConfig = CLIPTextConfig()) -> CLIPTextConfig:
    """Sizes from tensor shapes; heads, activation, eps and eos_token_id come from `base`."""
    state = _strip_legacy_prefix(state)
    try:
        tok = state["embeddings.token_embedding.weight"]
        pos = state["embeddings.position_embedding.weight"]
        fc1 = state["encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise CheckpointError(f"CLIP: cannot infer the architecture ({e} missing); pass a CLIPTextConfig") from e
    layers = 0
    while f"encoder.layers.{layers}.layer_norm1.weight" in state:
        layers += 1
    return dataclasses.replace(
        base,
        vocab_size=tok.shape[0],
        hidden_size=tok.shape[1],
        max_position_embeddings=pos.shape[0],
        intermediate_size=fc1.shape[0],
        num_hidden_layers=layers,
    )


def load_clip(
    state: Mapping[str, np.ndarray], config: CLIPTextConfig | None = None, dtype: jnp.dtype = jnp.float32
) -> CLIPTextModel:
    """Build the text tower from a `CLIPTextModel` state dict (with or without the `text_model.` prefix).

    Without `config`, sizes come from the shapes and the CLIP-L defaults supply the head count,
    activation and eos_token_id, so pass the checkpoint's config for anything but CLIP-L.
    """
    state = _strip_legacy_prefix(state)
    config = config or infer_clip_config(state)
    graphdef, abstract = abstract_params(
        lambda: CLIPTextModel(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    flat = import_state(CLIP_KEY_TABLE, state, param_shapes(abstract))
    return merge_params(graphdef, abstract, flat, dtype)


def export_clip(model: CLIPTextModel, *, legacy_prefix: bool = False) -> dict[str, np.ndarray]:
    """The weights as a `CLIPTextModel` state dict; `legacy_prefix` adds `text_model.` (transformers < 5)."""
    out = export_state(CLIP_KEY_TABLE, model_params(model))
    return {(LEGACY_PREFIX if legacy_prefix else "") + k: v for k, v in out.items()}
