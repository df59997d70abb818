"""Write LoRAs for the PyTorch world: kohya, diffusers and ComfyUI files, from LoraWeights or another LoRA file.

Every file carries `{"format": "pt"}` (what diffusers writes), `modelspec.*` (architecture `flux-1-dev/lora`), our
`flux_jax.config` (the model config, so a later conversion needs no guessing) and, when known, the training summary
as `flux_jax.meta`; kohya files add the `ss_*` keys kohya's tools and UIs show. Alpha tensors are always float32
(in bf16 an alpha such as 0.7 would round and every loader would apply a different scale than training used).
Writes are atomic; an existing output is kept unless `force`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from flux_jax.atomic import OutputExistsError
from flux_jax.dtypes import DTYPES, FLOAT_NAMES, dtype_name, parse_dtype
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.formats import FORMATS, to_tensors, weights_config
from flux_jax.lora_io.import_ import META_METADATA_KEY, read_lora_file
from flux_jax.lora_io.weights import LoraWeights, most_common, parse_module, validate
from flux_jax.model.config import CONFIG_METADATA_KEY, FluxConfig, config_metadata
from flux_jax.weights.safetensors_file import write_safetensors

log = logging.getLogger(__name__)

# Metadata of a source file that still describes the converted file (training details, not tensor hashes).
_CARRIED_PREFIXES = ("ss_", "modelspec.")
_DERIVED = ("ss_network_dim", "ss_network_alpha", "modelspec.title")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FluxJaxError(f"unknown LoRA format {fmt!r}; choose one of {sorted(FORMATS)}")


def export_metadata(
    fmt: str,
    weights: Mapping[str, LoraWeights],
    config: FluxConfig,
    meta: Mapping | None = None,
    *,
    title: str = "",
    carried: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """String metadata for an exported file.

    meta: the training summary (keys of a training run's meta: step, rank, alpha, targets, base, guidance,
      timestep_sampling, steps, dataset, config); absent keys are left out.
    carried: a source file's metadata; its `ss_*` / `modelspec.*` entries are kept (ours win where both exist).
    """
    meta = dict(meta or {})
    ranks = [w.rank for w in weights.values()]
    alphas = [w.alpha for w in weights.values()]
    rank = meta.get("rank", most_common(ranks))
    alpha = meta.get("alpha", most_common(alphas))
    out: dict[str, str] = {k: v for k, v in (carried or {}).items() if k.startswith(_CARRIED_PREFIXES)}
    for k in _DERIVED:
        out.pop(k, None)
    described = ", ".join(
        f"{k} {meta[k]}" for k in ("base", "guidance", "timestep_sampling", "steps", "step") if meta.get(k) is not None
    )
    out.setdefault("modelspec.sai_model_spec", "1.0.1")
    out.setdefault("modelspec.architecture", "flux-1-dev/lora")
    out.setdefault("modelspec.implementation", "https://github.com/black-forest-labs/flux")
    out.setdefault("modelspec.date", datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat())
    if described:
        out["modelspec.description"] = f"Flux.1 LoRA trained with flux-jax ({described})"
    out["modelspec.title"] = title
    if fmt == "kohya":
        # kohya's own keys, as its tools and the A1111/Forge metadata viewers expect (all values strings).
        out.setdefault("ss_network_module", "networks.lora_flux")
        out.setdefault("ss_base_model_version", "flux1")
        out["ss_network_dim"] = str(rank)
        out["ss_network_alpha"] = str(alpha)
        out.setdefault("ss_network_args", json.dumps({"targets": meta["targets"]} if "targets" in meta else {}))
        for key, field in (
            ("ss_sd_model_name", "base"),
            ("ss_guidance_scale", "guidance"),
            ("ss_timestep_sampling", "timestep_sampling"),
            ("ss_max_train_steps", "steps"),
            ("ss_steps", "step"),
            ("ss_dataset", "dataset"),
        ):
            if meta.get(field) is not None:
                out[key] = str(meta[field])
    out["format"] = "pt"
    out[CONFIG_METADATA_KEY] = config_metadata(config)
    if meta:
        out[META_METADATA_KEY] = json.dumps(meta, sort_keys=True, default=str)
    return dict(sorted(out.items()))  # a fixed order, so re-exporting an exported file reproduces it byte for byte


def write_lora_file(
    path: str | os.PathLike,
    weights: Mapping[str, LoraWeights],
    fmt: str,
    *,
    config: FluxConfig,
    dtype: str = "bf16",
    meta: Mapping | None = None,
    carried: Mapping[str, str] | None = None,
    force: bool = False,
) -> pathlib.Path:
    """Write `weights` as a `fmt` LoRA file (atomic; refuses an existing `path` unless `force`)."""
    check_format(fmt)
    path = pathlib.Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists (use --force to overwrite)")
    if not weights:
        raise FluxJaxError("the LoRA is empty: no module carries an adapter")
    validate(weights, config, "LoRA")
    target = parse_dtype(dtype, FLOAT_NAMES) if isinstance(dtype, str) else np.dtype(dtype)
    if fmt == "kohya":
        skipped = [p for p in weights if parse_module(p)[0].stack is None]
        if skipped:
            log.warning(
                "diffusers' kohya loader drops LoRAs on top-level layers (%s); ComfyUI and Forge apply them. "
                "Use --format diffusers for diffusers.",
                ", ".join(skipped[:5]),
            )
    tensors = to_tensors(weights, fmt, config)
    tensors = {k: v if k.endswith(".alpha") else v.astype(target) for k, v in tensors.items()}
    metadata = export_metadata(fmt, weights, config, meta, title=path.stem, carried=carried)
    write_safetensors(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], tensors.__getitem__, metadata)
    log.info("wrote %s LoRA with %d tensors (%s) to %s", fmt, len(tensors), dtype_name(target, FLOAT_NAMES), path)
    return path


def convert_lora_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str,
    dtype: str | None = None,
    force: bool = False,
    config: FluxConfig | None = None,
) -> pathlib.Path:
    """Rewrite a LoRA file of any supported format as `format` (dtype defaults to the source's)."""
    check_format(format)
    dst = pathlib.Path(dst)
    if dst.exists() and not force:  # before reading anything
        raise OutputExistsError(f"{dst} already exists (use --force to overwrite)")
    lora = read_lora_file(src, config)
    cfg = lora.config or weights_config(lora.weights, str(src))
    if dtype is None:
        dtype = next((n for n in FLOAT_NAMES if DTYPES[n] == lora.dtype), "fp32")
    log.info("read %s LoRA (%d modules) from %s", lora.format, len(lora.weights), src)
    return write_lora_file(
        dst, lora.weights, format, config=cfg, dtype=dtype, meta=lora.meta, carried=lora.metadata, force=force
    )
