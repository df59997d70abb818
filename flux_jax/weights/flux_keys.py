"""The one key table of the Flux transformer: BFL checkpoint keys <-> diffusers keys <-> the Flax NNX tree.

Every other piece (loaders for each layout, writers, LoRA import/export) walks this table; nothing else spells a
Flux key. The Flax tree mirrors BFL module paths exactly (`double_blocks.{i}.img_mlp.0` is the Flax path
`double_blocks/img_mlp/0` at layer i of the stacked block), so the table only has to record the diffusers side
and how fused BFL tensors split into diffusers pieces. Split sizes come from the config, never from constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Literal

from flux_jax.model.config import FluxConfig

Stack = Literal["double", "single"] | None


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    """One BFL module with parameters.

    bfl: module path; "{i}" stands for the block index of stacked blocks.
    kind: "linear" (weight [out, in] + bias [out]) or "norm" (RMSNorm `scale` [head_dim]).
    diffusers: the diffusers module(s) holding the same parameters; several when BFL fuses them.
    split: for fused modules, a function of the config giving the row counts of each diffusers piece.
    swap_halves: BFL stores (shift, scale), diffusers (scale, shift) -- final layer only.
    """

    bfl: str
    kind: Literal["linear", "norm"]
    diffusers: tuple[str, ...]
    split: Callable[[FluxConfig], tuple[int, ...]] | None = None
    swap_halves: bool = False
    stack: Stack = None
    guidance_only: bool = False

    @property
    def flax_path(self) -> tuple[str | int, ...]:
        """Path of the module in the Flax tree (stacked blocks drop the layer index)."""
        parts = [p for p in self.bfl.split(".") if p != "{i}"]
        return tuple(int(p) if p.isdigit() else p for p in parts)

    def bfl_params(self) -> tuple[tuple[str, str], ...]:
        """(BFL tensor suffix, Flax leaf name) pairs."""
        if self.kind == "norm":
            return (("scale", "scale"),)
        return (("weight", "kernel"), ("bias", "bias"))

    def diffusers_param(self, bfl_suffix: str) -> str:
        # diffusers renames RMSNorm `scale` to `weight`.
        return "weight" if bfl_suffix == "scale" else bfl_suffix


def _lin(bfl: str, *diffusers: str, **kw) -> ModuleEntry:
    return ModuleEntry(bfl, "linear", diffusers, **kw)


def _norm(bfl: str, diffusers: str, **kw) -> ModuleEntry:
    return ModuleEntry(bfl, "norm", (diffusers,), **kw)


def _qkv(cfg: FluxConfig) -> tuple[int, ...]:
    return cfg.qkv_split


def _linear1(cfg: FluxConfig) -> tuple[int, ...]:
    return cfg.linear1_split


TOP: tuple[ModuleEntry, ...] = (
    _lin("img_in", "x_embedder"),
    _lin("txt_in", "context_embedder"),
    _lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", guidance_only=True),
    _lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", guidance_only=True),
    _lin("final_layer.linear", "proj_out"),
    _lin("final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves=True),
)

_D = "transformer_blocks.{i}."
DOUBLE: tuple[ModuleEntry, ...] = tuple(
    dataclasses.replace(e, stack="double")
    for e in (
        _lin("double_blocks.{i}.img_mod.lin", _D + "norm1.linear"),
        _lin("double_blocks.{i}.txt_mod.lin", _D + "norm1_context.linear"),
        _lin("double_blocks.{i}.img_attn.qkv", _D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v", split=_qkv),
        _lin(
            "double_blocks.{i}.txt_attn.qkv",
            _D + "attn.add_q_proj",
            _D + "attn.add_k_proj",
            _D + "attn.add_v_proj",
            split=_qkv,
        ),
        _norm("double_blocks.{i}.img_attn.norm.query_norm", _D + "attn.norm_q"),
        _norm("double_blocks.{i}.img_attn.norm.key_norm", _D + "attn.norm_k"),
        _norm("double_blocks.{i}.txt_attn.norm.query_norm", _D + "attn.norm_added_q"),
        _norm("double_blocks.{i}.txt_attn.norm.key_norm", _D + "attn.norm_added_k"),
        _lin("double_blocks.{i}.img_attn.proj", _D + "attn.to_out.0"),
        _lin("double_blocks.{i}.txt_attn.proj", _D + "attn.to_add_out"),
        _lin("double_blocks.{i}.img_mlp.0", _D + "ff.net.0.proj"),
        _lin("double_blocks.{i}.img_mlp.2", _D + "ff.net.2"),
        _lin("double_blocks.{i}.txt_mlp.0", _D + "ff_context.net.0.proj"),
        _lin("double_blocks.{i}.txt_mlp.2", _D + "ff_context.net.2"),
    )
)

_S = "single_transformer_blocks.{i}."
SINGLE: tuple[ModuleEntry, ...] = tuple(
    dataclasses.replace(e, stack="single")
    for e in (
        _lin(
            "single_blocks.{i}.linear1",
            _S + "attn.to_q",
            _S + "attn.to_k",
            _S + "attn.to_v",
            _S + "proj_mlp",
            split=_linear1,
        ),
        _lin("single_blocks.{i}.linear2", _S + "proj_out"),
        _norm("single_blocks.{i}.norm.query_norm", _S + "attn.norm_q"),
        _norm("single_blocks.{i}.norm.key_norm", _S + "attn.norm_k"),
        _lin("single_blocks.{i}.modulation.lin", _S + "norm.linear"),
    )
)

TABLE: tuple[ModuleEntry, ...] = TOP + DOUBLE + SINGLE


def entries(cfg: FluxConfig) -> tuple[ModuleEntry, ...]:
    return tuple(e for e in TABLE if cfg.guidance_embed or not e.guidance_only)


def num_layers(cfg: FluxConfig, stack: Stack) -> int | None:
    return {"double": cfg.depth, "single": cfg.depth_single_blocks, None: None}[stack]


def layer_indices(cfg: FluxConfig, entry: ModuleEntry) -> range | tuple[None]:
    n = num_layers(cfg, entry.stack)
    return range(n) if n is not None else (None,)


def fill(template: str, i: int | None) -> str:
    return template.replace("{i}", str(i)) if i is not None else template


def module_shapes(cfg: FluxConfig, entry: ModuleEntry) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of the BFL tensors of one module (per layer), keyed by suffix."""
    h, m, hd = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim
    if entry.kind == "norm":
        return {"scale": (hd,)}
    out_in = {
        "img_in": (h, cfg.in_channels),
        "txt_in": (h, cfg.context_in_dim),
        "time_in.in_layer": (h, 256),
        "guidance_in.in_layer": (h, 256),
        "vector_in.in_layer": (h, cfg.vec_in_dim),
        "final_layer.linear": (cfg.out_channels, h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
        "double_blocks.{i}.img_mod.lin": (6 * h, h),
        "double_blocks.{i}.txt_mod.lin": (6 * h, h),
        "double_blocks.{i}.img_attn.qkv": (sum(cfg.qkv_split), h),
        "double_blocks.{i}.txt_attn.qkv": (sum(cfg.qkv_split), h),
        "double_blocks.{i}.img_mlp.0": (m, h),
        "double_blocks.{i}.txt_mlp.0": (m, h),
        "double_blocks.{i}.img_mlp.2": (h, m),
        "double_blocks.{i}.txt_mlp.2": (h, m),
        "single_blocks.{i}.linear1": (sum(cfg.linear1_split), h),
        "single_blocks.{i}.linear2": (h, h + m),
        "single_blocks.{i}.modulation.lin": (3 * h, h),
    }.get(entry.bfl, (h, h))
    return {"weight": out_in, "bias": (out_in[0],)}


def bfl_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL checkpoint for this config, with its PyTorch shape, in table order."""
    out: dict[str, tuple[int, ...]] = {}
    for entry in entries(cfg):
        shapes = module_shapes(cfg, entry)
        for i in layer_indices(cfg, entry):
            for suffix, _ in entry.bfl_params():
                out[f"{fill(entry.bfl, i)}.{suffix}"] = shapes[suffix]
    return out


@dataclasses.dataclass(frozen=True)
class DiffusersPiece:
    """A diffusers tensor that holds rows [start, start + length) of a BFL tensor (after any half swap)."""

    key: str
    bfl_key: str
    start: int
    length: int
    shape: tuple[int, ...]
    swap_halves: bool


def diffusers_pieces(cfg: FluxConfig) -> Iterator[DiffusersPiece]:
    """Every diffusers tensor and where it lives inside the BFL tensors, in table order."""
    for entry in entries(cfg):
        shapes = module_shapes(cfg, entry)
        sizes = entry.split(cfg) if entry.split else None
        for i in layer_indices(cfg, entry):
            for suffix, _ in entry.bfl_params():
                full = shapes[suffix]
                rows = sizes or (full[0],)
                if sum(rows) != full[0]:
                    raise AssertionError(f"split {rows} of {entry.bfl} does not cover {full[0]} rows")
                start = 0
                for module, n in zip(entry.diffusers, rows, strict=True):
                    yield DiffusersPiece(
                        key=f"{fill(module, i)}.{entry.diffusers_param(suffix)}",
                        bfl_key=f"{fill(entry.bfl, i)}.{suffix}",
                        start=start,
                        length=n,
                        shape=(n, *full[1:]),
                        swap_halves=entry.swap_halves,
                    )
                    start += n


def diffusers_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
    return {p.key: p.shape for p in diffusers_pieces(cfg)}


def flax_leaves(cfg: FluxConfig) -> Iterator[tuple[tuple[str | int, ...], ModuleEntry, str]]:
    """(Flax leaf path, module entry, BFL tensor suffix) for every parameter of the Flax model."""
    for entry in entries(cfg):
        for suffix, leaf in entry.bfl_params():
            yield (*entry.flax_path, leaf), entry, suffix
