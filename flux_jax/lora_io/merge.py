"""Merge a LoRA into a base checkpoint and write the result as a full BFL or diffusers checkpoint.

Streams one tensor at a time: the base is opened lazily (`open_checkpoint`: any layout, fp8 included), each fused
BFL weight a LoRA covers becomes base + `strength * alpha / r * up @ down` (computed in float32 for the block being
read), and the checkpoint writers (`flux_jax.weights.writers`) cut, cast and write it in either layout.

Non-finite numbers never reach the output silently: the LoRA is checked before anything is read (NaN / Inf, and
alpha = 0, which loaders read differently), and every merged block is checked as it is computed, so a base weight
with NaN, a delta that overflows float32 or a sum the output dtype cannot hold is an error naming the tensor, and
no file is written (`allow_nonfinite` turns these checks off for the rare deliberate case).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Literal

import ml_dtypes
import numpy as np

from flux_jax.atomic import OutputExistsError
from flux_jax.dtypes import FLOAT_NAMES, parse_dtype
from flux_jax.errors import CheckpointError, FluxJaxError
from flux_jax.lora_io.weights import LoraWeights, check_values, is_finite, validate
from flux_jax.model.config import FluxConfig
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.fp8 import cast
from flux_jax.weights.sources import Index, Source
from flux_jax.weights.writers import output_bytes, write_flux_bfl, write_flux_diffusers

log = logging.getLogger(__name__)

# Base dtypes a merge keeps by default; an fp8 base is written in bf16 (fp8 would round most of the LoRA away).
_KEEP = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


class WithDelta:
    """A BFL weight [out, in] plus a LoRA delta, computed only for the block being read, returned in `dtype`.

    Unless `allow_nonfinite`, a block with NaN / Inf in the result is a `CheckpointError` naming `name` and the
    cause (the base weight, the delta, their sum, or the cast to `dtype`).
    """

    def __init__(
        self,
        src: Source,
        lora: LoraWeights,
        strength: float,
        dtype: np.dtype,
        *,
        name: str = "weight",
        allow_nonfinite: bool = False,
    ):
        if tuple(src.shape) != (lora.out_features, lora.in_features):
            raise ValueError(f"LoRA [{lora.out_features}, {lora.in_features}] does not fit weight {src.shape}")
        self.src, self.lora = src, lora
        self.factor = np.float32(lora.scale * strength)
        self.shape = tuple(src.shape)
        self.dtype = np.dtype(dtype)
        self.name = name
        self.allow_nonfinite = allow_nonfinite

    def read(self, index: Index) -> np.ndarray:
        rows, cols = index
        base = np.asarray(self.src.read(index), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # checked below, with the cause
            delta = (self.lora.up[rows] @ self.lora.down[:, cols]) * self.factor
            merged = base + delta
            out = cast(merged, self.dtype)
        if not self.allow_nonfinite and not is_finite(out):  # one check on the result; the cause only on failure
            raise CheckpointError(f"{self.name}: {self._cause(base, delta, merged)} (--allow-nonfinite accepts it)")
        return out

    def _cause(self, base: np.ndarray, delta: np.ndarray, merged: np.ndarray) -> str:
        if not is_finite(base):
            return "the base weight has NaN or Inf values"
        if not is_finite(delta):
            return "the LoRA delta (strength * alpha / r * up @ down) overflows float32"
        if not is_finite(merged):
            return "base + LoRA delta overflows float32"
        return f"base + LoRA delta has values beyond the range of {self.dtype.name}; merge to bf16 or fp32"


def merged_tensors(
    tensors: Mapping[str, Source],
    weights: Mapping[str, LoraWeights],
    strength: float,
    dtype: np.dtype | None = None,
    *,
    where: str = "merge",
    allow_nonfinite: bool = False,
) -> dict[str, Source]:
    """BFL key -> source, with the `.weight` of every LoRA module replaced by base + delta, rounded once to `dtype`
    (default: the base tensor's dtype, bf16 for fp8); non-finite results are refused unless `allow_nonfinite`."""
    out = dict(tensors)
    for path, w in weights.items():
        src = tensors[f"{path}.weight"]
        if dtype is None:
            target = np.dtype(src.dtype) if np.dtype(src.dtype) in _KEEP else np.dtype(ml_dtypes.bfloat16)
        else:
            target = np.dtype(dtype)
        key = f"{path}.weight"
        out[key] = WithDelta(src, w, strength, target, name=f"{where}: {key}", allow_nonfinite=allow_nonfinite)
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
    allow_nonfinite: bool = False,
) -> pathlib.Path:
    """Write base + LoRA to `out`: a BFL single file (`*.safetensors`) or a diffusers transformer directory.

    dtype: "bf16" / "fp16" / "fp32"; default: the base's own dtype (bf16 for an fp8 base).
    allow_nonfinite: write NaN / Inf (in the LoRA, or in the merged weights) instead of refusing them.
    """
    if not math.isfinite(strength):
        raise FluxJaxError(f"LoRA strength must be a finite number, got {strength}")
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
        where = f"LoRA merged into {base}"
        validate(weights, ckpt.config, where)
        check_values(weights, where, allow_nonfinite=allow_nonfinite)
        if target is None and ckpt.stored_dtype is not None and np.dtype(ckpt.stored_dtype) not in _KEEP:
            target = np.dtype(ml_dtypes.bfloat16)
        tensors = merged_tensors(
            ckpt.tensors, weights, strength, target, where=f"merge into {base}", allow_nonfinite=allow_nonfinite
        )
        merged = dataclasses.replace(ckpt, tensors=tensors)
        with _progress(output_bytes(merged, target)) as bar:
            write = write_flux_bfl if layout == "bfl" else write_flux_diffusers
            write(merged, out, dtype=target, force=force, progress=bar.update, allow_nonfinite=allow_nonfinite)
    log.info("merged %d LoRA modules into %s -> %s (%s layout)", len(weights), base, out, layout)
    return out


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None)
