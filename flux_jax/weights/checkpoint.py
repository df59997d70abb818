"""Open a Flux transformer checkpoint in any supported layout as BFL-keyed lazy tensors.

Layouts: a diffusers transformer directory (`config.json` + one or several `diffusion_pytorch_model*.safetensors`,
with the index when sharded), a diffusers single file, and a BFL single file (optionally with ComfyUI's
`model.diffusion_model.` prefix). The layout is detected from the files; the config is read from `config.json`
or inferred from tensor shapes. Everything is validated against the key table before a byte of data is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Literal

from flux_jax.errors import CheckpointError
from flux_jax.model.config import FluxConfig
from flux_jax.weights import flux_keys
from flux_jax.weights.safetensors_file import SafetensorsFile
from flux_jax.weights.sources import ArraySource, RowConcat, Source, swap_halves

Layout = Literal["bfl", "diffusers"]

BFL_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.norm_added_k.weight"
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
# Written into files we produce so a re-read gets the exact config even where shapes cannot tell (RoPE axes).
CONFIG_METADATA_KEY = "flux_jax.config"


@dataclasses.dataclass
class FluxCheckpoint:
    """A validated checkpoint: its config and one lazy source per BFL tensor key."""

    path: pathlib.Path
    layout: Layout
    config: FluxConfig
    tensors: dict[str, Source]
    files: list[SafetensorsFile]

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> FluxCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            raise CheckpointError(f"index lists tensors that are in no shard file: {_short(lost)}")
    return out


def _short(items, limit: int = 20) -> str:
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def validate_keys(where: str, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise one CheckpointError listing every missing, unexpected and wrongly shaped tensor."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_short(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


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
    if metadata and CONFIG_METADATA_KEY in metadata:
        try:
            return FluxConfig(
                **{
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in json.loads(metadata[CONFIG_METADATA_KEY]).items()
                }
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: invalid {CONFIG_METADATA_KEY} metadata ({e})") from None
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


def _source(entry: tuple[SafetensorsFile, str]) -> Source:
    f, key = entry
    return ArraySource(f.array(key))


def open_checkpoint(path: str | os.PathLike, *, config: FluxConfig | None = None) -> FluxCheckpoint:
    """Open `path` (diffusers directory, diffusers single file, or BFL single file) and validate it."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    files: list[SafetensorsFile] = []
    try:
        metadata: dict[str, str] = {}
        if path.is_dir():
            cfg_path = path / "config.json"
            if not cfg_path.exists():
                raise CheckpointError(f"{path}: a diffusers transformer directory needs config.json")
            try:
                raw_cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
            if config is None:
                try:
                    config = FluxConfig.from_diffusers(raw_cfg)
                except ValueError as e:
                    raise CheckpointError(f"{cfg_path}: {e}") from None
            files, weight_map = _diffusers_files(path)
            found = _collect(files, weight_map)
            layout, prefix = detect_layout(list(found), str(path))
        else:
            files = [_open_file(path)]
            found = _collect(files, None)
            metadata = files[0].metadata
            layout, prefix = detect_layout(list(found), str(path))
        found = {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}
        shapes = {k: f.info(name).shape for k, (f, name) in found.items()}
        if layout == "bfl":
            config = config or infer_config(shapes, str(path), metadata)
            validate_keys(str(path), shapes, flux_keys.bfl_shapes(config))
            tensors = {k: _source(v) for k, v in found.items()}
        else:
            if config is None:  # a diffusers-keyed single file: no config.json beside it
                config = _infer_from_diffusers(shapes, str(path), metadata)
            validate_keys(str(path), shapes, flux_keys.diffusers_shapes(config))
            tensors = bfl_from_diffusers(config, {k: _source(v) for k, v in found.items()})
        return FluxCheckpoint(path, layout, config, tensors, files)
    except BaseException:
        for f in files:
            f.close()
        raise


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
        src = srcs[0] if len(srcs) == 1 else RowConcat(srcs)
        out[key] = swap_halves(src) if swap[key] else src
    return out
