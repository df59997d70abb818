"""Merge a LoRA into a base checkpoint and write the result as a full BFL or diffusers checkpoint.

Streams one tensor at a time: the base is opened lazily (`open_checkpoint`: any layout, fp8 included), each fused
BFL weight a LoRA covers becomes base + `strength * alpha / r * up @ down` (computed in float32 for the block being
read), and the checkpoint writers (`flux_jax.weights.writers`) cut, cast and write it in either layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Literal

import ml_dtypes
import numpy as np

from flux_jax.atomic import OutputExistsError
from flux_jax.dtypes import FLOAT_NAMES, parse_dtype
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.weights import LoraWeights, validate
from flux_jax.model.config import FluxConfig
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.fp8 import cast
from flux_jax.weights.sources import Index, Source
from flux_jax.weights.writers import output_bytes, write_flux_bfl, write_flux_diffusers

log = logging.getLogger(__name__)

# Base dtypes a merge keeps by default; an fp8 base is written in bf16 (fp8 would round most of the LoRA away).
_KEEP = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


class WithDelta:
    """A BFL weight [out, in] plus a LoRA delta, computed only for the block being read, returned in `dtype`."""

    def __init__(self, src: Source, lora: LoraWeights, strength: float, dtype: np.dtype):
        if tuple(src.shape) != (lora.out_features, lora.in_features):
            raise ValueError(f"LoRA [{lora.out_features}, {lora.in_features}] does not fit weight {src.shape}")
        self.src, self.lora = src, lora
        self.factor = np.float32(lora.scale * strength)
        self.shape = tuple(src.shape)
        self.dtype = np.dtype(dtype)

    def read(self, index: Index) -> np.ndarray:
        rows, cols = index
        base = np.asarray(self.src.read(index), dtype=np.float32)
        merged = base + (self.lora.up[rows] @ self.lora.down[:, cols]) * self.factor
        return cast(merged, self.dtype)


def merged_tensors(
    tensors: Mapping[str, Source], weights: Mapping[str, LoraWeights], strength: float, dtype: np.dtype | None = None
) -> dict[str, Source]:
    """BFL key -> source, with the `.weight` of every LoRA module replaced by base + delta, rounded once to `dtype`
    (default: the base tensor's dtype, bf16 for fp8)."""
    out = dict(tensors)
    for path, w in weights.items():
        src = tensors[f"{path}.weight"]
        if dtype is None:
            target = np.dtype(src.dtype) if np.dtype(src.dtype) in _KEEP else np.dtype(ml_dtypes.bfloat16)
        else:
            target = np.dtype(dtype)
        out[f"{path}.weight"] = WithDelta(src, w, strength, target)
    return out


def merge_lora(
    base: str | os.PathLike,
    weights: Mapping[str, LoraWeights],
    out: str | os.PathLike,
    *,
    layout: Literal["bfl", "diffusers"] = "bfl",
    dtype: str | None = None,
    strength: float = 1.0,
    force: bool = False,
    config: FluxConfig | None = None,
) -> pathlib.Path:
    """Write base + LoRA to `out`: a BFL single file (`*.safetensors`) or a diffusers transformer directory.

    dtype: "bf16" / "fp16" / "fp32"; default: the base's own dtype (bf16 for an fp8 base).
    """
    if layout not in ("bfl", "diffusers"):
        raise FluxJaxError(f"unknown checkpoint layout {layout!r}; choose bfl or diffusers")
    target = None if dtype is None else parse_dtype(dtype, FLOAT_NAMES)
    out = pathlib.Path(out)
    if layout == "bfl" and out.suffix != ".safetensors":
        raise FluxJaxError(f"{out}: a BFL checkpoint is one file; name it *.safetensors")
    if layout == "diffusers" and out.suffix == ".safetensors":
        raise FluxJaxError(f"{out}: a diffusers transformer is a directory; give a directory path")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists (use --force to overwrite)")
    with open_checkpoint(base, config=config) as ckpt:
        validate(weights, ckpt.config, f"LoRA merged into {base}")
        if target is None and ckpt.stored_dtype is not None and np.dtype(ckpt.stored_dtype) not in _KEEP:
            target = np.dtype(ml_dtypes.bfloat16)
        merged = dataclasses.replace(ckpt, tensors=merged_tensors(ckpt.tensors, weights, strength, target))
        with _progress(output_bytes(merged, target)) as bar:
            write = write_flux_bfl if layout == "bfl" else write_flux_diffusers
            write(merged, out, dtype=target, force=force, progress=bar.update)
    log.info("merged %d LoRA modules into %s -> %s (%s layout)", len(weights), base, out, layout)
    return out


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None)
