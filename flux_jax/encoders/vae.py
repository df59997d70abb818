"""The Flux VAE ("AE") in Flax NNX, with latent normalisation and packing helpers.

Same math as diffusers `AutoencoderKL` with the Flux config (and BFL's `AutoEncoder`): no quant
convs, GroupNorm + SiLU resnets, one single-head attention in each mid block, downsampling by
pad-right/bottom-then-stride-2 conv, upsampling by nearest x2 then conv. Activations are NHWC
because that is the layout XLA's convolutions want; the torch checkpoint's OIHW kernels are
transposed once, at load time, by the key table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

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
from flux_jax.errors import CheckpointError

Layout = Literal["diffusers", "bfl"]
LAYOUTS: tuple[Layout, ...] = ("diffusers", "bfl")

# Logical axes: conv kernels are HWIO; biases follow their output channels; norms stay replicated.
_CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
_CONV_BIAS_AXES = ("conv_out",)
_ATTN_KERNEL_AXES = ("conv_in", "conv_out")
_NORM_AXES = (None,)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyperparameters (diffusers names; BFL's are noted where they differ)."""

    in_channels: int = 3
    out_channels: int = 3  # BFL out_ch
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # BFL ch * ch_mult
    layers_per_block: int = 2  # BFL num_res_blocks; the decoder has one more per level
    latent_channels: int = 16  # BFL z_channels
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for Flux)."""
        return 2 ** (self.num_levels - 1)

    @classmethod
    def flux(cls) -> VAEConfig:
        """FLUX.1 dev/schnell: BFL AutoEncoderParams(ch=128, ch_mult=[1, 2, 4, 4], z_channels=16)."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Same structure (4 levels, 16 latent channels) at test size."""
        return cls(block_out_channels=(32, 32, 64, 64), norm_num_groups=8)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers `AutoencoderKL` config dict; refuses options this port does not implement."""
        unsupported = {
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "mid_block_add_attention": True,
            "act_fn": "silu",
        }
        for key, want in unsupported.items():
            if key in cfg and cfg[key] != want:
                raise ValueError(f"unsupported AutoencoderKL option {key}={cfg[key]!r} (Flux uses {want!r})")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != want for t in cfg.get(key, ())):
                raise ValueError(f"unsupported {key} {cfg[key]!r}")
        default = cls()
        return cls(
            in_channels=int(cfg.get("in_channels", default.in_channels)),
            out_channels=int(cfg.get("out_channels", default.out_channels)),
            block_out_channels=tuple(cfg.get("block_out_channels", default.block_out_channels)),
            layers_per_block=int(cfg.get("layers_per_block", default.layers_per_block)),
            latent_channels=int(cfg.get("latent_channels", default.latent_channels)),
            norm_num_groups=int(cfg.get("norm_num_groups", default.norm_num_groups)),
            scaling_factor=float(cfg.get("scaling_factor", default.scaling_factor)),
            # diffusers spells "no shift" as None.
            shift_factor=float(cfg.get("shift_factor", default.shift_factor) or 0.0),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `AutoencoderKL` constructor kwargs for this config."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * self.num_levels,
            "up_block_types": ["UpDecoderBlock2D"] * self.num_levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        }


# --------------------------------------------------------------------------------------------------
# Modules


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over NHWC, statistics in float32 (bf16 variance over 1M pixels is too coarse)."""

    def __init__(self, channels: int, groups: int, eps: float, param_dtype: jnp.dtype):
        self.groups = groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), logical_axes=_NORM_AXES)
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), logical_axes=_NORM_AXES)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = xf.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(x.dtype)


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype, **kw: Any) -> nnx.Conv:
    # torch's Conv2d(padding=k//2) pads symmetrically; downsampling passes its own (VALID) padding.
    kw.setdefault("padding", [(k // 2, k // 2)] * 2)
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata={"logical_axes": _CONV_KERNEL_AXES},
        bias_metadata={"logical_axes": _CONV_BIAS_AXES},
        rngs=rngs,
        **kw,
    )


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """What every sub-module needs besides its channel counts."""

    cfg: VAEConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    rngs: nnx.Rngs

    def norm(self, ch: int) -> GroupNorm:
        return GroupNorm(ch, self.cfg.norm_num_groups, self.cfg.norm_eps, self.param_dtype)

    def conv(self, cin: int, cout: int, k: int = 3, **kw: Any) -> nnx.Conv:
        return _conv(cin, cout, k, self.rngs, self.dtype, self.param_dtype, **kw)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, ctx: _Ctx):
        self.norm1 = ctx.norm(cin)
        self.conv1 = ctx.conv(cin, cout)
        self.norm2 = ctx.norm(cout)
        self.conv2 = ctx.conv(cout, cout)
        # A 1x1 projection only where the channel count changes, as in both reference implementations.
        self.shortcut = ctx.conv(cin, cout, k=1) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return skip + h


class Attention(nnx.Module):
    """Single-head self-attention over all H*W positions (the VAE mid block)."""

    def __init__(self, ch: int, ctx: _Ctx):
        self.norm = ctx.norm(ch)

        def dense() -> nnx.Linear:
            return nnx.Linear(
                ch,
                ch,
                dtype=ctx.dtype,
                param_dtype=ctx.param_dtype,
                kernel_metadata={"logical_axes": _ATTN_KERNEL_AXES},
                bias_metadata={"logical_axes": _CONV_BIAS_AXES},
                rngs=ctx.rngs,
            )

        self.q, self.k, self.v, self.proj_out = dense(), dense(), dense(), dense()

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.norm(x).reshape(b, h * w, c)  # [B, L, C]
        q, k, v = self.q(t), self.k(t), self.v(t)
        scores = jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c).astype(np.float32)
        # Softmax in float32 as diffusers does (upcast_softmax) so bf16 runs do not saturate.
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = self.proj_out(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, ch: int, ctx: _Ctx):
        self.block_1 = ResnetBlock(ch, ch, ctx)
        self.attn_1 = Attention(ch, ctx)
        self.block_2 = ResnetBlock(ch, ch, ctx)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nnx.Module):
    def __init__(self, ch: int, ctx: _Ctx):
        self.conv = ctx.conv(ch, ch, strides=(2, 2), padding="VALID")

    def __call__(self, x: jax.Array) -> jax.Array:
        # Asymmetric zero pad (right and bottom only), then a VALID stride-2 conv: torch's
        # F.pad(x, (0, 1, 0, 1)) in both diffusers and BFL. Symmetric padding would shift the grid.
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    def __init__(self, ch: int, ctx: _Ctx):
        self.conv = ctx.conv(ch, ch)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: resnet blocks, then an optional resample."""

    def __init__(self, blocks: list[ResnetBlock], resample: nnx.Module | None):
        self.block = nnx.List(blocks)
        self.resample = resample

    def __call__(self, x: jax.Array) -> jax.Array:
        for blk in self.block:
            x = blk(x)
        return self.resample(x) if self.resample is not None else x


class Encoder(nnx.Module):
    def __init__(self, ctx: _Ctx):
        cfg = ctx.cfg
        chans = cfg.block_out_channels
        self.conv_in = ctx.conv(cfg.in_channels, chans[0])
        levels = []
        for lvl, cout in enumerate(chans):
            cin = chans[max(lvl - 1, 0)]
            blocks = [ResnetBlock(cin if b == 0 else cout, cout, ctx) for b in range(cfg.layers_per_block)]
            last = lvl == cfg.num_levels - 1
            levels.append(Level(blocks, None if last else Downsample(cout, ctx)))
        self.down = nnx.List(levels)
        self.mid = MidBlock(chans[-1], ctx)
        self.norm_out = ctx.norm(chans[-1])
        # Mean and log-variance, stacked along channels (mean first).
        self.conv_out = ctx.conv(chans[-1], 2 * cfg.latent_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(nnx.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """Levels are stored in execution order (lowest resolution first), like diffusers' `up_blocks`."""

    def __init__(self, ctx: _Ctx):
        cfg = ctx.cfg
        chans = cfg.block_out_channels[::-1]
        self.conv_in = ctx.conv(cfg.latent_channels, chans[0])
        self.mid = MidBlock(chans[0], ctx)
        levels = []
        for lvl, cout in enumerate(chans):
            cin = chans[max(lvl - 1, 0)]
            blocks = [ResnetBlock(cin if b == 0 else cout, cout, ctx) for b in range(cfg.layers_per_block + 1)]
            last = lvl == cfg.num_levels - 1
            levels.append(Level(blocks, None if last else Upsample(cout, ctx)))
        self.up = nnx.List(levels)
        self.norm_out = ctx.norm(chans[-1])
        self.conv_out = ctx.conv(chans[-1], cfg.out_channels)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid(self.conv_in(z))
        for level in self.up:
            x = level(x)
        return self.conv_out(nnx.silu(self.norm_out(x)))


class AutoEncoder(nnx.Module):
    """The Flux VAE. Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels."""

    def __init__(
        self,
        config: VAEConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        ctx = _Ctx(config, dtype, param_dtype, rngs)
        self.encoder = Encoder(ctx)
        self.decoder = Decoder(ctx)

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, C_in] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(images)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, logvar

    def encode(self, images: jax.Array) -> jax.Array:
        """Latent mean (BFL builds its AE with sample_z=False), un-normalised."""
        return self.encode_moments(images)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Un-normalised latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C_out]."""
        return self.decoder(latents)


# --------------------------------------------------------------------------------------------------
# Latent helpers


def normalize_latents(z: jax.Array, config: VAEConfig = VAEConfig()) -> jax.Array:
    """VAE latents -> the transformer's latent space: scale * (z - shift)."""
    return config.scaling_factor * (z - config.shift_factor)


def denormalize_latents(z: jax.Array, config: VAEConfig = VAEConfig()) -> jax.Array:
    """Inverse of `normalize_latents`, applied before `decode`."""
    return z / config.scaling_factor + config.shift_factor


# --------------------------------------------------------------------------------------------------
# Checkpoint key tables

# Parameter sub-rules per module kind: (NNX leaf, torch leaf, transform).
_CONV_PARAMS = (("kernel", "weight", Transform.CONV), ("bias", "bias", Transform.COPY))
_NORM_PARAMS = (("scale", "weight", Transform.COPY), ("bias", "bias", Transform.COPY))

# Sub-module names that differ between the layouts: NNX name -> {layout: torch name}.
_RESNET_CHILDREN = {
    "norm1": ({"diffusers": "norm1", "bfl": "norm1"}, _NORM_PARAMS),
    "conv1": ({"diffusers": "conv1", "bfl": "conv1"}, _CONV_PARAMS),
    "norm2": ({"diffusers": "norm2", "bfl": "norm2"}, _NORM_PARAMS),
    "conv2": ({"diffusers": "conv2", "bfl": "conv2"}, _CONV_PARAMS),
    "shortcut": ({"diffusers": "conv_shortcut", "bfl": "nin_shortcut"}, _CONV_PARAMS),
}
# diffusers stores the attention projections as Linear [C, C]; BFL as 1x1 Conv2d [C, C, 1, 1].
_PROJ_TRANSFORM = {"diffusers": Transform.LINEAR, "bfl": Transform.CONV1X1_AS_LINEAR}
_ATTN_CHILDREN = {
    "norm": {"diffusers": "group_norm", "bfl": "norm"},
    "q": {"diffusers": "to_q", "bfl": "q"},
    "k": {"diffusers": "to_k", "bfl": "k"},
    "v": {"diffusers": "to_v", "bfl": "v"},
    "proj_out": {"diffusers": "to_out.0", "bfl": "proj_out"},
}

# Module table, written out as in flux_formats.md section 4: (NNX module, diffusers module, BFL module,
# kind). `{l}` is an encoder level; `{u}` a decoder level in execution order, which BFL numbers by
# resolution instead (mirrored in `vae_key_table`); `{b}` a resnet block within a level.
_VAE_MODULES: tuple[tuple[str, str, str, str], ...] = (
    ("encoder.conv_in", "encoder.conv_in", "encoder.conv_in", "conv"),
    ("encoder.down.{l}.block.{b}", "encoder.down_blocks.{l}.resnets.{b}", "encoder.down.{l}.block.{b}", "resnet"),
    (
        "encoder.down.{l}.resample.conv",
        "encoder.down_blocks.{l}.downsamplers.0.conv",
        "encoder.down.{l}.downsample.conv",
        "conv",
    ),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0", "encoder.mid.block_1", "resnet"),
    ("encoder.mid.attn_1", "encoder.mid_block.attentions.0", "encoder.mid.attn_1", "attn"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1", "encoder.mid.block_2", "resnet"),
    ("encoder.norm_out", "encoder.conv_norm_out", "encoder.norm_out", "norm"),
    ("encoder.conv_out", "encoder.conv_out", "encoder.conv_out", "conv"),
    ("decoder.conv_in", "decoder.conv_in", "decoder.conv_in", "conv"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0", "decoder.mid.block_1", "resnet"),
    ("decoder.mid.attn_1", "decoder.mid_block.attentions.0", "decoder.mid.attn_1", "attn"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1", "decoder.mid.block_2", "resnet"),
    ("decoder.up.{u}.block.{b}", "decoder.up_blocks.{u}.resnets.{b}", "decoder.up.{u}.block.{b}", "resnet"),
    ("decoder.up.{u}.resample.conv", "decoder.up_blocks.{u}.upsamplers.0.conv", "decoder.up.{u}.upsample.conv", "conv"),
    ("decoder.norm_out", "decoder.conv_norm_out", "decoder.norm_out", "norm"),
    ("decoder.conv_out", "decoder.conv_out", "decoder.conv_out", "conv"),
)
_LAYOUT_COLUMN: dict[str, int] = {"diffusers": 1, "bfl": 2}


def _module_rules(nnx_mod: str, torch_mod: str, kind: str, layout: Layout) -> list[KeyRule]:
    def leaf_rules(nnx_prefix: str, torch_prefix: str, params: tuple) -> list[KeyRule]:
        return [KeyRule(f"{nnx_prefix}.{n}", f"{torch_prefix}.{t}", tr) for n, t, tr in params]

    if kind == "conv":
        return leaf_rules(nnx_mod, torch_mod, _CONV_PARAMS)
    if kind == "norm":
        return leaf_rules(nnx_mod, torch_mod, _NORM_PARAMS)
    if kind == "resnet":
        return [
            r
            for child, (names, params) in _RESNET_CHILDREN.items()
            for r in leaf_rules(f"{nnx_mod}.{child}", f"{torch_mod}.{names[layout]}", params)
        ]
    if kind == "attn":
        rules = []
        for child, names in _ATTN_CHILDREN.items():
            params = (
                _NORM_PARAMS
                if child == "norm"
                else (("kernel", "weight", _PROJ_TRANSFORM[layout]), ("bias", "bias", Transform.COPY))
            )
            rules += leaf_rules(f"{nnx_mod}.{child}", f"{torch_mod}.{names[layout]}", params)
        return rules
    raise ValueError(f"unknown module kind {kind!r}")


def vae_key_table(layout: Layout, num_levels: int) -> KeyTable:
    """The key table for a diffusers (`AutoencoderKL`) or BFL (`ae.safetensors`) VAE state dict."""
    col = _LAYOUT_COLUMN[layout]
    rules = tuple(r for row in _VAE_MODULES for r in _module_rules(row[0], row[col], row[3], layout))
    mirrored = {"u": num_levels} if layout == "bfl" else {}
    return KeyTable(name=f"VAE ({layout})", rules=rules, mirrored=mirrored)


def detect_vae_layout(state: Mapping[str, Any]) -> Layout:
    """Which layout a VAE state dict uses: the table that recognises the most keys."""
    # Mirroring only affects BFL decoder-level indices; a size of 0 just leaves those unmatched here.
    scores = {lay: sum(vae_key_table(lay, 0).nnx_path(k) is not None for k in state) for lay in LAYOUTS}
    best = max(LAYOUTS, key=lambda lay: scores[lay])
    if scores[best] == 0:
        raise CheckpointError(f"not a VAE state dict: no key matches a known layout (first keys: {sorted(state)[:5]})")
    return best


def infer_vae_config(state: Mapping[str, Any], layout: Layout, base: VAEConfig = VAEConfig()) -> VAEConfig:
    """Read the architecture from tensor shapes; norm groups, eps and latent scale/shift come from `base`."""
    table = vae_key_table(layout, 0)

    def shape(nnx_path: str) -> tuple[int, ...] | None:
        rule, keys = table.torch_keys(nnx_path)
        return rule.transform.nnx_shape(tuple(state[keys[0]].shape)) if keys[0] in state else None

    chans: list[int] = []
    while (s := shape(f"encoder.down.{len(chans)}.block.0.conv1.kernel")) is not None:
        chans.append(s[3])
    blocks = 0
    while shape(f"encoder.down.0.block.{blocks}.conv1.kernel") is not None:
        blocks += 1
    conv_in, z_in, conv_out = (
        shape(p) for p in ("encoder.conv_in.kernel", "decoder.conv_in.kernel", "decoder.conv_out.kernel")
    )
    if not chans or not blocks or conv_in is None or z_in is None or conv_out is None:
        raise CheckpointError(f"VAE ({layout}): cannot infer the architecture; pass a VAEConfig")
    return dataclasses.replace(
        base,
        in_channels=conv_in[2],
        out_channels=conv_out[3],
        block_out_channels=tuple(chans),
        layers_per_block=blocks,
        latent_channels=z_in[2],
    )


def load_vae(
    state: Mapping[str, np.ndarray],
    config: VAEConfig | None = None,
    dtype: jnp.dtype = jnp.float32,
    *,
    layout: Layout | None = None,
) -> AutoEncoder:
    """Build the VAE from a diffusers or BFL state dict (layout auto-detected unless given).

    Without `config`, the architecture is read from the tensor shapes and the Flux defaults supply
    the rest (norm groups, eps, scale/shift). Raises `CheckpointError` on missing, unexpected or
    mis-shaped keys.
    """
    layout = layout or detect_vae_layout(state)
    config = config or infer_vae_config(state, layout)
    graphdef, abstract = abstract_params(lambda: AutoEncoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    flat = import_state(vae_key_table(layout, config.num_levels), state, param_shapes(abstract))
    return merge_params(graphdef, abstract, flat, dtype)


def export_vae(model: AutoEncoder, layout: Layout = "diffusers") -> dict[str, np.ndarray]:
    """The model's weights as a torch state dict in the diffusers or BFL layout."""
    return export_state(vae_key_table(layout, model.config.num_levels), model_params(model))
