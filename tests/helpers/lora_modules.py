"""A small random LoRA on a few modules of the tiny reference config (no model built): one module of each kind that
files spell differently (fused qkv and linear1, split into row pieces in diffusers files; the final layer, whose
halves diffusers swaps; a plain block Linear; a top-level one)."""

from __future__ import annotations

import numpy as np

from flux_jax.lora_io.weights import LoraWeights, parse_module
from flux_jax.weights import flux_keys
from tests.helpers.torch_reference import tiny_config

CFG = tiny_config()
RANK = 4
MODULES = (
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.2",
    "single_blocks.2.linear1",
    "final_layer.adaLN_modulation.1",
    "img_in",
)


def weight_shape(path: str) -> tuple[int, int]:
    return flux_keys.module_shapes(CFG, parse_module(path)[0])["weight"]


def lora(alpha: float, seed: int = 0) -> dict[str, LoraWeights]:
    """Random normal down and up (rank RANK) with the given alpha on every module of MODULES."""
    rng = np.random.default_rng(seed)
    out = {}
    for path in MODULES:
        rows, cols = weight_shape(path)
        out[path] = LoraWeights(rng.standard_normal((RANK, cols)), rng.standard_normal((rows, RANK)), alpha)
    return out
