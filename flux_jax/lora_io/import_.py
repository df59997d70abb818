"""Read a LoRA file of any supported format into `LoraWeights`, and apply it to a model.

Formats (detected per key, see `formats.py`): kohya `lora_unet_*` (also with ComfyUI's `diffusion_model.` prefix),
including kohya split_qkv files (qkv / linear1 down [3r or 4r, in] with a block-diagonal up: kept as one LoRA of
that rank with the stored alpha, which is what ComfyUI, Forge and diffusers all apply); diffusers / PEFT
`transformer.*.lora_A/B` (alpha from `lora_adapter_metadata`, from `.alpha` tensors, else alpha = rank); ComfyUI
BFL-named `diffusion_model.*.lora_A/B`; XLabs `processor.*`. Text-encoder parts (kohya `lora_te1_*` CLIP-L and
`lora_te3_*` / `lora_te2_*` T5, ComfyUI `text_encoders.*`, diffusers `text_encoder.*` / `text_encoder_2.*`; see
`text_encoders.py`) are read beside the transformer's, under the same rules, into `LoraFile.text_encoders`. A key
that matches no Flux transformer or text-encoder layer is an error listing every such key: nothing is silently
dropped. NaN / Inf in a tensor (unless `allow_nonfinite`) and alpha = 0 are
errors naming the tensors; a negative alpha is a negative scale, as ComfyUI and kohya apply it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flux_jax.axes import DEFAULT_RULES
from flux_jax.errors import CheckpointError
from flux_jax.lora_io.adapters import apply_lora_weights
from flux_jax.lora_io.formats import from_tensors, infer_config
from flux_jax.lora_io.text_encoders import TextEncoderLoras, count
from flux_jax.lora_io.weights import LoraWeights, validate
from flux_jax.model.config import FluxConfig, config_from_metadata
from flux_jax.weights.safetensors_file import SafetensorsFile

log = logging.getLogger(__name__)

# Our exports record the training run's summary here (JSON), so a converted file keeps it.
META_METADATA_KEY = "flux_jax.meta"


@dataclasses.dataclass(frozen=True)
class LoraFile:
    path: pathlib.Path
    format: str  # e.g. "kohya", "diffusers", "comfy", "xlabs" (several joined by " + " for a mixed file)
    weights: dict[str, LoraWeights]
    config: FluxConfig | None  # from the caller, the file's metadata, or inferred when the format needed one
    metadata: dict[str, str]
    dtype: np.dtype  # storage dtype of the LoRA matrices (the most common one)
    text_encoders: TextEncoderLoras = dataclasses.field(default_factory=dict)
    """CLIP-L / T5 parts: {"clip": {module: LoraWeights}, "t5": {...}} (see `text_encoders.py`); {} when none."""

    @property
    def meta(self) -> dict:
        """The training summary our exporter stored, or {}."""
        try:
            return json.loads(self.metadata.get(META_METADATA_KEY, "{}"))
        except json.JSONDecodeError:
            return {}


def read_lora_file(
    path: str | os.PathLike, config: FluxConfig | None = None, *, allow_nonfinite: bool = False
) -> LoraFile:
    """Read and validate a LoRA safetensors file (torch-free; nothing beyond the LoRA tensors is loaded).

    Refused with one error naming the tensors: NaN / Inf values (unless `allow_nonfinite`: the rare deliberate
    case, such as inspecting a diverged run), and alpha = 0, which loaders read differently.
    """
    path = pathlib.Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    with SafetensorsFile(path) as f:
        metadata = dict(f.metadata)
        config = config or config_from_metadata(metadata, where)
        resolved: list[FluxConfig] = []

        def need_config(in_dims, blocks) -> FluxConfig:
            resolved.append(config or infer_config(in_dims, blocks, where))
            return resolved[-1]

        weights, text_encoders, fmt = from_tensors(
            f.keys(), f.array, metadata, need_config, where, allow_nonfinite=allow_nonfinite
        )
        dtypes = [f.info(k).dtype for k in f.keys() if not k.endswith(".alpha")]
    if not weights and not text_encoders:
        raise CheckpointError(f"{where}: no LoRA tensors in the file")
    config = config or (resolved[0] if resolved else None)
    if config is not None:
        validate(weights, config, where)
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else np.dtype(np.float32)
    return LoraFile(path, fmt, weights, config, metadata, np.dtype(dtype), text_encoders)


def load_lora_file(path: str | os.PathLike, config: FluxConfig | None = None) -> dict[str, LoraWeights]:
    """The transformer LoRA in `path` as {BFL module path with block index: LoraWeights}, whatever its format
    (`read_lora_file` has the text-encoder parts too)."""
    return read_lora_file(path, config).weights


def apply_lora_file(
    model: nnx.Module, path: str | os.PathLike, scale: float = 1.0, *, mesh: Mesh | None = None, rules=DEFAULT_RULES
) -> list[str]:
    """Attach the LoRA in `path` to `model` at strength `scale` (placed on `mesh` when given); returns the adapted
    Linear paths. Text-encoder parts are not the transformer's: a warning says they are left to the encoders
    (`flux_jax.sampling.prompts.PromptEncoder.load(..., loras=...)`)."""
    lora = read_lora_file(path, model.config)
    if lora.text_encoders:
        log.warning(
            "%s: its text-encoder LoRA parts (%s) are not applied to the transformer; pass them to the text encoders",
            path,
            count(lora.text_encoders),
        )
    return apply_lora_weights(model, lora.weights, scale, mesh=mesh, rules=rules, where=str(path))
