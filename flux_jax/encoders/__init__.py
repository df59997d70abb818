"""Flux's frozen encoders in Flax NNX: the VAE, the T5 v1.1 encoder and the CLIP-L text tower.

Each model has a frozen config dataclass (real-size and tiny presets, plus a constructor from the
diffusers/transformers config dict), an NNX module, and a `load_*` / `export_*` pair driven by
one declarative key table (see `keys.py`).
"""

from flux_jax.encoders.clip import CLIPTextConfig, CLIPTextModel, export_clip, load_clip
from flux_jax.encoders.t5 import T5Config, T5Encoder, export_t5, load_t5
from flux_jax.encoders.tokenizers import (
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH,
    Tokens,
    build_tiny_tokenizers,
    load_clip_tokenizer,
    load_t5_tokenizer,
    tokenize_clip,
    tokenize_t5,
)
from flux_jax.encoders.vae import (
    AutoEncoder,
    VAEConfig,
    denormalize_latents,
    export_vae,
    latent_image_ids,
    load_vae,
    normalize_latents,
    pack_latents,
    unpack_latents,
)

__all__ = [
    "CLIP_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "AutoEncoder",
    "CLIPTextConfig",
    "CLIPTextModel",
    "T5Config",
    "T5Encoder",
    "Tokens",
    "VAEConfig",
    "build_tiny_tokenizers",
    "denormalize_latents",
    "export_clip",
    "export_t5",
    "export_vae",
    "latent_image_ids",
    "load_clip",
    "load_clip_tokenizer",
    "load_t5",
    "load_t5_tokenizer",
    "load_vae",
    "normalize_latents",
    "pack_latents",
    "tokenize_clip",
    "tokenize_t5",
    "unpack_latents",
]
