"""A LoRA from a file or from a training run: the one place that tells the two apart.

`flux-jax export` (to a LoRA file, or merged into a base), `lora.init_from` and the library all name a LoRA the same
way: a LoRA .safetensors file in any format flux-jax imports, or a training run (its ``output_dir``, its
``checkpoints/`` directory or one ``checkpoints/<step>`` directory; local or gs://). Files are read by
`flux_jax.lora_io`; runs by the trainer's checkpoint reader. Only a file can hold text-encoder parts (CLIP-L, T5):
a run trains the transformer alone.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from flux_jax.atomic import OutputExistsError
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.adapters import lora_weights_from_model
from flux_jax.lora_io.export import MetadataMode, check_format, check_metadata_mode, convert_lora_file, write_lora_file
from flux_jax.lora_io.import_ import read_lora_file
from flux_jax.lora_io.text_encoders import TextEncoderLoras
from flux_jax.lora_io.weights import LoraWeights, check_values
from flux_jax.model.config import FluxConfig
from flux_jax.storage import is_local_file, run_path
from flux_jax.train.checkpointing import read_lora_weights


@dataclasses.dataclass(frozen=True)
class LoraSource:
    """What a file or a run holds: the weights by BFL module, and what is known about them."""

    weights: dict[str, LoraWeights]
    config: FluxConfig | None
    """The base architecture (a run always knows it; a file when its metadata or the caller says)."""
    meta: dict
    """The training summary (a run's meta; a file exported by flux-jax carries it too)."""
    dtype: np.dtype | None
    """A file's storage dtype; None for a run (fp32 masters)."""
    is_run: bool
    text_encoders: TextEncoderLoras = dataclasses.field(default_factory=dict)
    """A file's CLIP-L / T5 parts ({"clip": {module: LoraWeights}, "t5": {...}}); {} for a run."""


def read_run(
    src: str | os.PathLike, step: int | None = None, ema: bool = False
) -> tuple[dict[str, LoraWeights], FluxConfig, dict]:
    """(weights, base config, meta) of a run or checkpoint directory, local or gs://."""
    src = run_path(src)
    if not src.is_dir():
        raise FluxJaxError(f"{src}: no such training run, checkpoint directory or LoRA file")
    model, meta = read_lora_weights(src, step=step, use_ema=ema)
    return lora_weights_from_model(model), model.config, dict(meta)


def read_lora(
    src: str | os.PathLike,
    *,
    config: FluxConfig | None = None,
    step: int | None = None,
    ema: bool = False,
    allow_nonfinite: bool = False,
) -> LoraSource:
    """The LoRA at ``src``: a file (``config`` fixes shapes a file cannot tell) or a run (``step``: default the
    latest checkpoint; ``ema``: its EMA weights). NaN / Inf in the weights are refused unless ``allow_nonfinite``;
    alpha = 0 always (see `flux_jax.lora_io.weights.zero_alpha_error`)."""
    if is_local_file(src):
        _no_run_options(src, step, ema)
        lora = read_lora_file(src, config, allow_nonfinite=allow_nonfinite)
        return LoraSource(
            lora.weights, lora.config, lora.meta, lora.dtype, is_run=False, text_encoders=lora.text_encoders
        )
    weights, cfg, meta = read_run(src, step, ema)
    check_values(weights, f"{src} (step {meta.get('step')})", allow_nonfinite=allow_nonfinite)
    return LoraSource(weights, cfg, meta, None, is_run=True)


def _no_run_options(src: str | os.PathLike, step: int | None, ema: bool) -> None:
    if step is not None or ema:
        raise FluxJaxError(f"{src}: --step / --ema apply to a training run directory, not to a LoRA file")


def run_trigger_words(meta: Mapping) -> list[str]:
    """A run's ``lora.trigger_words`` from its meta's saved config (runs from before that key have none)."""
    lora = (meta.get("config") or {}).get("lora") or {}
    return [str(w) for w in lora.get("trigger_words") or ()]


def export_lora(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str,
    *,
    dtype: str | None = None,
    step: int | None = None,
    ema: bool = False,
    force: bool = False,
    metadata: MetadataMode = "public",
    allow_nonfinite: bool = False,
    trigger_words: Sequence[str] | None = None,
) -> pathlib.Path:
    """`flux-jax export`: a training run / checkpoint directory, or a LoRA file, to a `format` LoRA file.

    A run directory's latest checkpoint is used unless `step` is given; `ema` takes the run's EMA weights. dtype
    defaults to bf16 for a run and to the source's for a file (whose metadata is carried over). metadata: "public"
    (default; no local paths, no full run config) or "full" (see `flux_jax.lora_io.export`). allow_nonfinite:
    write NaN / Inf weights instead of refusing them. trigger_words go into the file's metadata (``trigger_words``
    in ``flux_jax.meta``, ``modelspec.trigger_phrase``); None: the run's ``lora.trigger_words`` / the source file's.
    """
    check_format(format)
    check_metadata_mode(metadata)
    if is_local_file(src):
        _no_run_options(src, step, ema)
        return convert_lora_file(
            pathlib.Path(src), dst, format, dtype=dtype, force=force, allow_nonfinite=allow_nonfinite,
            metadata=metadata, trigger_words=trigger_words,
        )  # fmt: skip
    dst = pathlib.Path(dst)
    if dst.exists() and not force:  # before reading anything
        raise OutputExistsError(f"{dst} already exists (use --force to overwrite)")
    weights, config, meta = read_run(src, step, ema)
    check_values(weights, f"{src} (step {meta.get('step')})", allow_nonfinite=allow_nonfinite)
    words = run_trigger_words(meta) if trigger_words is None else list(trigger_words)
    if words:
        meta = {**meta, "trigger_words": words}
    return write_lora_file(
        dst, weights, format, config=config, dtype=dtype or "bf16", meta=meta, force=force, metadata=metadata,
        allow_nonfinite=allow_nonfinite,
    )  # fmt: skip
