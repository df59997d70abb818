"""Several LoRAs at their own scales as one LoRA, exactly.

A model carries one adapter per Linear, so LoRAs applied together (`flux-jax sample --lora a:0.8 --lora b:0.5`)
are first combined: per module, the ``down`` matrices are stacked along the rank and the ``up`` matrices
concatenated, each LoRA's ``scale * alpha / rank`` folded into its own ``up`` columns, and the result gets
alpha = its rank (a factor of 1). Then ``up @ down`` is the sum of the scaled deltas, block by block:

    [s1 a1/r1 U1 | s2 a2/r2 U2] @ [D1; D2] = s1 a1/r1 U1 D1 + s2 a2/r2 U2 D2

which is what ComfyUI and diffusers compute when they stack LoRAs (each adds its own delta), with no SVD or
rank truncation. A module only one LoRA covers keeps that LoRA's matrices (its factor folded in the same way).
Text-encoder parts (CLIP-L, T5) combine the same way, per encoder module (`combine_text_encoder_loras`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from flux_jax.lora_io.text_encoders import COMPONENTS, TextEncoderLoras, sorted_modules
from flux_jax.lora_io.weights import LoraWeights, sorted_paths


def combine_loras(loras: Sequence[tuple[Mapping[str, LoraWeights], float]]) -> dict[str, LoraWeights]:
    """``[(weights, scale), ...]`` -> one ``{module: LoraWeights}`` whose delta on every module is the sum of
    ``scale * delta`` over the LoRAs that cover it. A LoRA at scale 0 contributes nothing (it is left out, so
    LoRAs all at scale 0 give ``{}``, the base model unchanged). The LoRAs must fit one model (same module
    shapes), which `flux_jax.lora_io.weights.validate` checks against its config."""
    return _combine(loras, sorted_paths)


def combine_text_encoder_loras(loras: Sequence[tuple[TextEncoderLoras, float]]) -> TextEncoderLoras:
    """`combine_loras` for the text-encoder parts: ``[({"clip": {...}, "t5": {...}}, scale), ...]`` -> one
    ``{"clip": {...}, "t5": {...}}`` (a component no LoRA covers at a non-zero scale is left out)."""
    out: TextEncoderLoras = {}
    for component in COMPONENTS:
        parts = [(lora.get(component) or {}, scale) for lora, scale in loras]
        combined = _combine(parts, lambda ws, c=component: sorted_modules(c, ws))
        if combined:
            out[component] = combined
    return out


def _combine(
    loras: Sequence[tuple[Mapping[str, LoraWeights], float]], order: Callable[[Mapping], list[str]]
) -> dict[str, LoraWeights]:
    parts: dict[str, list[tuple[LoraWeights, float]]] = {}
    for weights, scale in loras:
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"LoRA scale must be finite, got {scale}")
        if scale == 0:
            continue
        for path, w in weights.items():
            parts.setdefault(path, []).append((w, scale))
    out: dict[str, LoraWeights] = {}
    for path in order(parts):
        pieces = parts[path]
        shapes = {(w.out_features, w.in_features) for w, _ in pieces}
        if len(shapes) > 1:
            raise ValueError(f"LoRA module {path}: the LoRAs disagree on its shape ({sorted(shapes)})")
        down = np.concatenate([w.down for w, _ in pieces], axis=0)
        up = np.concatenate([w.up * np.float32(scale * w.scale) for w, scale in pieces], axis=1)
        out[path] = LoraWeights(down, up, alpha=float(down.shape[0]))
    return out
