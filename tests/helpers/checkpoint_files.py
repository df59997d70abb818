"""Tiny Flux checkpoints in every layout, derived from a diffusers reference model by plain torch code.

`bfl_state_dict` is an independent, literal diffusers -> BFL conversion written out by hand (it does not use
`flux_keys`), so a test comparing it with our writer checks the key table against a second implementation.
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import save_file

from flux_jax.model.config import CONFIG_METADATA_KEY, FluxConfig

FP8 = torch.float8_e4m3fn


def _modules(cfg: FluxConfig) -> list[tuple[str, list[str], str]]:
    """(BFL module, diffusers module(s) in row order, kind), spelled out for the Flux architecture."""
    mods: list[tuple[str, list[str], str]] = []

    def lin(bfl: str, *diffusers: str) -> None:
        mods.append((bfl, list(diffusers), "linear"))

    def norm(bfl: str, diffusers: str) -> None:
        mods.append((bfl, [diffusers], "norm"))

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if cfg.guidance_embed:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(cfg.depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        lin(b + "img_mod.lin", d + "norm1.linear")
        lin(b + "txt_mod.lin", d + "norm1_context.linear")
        lin(b + "img_attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        lin(b + "txt_attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")
        norm(b + "img_attn.norm.query_norm", d + "attn.norm_q")
        norm(b + "img_attn.norm.key_norm", d + "attn.norm_k")
        norm(b + "txt_attn.norm.query_norm", d + "attn.norm_added_q")
        norm(b + "txt_attn.norm.key_norm", d + "attn.norm_added_k")
        lin(b + "img_attn.proj", d + "attn.to_out.0")
        lin(b + "txt_attn.proj", d + "attn.to_add_out")
        lin(b + "img_mlp.0", d + "ff.net.0.proj")
        lin(b + "img_mlp.2", d + "ff.net.2")
        lin(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        lin(b + "txt_mlp.2", d + "ff_context.net.2")
    for j in range(cfg.depth_single_blocks):
        b, d = f"single_blocks.{j}.", f"single_transformer_blocks.{j}."
        lin(b + "linear1", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")
        lin(b + "linear2", d + "proj_out")
        norm(b + "norm.query_norm", d + "attn.norm_q")
        norm(b + "norm.key_norm", d + "attn.norm_k")
        lin(b + "modulation.lin", d + "norm.linear")
    lin("final_layer.linear", "proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear")  # rows: diffusers (scale, shift), BFL (shift, scale)
    return mods


def _swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _params(kind: str) -> list[tuple[str, str]]:
    return [("scale", "weight")] if kind == "norm" else [("weight", "weight"), ("bias", "bias")]


def bfl_state_dict(sd: dict[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL `flux1-dev.safetensors` keys."""
    out: dict[str, torch.Tensor] = {}
    for bfl, parts, kind in _modules(cfg):
        for bp, dp in _params(kind):
            t = torch.cat([sd[f"{d}.{dp}"] for d in parts], dim=0)
            out[f"{bfl}.{bp}"] = _swap(t) if bfl == "final_layer.adaLN_modulation.1" else t
    return {k: v.detach().contiguous() for k, v in out.items()}


def diffusers_state_dict(bfl_sd: dict[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """The inverse: BFL keys -> diffusers keys (fused rows split in order, final-layer halves swapped back)."""
    out: dict[str, torch.Tensor] = {}
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    for bfl, parts, kind in _modules(cfg):
        for bp, dp in _params(kind):
            t = bfl_sd[f"{bfl}.{bp}"]
            if bfl == "final_layer.adaLN_modulation.1":
                t = _swap(t)
            sizes = [h] * len(parts) if len(parts) == 3 else [h, h, h, m] if len(parts) == 4 else [t.shape[0]]
            for d, piece in zip(parts, torch.split(t, sizes, dim=0), strict=True):
                out[f"{d}.{dp}"] = piece.contiguous()
    return out


def config_metadata(cfg: FluxConfig) -> dict[str, str]:
    return {CONFIG_METADATA_KEY: json.dumps(cfg.to_json())}


def save_bfl(path: pathlib.Path, sd: dict[str, torch.Tensor], cfg: FluxConfig | None, prefix: str = "") -> pathlib.Path:
    """Write with the official safetensors torch writer (metadata carries the config when given)."""
    save_file({prefix + k: v for k, v in sd.items()}, str(path), metadata=config_metadata(cfg) if cfg else None)
    return path


def fp8_roundtrip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a plain-cast fp8 file holds, back in fp32: torch's own e4m3fn rounding."""
    return {k: v.to(FP8).float() for k, v in sd.items()}


def scaled_fp8(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """ComfyUI-style scaled fp8: every Linear weight as fp8(w / s) with s = amax / 448; biases and norms bf16.

    Returns (file tensors without markers, the dequantised fp32 state dict, {layer: scale}).
    """
    stored: dict[str, torch.Tensor] = {}
    real: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            s = torch.tensor(float(v.abs().max()) / 448.0, dtype=torch.float32)
            q = (v / s).to(FP8)
            stored[k] = q
            real[k] = q.float() * s
            scales[k[: -len(".weight")]] = s
        else:
            stored[k] = v.to(torch.bfloat16)
            real[k] = stored[k].float()
    return stored, real, scales
