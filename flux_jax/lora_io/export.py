"""Write LoRAs for the PyTorch world: kohya, diffusers and ComfyUI files, from LoraWeights or another LoRA file.

Every file carries `{"format": "pt"}` (what diffusers writes), `modelspec.*` (architecture `flux-1-dev/lora`), our
`flux_jax.config` (the model config, so a later conversion needs no guessing) and, when known, the training summary
as `flux_jax.meta`; kohya files add the `ss_*` keys kohya's tools and UIs show. Alpha tensors are always float32
(in bf16 an alpha such as 0.7 would round and every loader would apply a different scale than training used).
Writes are atomic; an existing output is kept unless `force`. A LoRA's text-encoder parts (CLIP-L, T5) are written
beside the transformer's in each format's spelling (`text_encoders.py`), so a whole LoRA from another trainer
converts whole.

LoRA files get shared, so by default (`metadata="public"`) the metadata names no local path: the base is given by
its file or directory name, paths in the dataset description by their last component, and the run's full config
(output_dir, data paths, the base path, ...) is left out of `flux_jax.meta`; absolute paths in metadata carried
over from a source file are cut to their names too. `metadata="full"` (`flux-jax export --metadata full`) keeps
everything. Refused before anything is written: alpha = 0, NaN / Inf in the LoRA (unless `allow_nonfinite`), and
tensors that overflow the output dtype.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from flux_jax import hub
from flux_jax.atomic import OutputExistsError
from flux_jax.dtypes import DTYPES, FLOAT_NAMES, dtype_name, parse_dtype
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.formats import FORMATS, to_tensors, weights_config
from flux_jax.lora_io.import_ import META_METADATA_KEY, read_lora_file
from flux_jax.lora_io.text_encoders import TextEncoderLoras, count
from flux_jax.lora_io.text_encoders import check_values as check_text_encoder_values
from flux_jax.lora_io.weights import LoraWeights, check_values, is_finite, listing, most_common, parse_module, validate
from flux_jax.model.config import CONFIG_METADATA_KEY, FluxConfig, config_metadata
from flux_jax.weights.safetensors_file import write_safetensors

log = logging.getLogger(__name__)

# Metadata of a source file that still describes the converted file (training details, not tensor hashes).
_CARRIED_PREFIXES = ("ss_", "modelspec.")
_DERIVED = ("ss_network_dim", "ss_network_alpha", "modelspec.title")


MetadataMode = Literal["public", "full"]
METADATA_MODES: tuple[str, ...] = ("public", "full")

# Meta fields that are never paths, kept verbatim in public metadata (regexes such as `targets` must not be cut).
_VERBATIM_META = frozenset(
    {"format", "version", "step", "rank", "alpha", "targets", "blocks", "lora_dtype", "ema", "adapted",
     "base_config", "guidance", "guidance_range", "timestep_sampling", "steps", "trigger_words"}
)  # fmt: skip
# Left out of public metadata: the full run config names local paths (output_dir, model.base, data.path, ...).
_PRIVATE_META = ("config",)
_STOP = r""",;'"()\[\]{}<>=\n"""  # characters that end a path inside a description or a JSON string
# An absolute path: /x, \\x, ~/x, C:\\x (these may hold spaces: they run to the next stop character) or a URL such
# as gs://bucket/x (up to a space).
_ABSOLUTE = rf"(?<![\w.~:/\\-])(?:[A-Za-z][A-Za-z0-9+.-]*://[^\s{_STOP}]*|(?:~[/\\]|[A-Za-z]:[/\\]|[/\\])[^{_STOP}]*)"
_RELATIVE = rf"[^\s{_STOP}]*[/\\][^\s{_STOP}]*"  # a word holding a path separator: data/photos
_PATHS = {False: re.compile(_ABSOLUTE), True: re.compile(f"{_ABSOLUTE}|{_RELATIVE}")}
_PUBLIC_URL = ("http://", "https://")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FluxJaxError(f"unknown LoRA format {fmt!r}; choose one of {sorted(FORMATS)}")


def check_metadata_mode(mode: str) -> None:
    if mode not in METADATA_MODES:
        raise FluxJaxError(f"unknown metadata mode {mode!r}; choose one of {list(METADATA_MODES)}")


def path_name(path: str) -> str:
    """The last component of a local, Windows or bucket path ('/data/models/flux1-dev' -> 'flux1-dev')."""
    parts = [p for p in re.split(r"[/\\]", path) if p and not p.endswith(":")]
    return parts[-1] if parts else ""


def _scrub(value, *, relative: bool):
    """`value` (JSON-like) with every path in its strings cut to its name: absolute paths (/x, ~/x, C:\\x, gs://x;
    web URLs are kept) and, with `relative`, any word holding a path separator."""

    def cut(m: re.Match) -> str:
        token = m.group()
        if token.startswith(_PUBLIC_URL):
            return token
        path = token.rstrip()
        return path_name(path) + token[len(path) :]

    if isinstance(value, str):
        return _PATHS[relative].sub(cut, value)
    if isinstance(value, Mapping):
        return {_scrub(k, relative=relative): _scrub(v, relative=relative) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, relative=relative) for v in value]
    return value


def public_meta(meta: Mapping) -> dict:
    """A training summary without local paths: no full run config, the base by its Hub name or its file /
    directory name, and every other string that is not a known path-free field with its paths cut to their names."""
    out = {}
    for key, value in meta.items():
        if key in _PRIVATE_META:
            continue
        if key == "base" and isinstance(value, str):
            # A Hub name (org/name[@rev]) names no local path: kept whole, as it is what others can fetch.
            hub_name = hub.parse(value) is not None and not os.path.exists(value)
            out[key] = path_name(value) if re.search(r"[/\\]", value) and not hub_name else value
        elif key in _VERBATIM_META:
            out[key] = value
        else:
            out[key] = _scrub(value, relative=True)
    return out


def public_carried(carried: Mapping[str, str]) -> dict[str, str]:
    """Another tool's metadata with the absolute paths in its values cut to their names."""
    return {k: _scrub(v, relative=False) for k, v in carried.items()}


def export_metadata(
    fmt: str,
    weights: Mapping[str, LoraWeights],
    config: FluxConfig | None,
    meta: Mapping | None = None,
    *,
    title: str = "",
    carried: Mapping[str, str] | None = None,
    metadata: MetadataMode = "public",
    text_encoders: TextEncoderLoras | None = None,
) -> dict[str, str]:
    """String metadata for an exported file.

    meta: the training summary (keys of a training run's meta: step, rank, alpha, targets, base, guidance,
      timestep_sampling, steps, dataset, config; and trigger_words, also written as `modelspec.trigger_phrase`);
      absent keys are left out.
    carried: a source file's metadata; its `ss_*` / `modelspec.*` entries are kept (ours win where both exist).
    metadata: "public" (default): no local paths (`public_meta`, `public_carried`); "full": everything as given.
    config: the model config written as `flux_jax.config`; None (a file with text-encoder parts only) writes none.
    text_encoders: counted in the rank and alpha that describe the file.
    """
    check_metadata_mode(metadata)
    meta = dict(meta or {})
    if metadata == "public":
        meta = public_meta(meta)
        carried = public_carried(carried or {})
    every = [*weights.values(), *(w for part in (text_encoders or {}).values() for w in part.values())]
    ranks = [w.rank for w in every]
    alphas = [w.alpha for w in every]
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
    if meta.get("trigger_words"):  # the model spec's field for them, which UIs show (ours win over a carried one)
        out["modelspec.trigger_phrase"] = ", ".join(meta["trigger_words"])
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
    if config is not None:
        out[CONFIG_METADATA_KEY] = config_metadata(config)
    if meta:
        out[META_METADATA_KEY] = json.dumps(meta, sort_keys=True, default=str)
    return dict(sorted(out.items()))  # a fixed order, so re-exporting an exported file reproduces it byte for byte


def write_lora_file(
    path: str | os.PathLike,
    weights: Mapping[str, LoraWeights],
    fmt: str,
    *,
    config: FluxConfig | None,
    dtype: str = "bf16",
    meta: Mapping | None = None,
    carried: Mapping[str, str] | None = None,
    force: bool = False,
    metadata: MetadataMode = "public",
    allow_nonfinite: bool = False,
    text_encoders: TextEncoderLoras | None = None,
) -> pathlib.Path:
    """Write `weights` (and `text_encoders`, CLIP-L / T5 parts) as a `fmt` LoRA file (atomic; refuses an existing
    `path` unless `force`).

    config: the model the transformer parts fit (None only when there are none). metadata: "public" (no local
    paths) or "full", see the module docstring. Refused, naming the modules: alpha = 0, NaN / Inf in the LoRA or
    values the output dtype cannot hold (both unless `allow_nonfinite`).
    """
    check_format(fmt)
    check_metadata_mode(metadata)
    path = pathlib.Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists (use --force to overwrite)")
    text_encoders = {c: dict(part) for c, part in (text_encoders or {}).items() if part}
    if not weights and not text_encoders:
        raise FluxJaxError("the LoRA is empty: no module carries an adapter")
    if weights:
        if config is None:
            raise ValueError("write_lora_file: transformer LoRA weights need the model config")
        validate(weights, config, "LoRA")
    check_values(weights, f"LoRA for {path}", allow_nonfinite=allow_nonfinite)
    check_text_encoder_values(text_encoders, f"LoRA for {path}", allow_nonfinite=allow_nonfinite)
    target = parse_dtype(dtype, FLOAT_NAMES) if isinstance(dtype, str) else np.dtype(dtype)
    if fmt == "kohya":
        skipped = [p for p in weights if parse_module(p)[0].stack is None]
        if skipped:
            log.warning(
                "diffusers' kohya loader drops LoRAs on top-level layers (%s); ComfyUI and Forge apply them. "
                "Use --format diffusers for diffusers.",
                ", ".join(skipped[:5]),
            )
    if "t5" in text_encoders and fmt in ("kohya", "diffusers"):
        # Kept anyway: the file stays whole for ComfyUI (kohya) and for flux-jax, which apply them.
        log.warning(
            "diffusers' FluxPipeline loads no T5 LoRA (it drops the T5 parts of this %s file)%s",
            fmt,
            "; ComfyUI applies them" if fmt == "kohya" else "; ComfyUI neither: use --format kohya or comfy for it",
        )
    tensors = to_tensors(weights, fmt, config, text_encoders)
    with np.errstate(over="ignore"):  # an overflowing cast is reported below, by tensor
        tensors = {k: v if k.endswith(".alpha") else v.astype(target) for k, v in tensors.items()}
    if not allow_nonfinite:  # the weights are finite (checked above): this is the fold or the cast overflowing
        overflow = [k for k, v in tensors.items() if not is_finite(v)]
        if overflow:
            raise FluxJaxError(
                f"LoRA for {path}: {len(overflow)} tensor(s) overflow {dtype_name(target, FLOAT_NAMES)} (values "
                f"beyond its range): {listing(overflow)}; write bf16 or fp32"
            )
    header = export_metadata(
        fmt, weights, config, meta, title=path.stem, carried=carried, metadata=metadata, text_encoders=text_encoders
    )
    write_safetensors(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], tensors.__getitem__, header)
    log.info("wrote %s LoRA with %d tensors (%s) to %s", fmt, len(tensors), dtype_name(target, FLOAT_NAMES), path)
    return path


def convert_lora_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str,
    dtype: str | None = None,
    force: bool = False,
    config: FluxConfig | None = None,
    *,
    allow_nonfinite: bool = False,
    metadata: MetadataMode = "public",
    trigger_words: Sequence[str] | None = None,
) -> pathlib.Path:
    """Rewrite a LoRA file of any supported format as `format` (dtype defaults to the source's).

    metadata: "public" (the source's metadata without local paths) or "full"; allow_nonfinite: accept NaN / Inf;
    trigger_words: replace the source's (None keeps them).
    """
    check_format(format)
    check_metadata_mode(metadata)
    dst = pathlib.Path(dst)
    if dst.exists() and not force:  # before reading anything
        raise OutputExistsError(f"{dst} already exists (use --force to overwrite)")
    lora = read_lora_file(src, config, allow_nonfinite=allow_nonfinite)
    cfg = lora.config or (weights_config(lora.weights, str(src)) if lora.weights else None)
    if dtype is None:
        dtype = next((n for n in FLOAT_NAMES if DTYPES[n] == lora.dtype), "fp32")
    text = f" + text encoders ({count(lora.text_encoders)})" if lora.text_encoders else ""
    log.info("read %s LoRA (%d modules%s) from %s", lora.format, len(lora.weights), text, src)
    meta = lora.meta if trigger_words is None else {**lora.meta, "trigger_words": list(trigger_words)}
    return write_lora_file(
        dst, lora.weights, format, config=cfg, dtype=dtype, meta=meta, carried=lora.metadata, force=force,
        metadata=metadata, allow_nonfinite=allow_nonfinite, text_encoders=lora.text_encoders,
    )  # fmt: skip
