"""Flux.1 transformer hyperparameters, their JSON form (stored in every file flux-jax writes), and the presets."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from flux_jax.errors import CheckpointError

# The safetensors metadata key under which our files carry the config (JSON), so a re-read gets the exact config
# even where shapes cannot tell (RoPE axes). Checkpoints, LoRA files and run metas all use `to_json` / `from_json`.
CONFIG_METADATA_KEY = "flux_jax.config"


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Hyperparameters of the BFL `Flux` transformer (names follow BFL's `FluxParams`)."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis width must be even, got {self.axes_dim}")
        object.__setattr__(self, "axes_dim", tuple(int(d) for d in self.axes_dim))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    # Split sizes of the fused BFL projections, derived here so no caller hard-codes 9216 or 21504.
    @property
    def qkv_split(self) -> tuple[int, int, int]:
        h = self.hidden_size
        return (h, h, h)

    @property
    def linear1_split(self) -> tuple[int, int, int, int]:
        return (*self.qkv_split, self.mlp_hidden_dim)

    def to_json(self) -> dict[str, Any]:
        """The config as JSON types (tuples as lists), as stored in checkpoints, LoRA files and run metas."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> FluxConfig:
        """Inverse of `to_json`; a `CheckpointError` naming `where` for anything that is not a valid config."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: the Flux config must be an object, got {raw!r:.80}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: invalid Flux config ({e})") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The matching diffusers `FluxTransformer2DModel` config."""
        return {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.depth,
            "num_single_layers": self.depth_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_in_dim,
            "pooled_projection_dim": self.vec_in_dim,
            "guidance_embeds": self.guidance_embed,
            "axes_dims_rope": list(self.axes_dim),
        }

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> FluxConfig:
        """Build from a diffusers `config.json` dict; refuses configs that are not a Flux transformer."""
        name = cfg.get("_class_name", "FluxTransformer2DModel")
        if name != "FluxTransformer2DModel":
            raise ValueError(f"not a Flux transformer config: _class_name is {name!r}")
        if cfg.get("patch_size", 1) != 1:
            raise ValueError(f"unsupported patch_size {cfg['patch_size']} (Flux packs latents outside the model)")
        heads = int(cfg.get("num_attention_heads", 24))
        head_dim = int(cfg.get("attention_head_dim", 128))
        in_ch = int(cfg.get("in_channels", 64))
        out_ch = cfg.get("out_channels") or in_ch
        return cls(
            in_channels=in_ch,
            out_channels=int(out_ch),
            vec_in_dim=int(cfg.get("pooled_projection_dim", 768)),
            context_in_dim=int(cfg.get("joint_attention_dim", 4096)),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=int(cfg.get("num_layers", 19)),
            depth_single_blocks=int(cfg.get("num_single_layers", 38)),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
        )


def config_metadata(cfg: FluxConfig) -> str:
    """The value stored under `CONFIG_METADATA_KEY`."""
    return json.dumps(cfg.to_json())


def config_from_metadata(metadata: Mapping[str, str] | None, where: str) -> FluxConfig | None:
    """The config a file's metadata carries under `CONFIG_METADATA_KEY`, or None when it carries none."""
    if not metadata or CONFIG_METADATA_KEY not in metadata:
        return None
    try:
        raw = json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: invalid {CONFIG_METADATA_KEY} metadata ({e})") from None
    return FluxConfig.from_json(raw, f"{where}: {CONFIG_METADATA_KEY} metadata")


PRESETS: dict[str, FluxConfig] = {
    # Flux.1-dev and Flux-Dev2Pro share this architecture.
    "dev": FluxConfig(),
    "schnell": FluxConfig(guidance_embed=False),
    # Small enough to train on a laptop CPU in about a minute, with every structural feature kept:
    # several heads, three RoPE axes, more than one block of each kind, guidance embedding.
    "tiny": FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=32,
        context_in_dim=48,
        hidden_size=64,
        num_heads=4,
        depth=2,
        depth_single_blocks=3,
        axes_dim=(4, 6, 6),
    ),
}


def preset(name: str) -> FluxConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Flux preset {name!r}; choose one of {sorted(PRESETS)}") from None
