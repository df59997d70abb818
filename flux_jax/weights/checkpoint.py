"""Open a Flux transformer checkpoint in any supported layout as BFL-keyed lazy tensors.

Layouts: a diffusers transformer directory (`config.json` + one or several `diffusion_pytorch_model*.safetensors`,
with the index when sharded), a diffusers single file, a BFL single file (optionally with ComfyUI's
`model.diffusion_model.` prefix) in fp32 / bf16 / fp16 / plain fp8 / scaled fp8 (see `flux_jax.weights.fp8`), and a
Flax checkpoint directory written by `flux_jax.weights.flax_checkpoint`. The layout is detected from the files; the
config is read from `config.json` / our metadata or inferred from tensor shapes (dev vs schnell from the presence of
the guidance embedder). Everything is validated against the key table before a byte of data is read. A Hugging Face
Hub name (``org/name[@revision][/file]``, see `flux_jax.hub`) is fetched into the HF cache first and opened there.

The opened checkpoint is a `flux_jax.weights.handle.FluxCheckpoint`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping

import numpy as np

from flux_jax import hub
from flux_jax.errors import CheckpointError
from flux_jax.model.config import CONFIG_METADATA_KEY, FluxConfig, config_from_metadata
from flux_jax.weights import flax_checkpoint, flux_keys
from flux_jax.weights.fp8 import FLOAT_DTYPES, dequantize
from flux_jax.weights.handle import FileTensor, FluxCheckpoint, Layout, short, validate_keys
from flux_jax.weights.safetensors_file import SafetensorsFile
from flux_jax.weights.sources import Mapped, RowConcat, Source, swap_halves

BFL_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.norm_added_k.weight"
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"


def _open_file(path: pathlib.Path) -> SafetensorsFile:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    return SafetensorsFile(path)


def _diffusers_files(directory: pathlib.Path) -> tuple[list[SafetensorsFile], dict[str, str] | None]:
    """The shard files of a diffusers directory and, when sharded, the index's key -> file map."""
    index_path = directory / DIFFUSERS_INDEX
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        return [_open_file(directory / n) for n in names], weight_map
    single = directory / DIFFUSERS_WEIGHTS
    if single.exists():
        return [_open_file(single)], None
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return [_open_file(directory / found[0])], None
    raise CheckpointError(
        f"{directory}: no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} found (safetensors present: {found or 'none'})"
    )


def _collect(
    files: list[SafetensorsFile], weight_map: Mapping[str, str] | None
) -> dict[str, tuple[SafetensorsFile, str]]:
    out: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        for key in f.keys():
            if weight_map is not None and weight_map.get(key) not in (None, f.path.name):
                continue
            if key in out:
                raise CheckpointError(f"{f.path}: tensor {key!r} also appears in {out[key][0].path}")
            out[key] = (f, key)
    if weight_map is not None:
        lost = sorted(k for k in weight_map if k not in out)
        if lost:
            raise CheckpointError(f"index lists tensors that are in no shard file: {short(lost)}")
    return out


def detect_layout(keys: list[str], where: str) -> tuple[Layout, str]:
    """(layout, key prefix) from the tensor names; non-Flux checkpoints are rejected by name."""
    keyset = set(keys)
    for prefix in ("", *COMFY_PREFIXES):
        if prefix + BFL_MARKER in keyset:
            return "bfl", prefix
    if DIFFUSERS_MARKER in keyset or "transformer." + DIFFUSERS_MARKER in keyset:
        return "diffusers", "" if DIFFUSERS_MARKER in keyset else "transformer."
    raise CheckpointError(f"{where}: not a Flux transformer checkpoint ({_describe(keys)})")


def _describe(keys: list[str]) -> str:
    """A hint of what a non-Flux file is, so the user sees which file they passed by mistake."""
    joined = " ".join(keys[:2000])
    hints = [
        ("lora_unet_", "it looks like a kohya LoRA"),
        ("lora_A", "it looks like a PEFT LoRA"),
        ("encoder.down", "it looks like a VAE"),
        ("encoder.block.", "it looks like a T5 text encoder"),
        ("text_model.", "it looks like a CLIP text encoder"),
        ("input_blocks.", "it looks like a Stable Diffusion UNet"),
        ("joint_blocks.", "it looks like an SD3 transformer"),
    ]
    for needle, hint in hints:
        if needle in joined:
            return f"{hint}; {len(keys)} tensors, first {keys[:3]}"
    return f"no {BFL_MARKER!r} or {DIFFUSERS_MARKER!r}; {len(keys)} tensors, first {keys[:3]}"


def infer_config(
    shape_of: Mapping[str, tuple[int, ...]], where: str, metadata: Mapping[str, str] | None = None
) -> FluxConfig:
    """A FluxConfig from BFL tensor shapes (or from our own metadata when the file carries it)."""
    stored = config_from_metadata(metadata, where)
    if stored is not None:
        return stored
    try:
        hidden, in_channels = shape_of["img_in.weight"]
        head_dim = shape_of["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp = shape_of["double_blocks.0.img_mlp.0.weight"][0]
        config = dict(
            in_channels=in_channels,
            out_channels=shape_of["final_layer.linear.weight"][0],
            vec_in_dim=shape_of["vector_in.in_layer.weight"][1],
            context_in_dim=shape_of["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp / hidden,
            num_heads=hidden // head_dim,
            depth=1 + max(int(m.group(1)) for k in shape_of if (m := re.match(r"double_blocks\.(\d+)\.", k))),
            depth_single_blocks=1
            + max(
                (int(m.group(1)) for k in shape_of if (m := re.match(r"single_blocks\.(\d+)\.", k))),
                default=-1,
            ),
            guidance_embed="guidance_in.in_layer.weight" in shape_of,
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot infer the Flux config from tensor shapes (missing {e})") from None
    if head_dim != sum(FluxConfig().axes_dim):
        raise CheckpointError(
            f"{where}: head_dim {head_dim} differs from Flux's 128, so the RoPE axes cannot be inferred; "
            "pass config=FluxConfig(...) explicitly"
        )
    return FluxConfig(**config)


def open_checkpoint(path: str | os.PathLike, *, config: FluxConfig | None = None) -> FluxCheckpoint:
    """Open `path` (any layout in the module docstring, or a Hub name of one), validate it, and return BFL-keyed
    lazy tensors."""
    path = pathlib.Path(hub.resolve_transformer(path))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if flax_checkpoint.is_flax_checkpoint(path):
        return flax_checkpoint.open_flax_checkpoint(path, config=config)
    files: list[SafetensorsFile] = []
    try:
        metadata: dict[str, str] = {}
        if path.is_dir():
            cfg_path = path / "config.json"
            if not cfg_path.exists():
                raise CheckpointError(
                    f"{path}: not a checkpoint directory (a diffusers transformer directory needs config.json, "
                    f"a Flax checkpoint needs {flax_checkpoint.META_FILE})"
                )
            try:
                raw_cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
            if config is None:
                try:
                    config = FluxConfig.from_diffusers(raw_cfg)
                except (ValueError, TypeError) as e:
                    raise CheckpointError(f"{cfg_path}: {e}") from None
            files, weight_map = _diffusers_files(path)
        else:
            files, weight_map = [_open_file(path)], None
            metadata = files[0].metadata
        found = _collect(files, weight_map)
        layout, prefix = detect_layout(list(found), str(path))
        found = {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}
        raw = {k: FileTensor(f, f.info(name)) for k, (f, name) in found.items()}
        stored = _dominant_dtype(raw.values())
        deq = dequantize(raw, metadata, str(path), prefix)
        shapes = {k: tuple(src.shape) for k, src in deq.tensors.items()}
        if layout == "bfl":
            config = config or infer_config(shapes, str(path), metadata)
            validate_keys(str(path), shapes, flux_keys.bfl_shapes(config))
            tensors = deq.tensors
        else:
            if config is None:  # a diffusers-keyed single file: no config.json beside it
                config = _infer_from_diffusers(shapes, str(path), metadata)
            validate_keys(str(path), shapes, flux_keys.diffusers_shapes(config))
            tensors = bfl_from_diffusers(config, deq.tensors)
        return FluxCheckpoint(path, layout, config, tensors, list(files), stored, deq.scaled_layers)
    except BaseException:
        for f in files:
            f.close()
        raise


def _dominant_dtype(sources) -> np.dtype | None:
    """The dtype holding the most bytes (fp8 for an fp8 file even when a few biases are bf16)."""
    nbytes: collections.Counter = collections.Counter()
    for src in sources:
        dtype = np.dtype(src.dtype)
        if dtype in FLOAT_DTYPES:
            nbytes[dtype] += math.prod(src.shape) * dtype.itemsize
    return nbytes.most_common(1)[0][0] if nbytes else None


def _infer_from_diffusers(shapes: Mapping[str, tuple[int, ...]], where: str, metadata) -> FluxConfig:
    """Config of a diffusers-keyed single file, via the BFL names of the few tensors that determine it."""
    if metadata and CONFIG_METADATA_KEY in metadata:
        return infer_config({}, where, metadata)
    rename = {
        "img_in.weight": "x_embedder.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale": "transformer_blocks.0.attn.norm_q.weight",
        "double_blocks.0.img_mlp.0.weight": "transformer_blocks.0.ff.net.0.proj.weight",
        "final_layer.linear.weight": "proj_out.weight",
        "vector_in.in_layer.weight": "time_text_embed.text_embedder.linear_1.weight",
        "txt_in.weight": "context_embedder.weight",
    }
    bfl = {b: shapes[d] for b, d in rename.items() if d in shapes}
    for k in shapes:
        if m := re.match(r"(single_)?transformer_blocks\.(\d+)\.", k):
            bfl[f"{'single' if m.group(1) else 'double'}_blocks.{m.group(2)}.x"] = ()
    if "time_text_embed.guidance_embedder.linear_1.weight" in shapes:
        bfl["guidance_in.in_layer.weight"] = ()
    return infer_config(bfl, where)


def bfl_from_diffusers(cfg: FluxConfig, diffusers: Mapping[str, Source]) -> dict[str, Source]:
    """BFL tensors assembled lazily from diffusers pieces (fused qkv / linear1 rows, final-layer half swap)."""
    parts: dict[str, list[Source]] = {}
    swap: dict[str, bool] = {}
    for piece in flux_keys.diffusers_pieces(cfg):
        parts.setdefault(piece.bfl_key, []).append(diffusers[piece.key])
        swap[piece.bfl_key] = piece.swap_halves
    out: dict[str, Source] = {}
    for key, srcs in parts.items():
        if len({np.dtype(s.dtype) for s in srcs}) > 1:  # e.g. only some pieces scaled fp8: fuse in float32
            srcs = [Mapped(s, lambda x: x.astype(np.float32), np.float32) for s in srcs]
        src = srcs[0] if len(srcs) == 1 else RowConcat(srcs)
        out[key] = swap_halves(src) if swap[key] else src
    return out
