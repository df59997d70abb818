"""Double-stream and single-stream Flux blocks, created stacked (leading "layers" axis) for `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.model.attention import attention
from flux_jax.model.config import FluxConfig
from flux_jax.model.layers import Identity, Linear, Modulation, QKNorm, modulate
from flux_jax.model.rope import apply_rope
from flux_jax.sharding import constrain

ACT = ("act_batch", "act_seq", "act_embed")


def _split_heads(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, L, 3*H] -> q, k, v [B, L, heads, head_dim]; BFL order is (K=3, heads, head_dim), K outermost."""
    b, length, width = qkv.shape
    qkv = qkv.reshape(b, length, 3, heads, width // (3 * heads))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return tuple(constrain(t, ("act_batch", "act_seq", "act_heads", None)) for t in (q, k, v))


class SelfAttention(nnx.Module):
    """Parameters of BFL `SelfAttention` (qkv, norm, proj); the attention itself spans both streams."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, stack: int | None, param_dtype, dtype):
        kw = dict(rngs=rngs, stack=stack, param_dtype=param_dtype, dtype=dtype)
        h = cfg.hidden_size
        self.qkv = Linear(h, 3 * h, axes=("embed", "qkv"), bias=cfg.qkv_bias, **kw)
        self.norm = QKNorm(cfg.head_dim, stack=stack, param_dtype=param_dtype)
        self.proj = Linear(h, h, axes=("heads", "embed"), **kw)


def make_mlp(cfg: FluxConfig, **kw) -> nnx.List:
    """BFL `nn.Sequential(Linear, GELU(tanh), Linear)`; index 1 is a placeholder so keys read `mlp.0` / `mlp.2`."""
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    return nnx.List([Linear(h, m, axes=("embed", "mlp"), **kw), Identity(), Linear(m, h, axes=("mlp", "embed"), **kw)])


def run_mlp(mlp: nnx.List, x: jax.Array) -> jax.Array:
    hidden = jax.nn.gelu(mlp[0](x), approximate=True)
    return mlp[2](constrain(hidden, ("act_batch", "act_seq", "act_mlp")))


class DoubleStreamBlock(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, stack: int | None = None, param_dtype=jnp.float32,
                 dtype=jnp.float32, attention_impl: str = "xla"):  # fmt: skip
        kw = dict(rngs=rngs, stack=stack, param_dtype=param_dtype, dtype=dtype)
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_impl = attention_impl
        self.img_mod = Modulation(h, double=True, **kw)
        self.img_attn = SelfAttention(cfg, **kw)
        self.img_mlp = make_mlp(cfg, **kw)
        self.txt_mod = Modulation(h, double=True, **kw)
        self.txt_attn = SelfAttention(cfg, **kw)
        self.txt_mlp = make_mlp(cfg, **kw)

    def __call__(self, img: jax.Array, txt: jax.Array, vec: jax.Array, pe: jax.Array):
        (img_m1, img_m2), (txt_m1, txt_m2) = self.img_mod(vec), self.txt_mod(vec)

        def qkv(attn: SelfAttention, x: jax.Array, m1) -> tuple[jax.Array, ...]:
            q, k, v = _split_heads(attn.qkv(modulate(x, m1[0], m1[1])), self.num_heads)
            q, k = attn.norm(q, k, v)
            return q, k, v

        img_q, img_k, img_v = qkv(self.img_attn, img, img_m1)
        txt_q, txt_k, txt_v = qkv(self.txt_attn, txt, txt_m1)
        # Joint attention over [txt; img], text first (BFL order); RoPE rotates both, txt ids are zeros.
        q = apply_rope(jnp.concatenate([txt_q, img_q], axis=1), pe)
        k = apply_rope(jnp.concatenate([txt_k, img_k], axis=1), pe)
        v = jnp.concatenate([txt_v, img_v], axis=1)
        attn = attention(q, k, v, impl=self.attention_impl)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_m1[2] * self.img_attn.proj(img_attn)
        img = img + img_m2[2] * run_mlp(self.img_mlp, modulate(img, img_m2[0], img_m2[1]))
        txt = txt + txt_m1[2] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_m2[2] * run_mlp(self.txt_mlp, modulate(txt, txt_m2[0], txt_m2[1]))
        return constrain(img, ACT), constrain(txt, ACT)


class SingleStreamBlock(nnx.Module):
    """BFL `SingleStreamBlock`: fused linear1 = [q; k; v; mlp_in], fused linear2 = [attn_out; mlp_out] -> H."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, stack: int | None = None, param_dtype=jnp.float32,
                 dtype=jnp.float32, attention_impl: str = "xla"):  # fmt: skip
        kw = dict(rngs=rngs, stack=stack, param_dtype=param_dtype, dtype=dtype)
        h, m = cfg.hidden_size, cfg.mlp_hidden_dim
        self.num_heads = cfg.num_heads
        self.attention_impl = attention_impl
        self.qkv_width = sum(cfg.qkv_split)
        self.linear1 = Linear(h, self.qkv_width + m, axes=("embed", "mlp"), **kw)
        self.linear2 = Linear(h + m, h, axes=("mlp", "embed"), **kw)
        self.norm = QKNorm(cfg.head_dim, stack=stack, param_dtype=param_dtype)
        self.modulation = Modulation(h, double=False, **kw)

    def __call__(self, x: jax.Array, vec: jax.Array, pe: jax.Array) -> jax.Array:
        ((shift, scale, gate),) = self.modulation(vec)
        fused = self.linear1(modulate(x, shift, scale))
        qkv, mlp = fused[..., : self.qkv_width], fused[..., self.qkv_width :]
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(apply_rope(q, pe), apply_rope(k, pe), v, impl=self.attention_impl)
        mlp = constrain(jax.nn.gelu(mlp, approximate=True), ("act_batch", "act_seq", "act_mlp"))
        out = self.linear2(jnp.concatenate([attn, mlp], axis=-1))
        return constrain(x + gate * out, ACT)
