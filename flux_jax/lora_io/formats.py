"""How each LoRA file format spells a Flux module, as tables derived from `flux_keys.TABLE`.

A LoRA key is <module name><suffix>. Module names come in five spellings (kohya `lora_unet_` + BFL path with
underscores; BFL path with ComfyUI's `diffusion_model.` prefix; diffusers module with `transformer.` or no prefix,
one per row piece of a fused BFL Linear; XLabs `processor.*`), suffixes in three styles (kohya `lora_down/lora_up`,
PEFT `lora_A/lora_B`, XLabs `down/up`), plus an optional `.alpha` scalar. The three export formats are fixed pairs:

  kohya      lora_unet_<bfl path, . -> _>      .lora_down.weight / .lora_up.weight / .alpha
  comfy      diffusion_model.<bfl path>        .lora_A.weight / .lora_B.weight / .alpha
  diffusers  transformer.<diffusers module>    .lora_A.weight / .lora_B.weight, alpha / r folded into the weights

Import accepts any spelling with any suffix style (every combination is unambiguous). Text-encoder parts (CLIP-L,
T5) have their own spellings per format (`text_encoders.py`) and are carried beside the transformer's. This module
converts between `LoraWeights` and {key: float32 array}; reading and writing files is `import_.py` / `export.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping

import numpy as np

from flux_jax.errors import CheckpointError
from flux_jax.lora_io import text_encoders as te
from flux_jax.lora_io.pieces import Part, Rows, fuse, split, split_rows, swap_halves
from flux_jax.lora_io.weights import (
    LINEAR_ENTRIES,
    LoraWeights,
    is_finite,
    listing,
    nonfinite_error,
    parse_module,
    sorted_paths,
    zero_alpha_error,
)
from flux_jax.model.config import FluxConfig
from flux_jax.weights import flux_keys
from flux_jax.weights.flux_keys import ModuleEntry


@dataclasses.dataclass(frozen=True)
class Target:
    """A file-side module name (template with "{i}") holding the LoRA of `entry`, or of some of its rows."""

    template: str
    entry: ModuleEntry
    rows: Callable[[FluxConfig], Rows] | None = None  # None: the whole module
    swap_halves: bool = False  # diffusers' norm_out.linear: (scale, shift) rows vs BFL (shift, scale)


@dataclasses.dataclass(frozen=True)
class Spelling:
    name: str
    targets: tuple[Target, ...]


def _whole(prefix: str, transform: Callable[[str], str] = lambda s: s) -> tuple[Target, ...]:
    return tuple(Target(prefix + transform(e.bfl), e) for e in LINEAR_ENTRIES)


def _piece(entry: ModuleEntry, k: int) -> Callable[[FluxConfig], Rows]:
    return lambda cfg: split_rows(entry.split(cfg))[k]


def _diffusers(prefix: str) -> tuple[Target, ...]:
    out = []
    for e in LINEAR_ENTRIES:
        for k, module in enumerate(e.diffusers):
            rows = _piece(e, k) if e.split else None
            out.append(Target(prefix + module, e, rows, e.swap_halves))
    return tuple(out)


# XLabs (x-flux) only adapts attention; its single-block `qkv_lora` covers the q/k/v rows of linear1, not the MLP.
_XLABS = {
    "double_blocks.{i}.img_attn.qkv": "double_blocks.{i}.processor.qkv_lora1",
    "double_blocks.{i}.img_attn.proj": "double_blocks.{i}.processor.proj_lora1",
    "double_blocks.{i}.txt_attn.qkv": "double_blocks.{i}.processor.qkv_lora2",
    "double_blocks.{i}.txt_attn.proj": "double_blocks.{i}.processor.proj_lora2",
    "single_blocks.{i}.linear1": "single_blocks.{i}.processor.qkv_lora",
    "single_blocks.{i}.linear2": "single_blocks.{i}.processor.proj_lora",
}


def _xlabs(prefix: str) -> tuple[Target, ...]:
    by_bfl = {e.bfl: e for e in LINEAR_ENTRIES}
    out = []
    for bfl, name in _XLABS.items():
        entry = by_bfl[bfl]  # KeyError here means the table and this list disagree
        rows = (lambda cfg: (0, sum(cfg.qkv_split))) if bfl.endswith("linear1") else None
        out.append(Target(prefix + name, entry, rows))
    return tuple(out)


SPELLINGS: dict[str, Spelling] = {
    s.name: s
    for s in (
        Spelling("kohya", _whole("lora_unet_", lambda p: p.replace(".", "_"))),
        Spelling("bfl", _whole("diffusion_model.")),
        Spelling("diffusers", _diffusers("transformer.")),
        Spelling("diffusers_bare", _diffusers("")),
        Spelling("xlabs", _xlabs("")),
        Spelling("xlabs_prefixed", _xlabs("diffusion_model.")),
    )
}

# Suffix styles: (down, up). `.alpha` is shared by every style that stores it.
SUFFIXES: dict[str, tuple[str, str]] = {
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "xlabs": (".down.weight", ".up.weight"),
}
ALPHA = ".alpha"
# Substrings by which a safetensors file is told to be a LoRA (any format above) rather than a base checkpoint.
LORA_KEY_MARKERS = (
    ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_", "lora_te", ".processor.qkv_lora", ALPHA
)  # fmt: skip


def looks_like_lora(keys) -> bool:
    """True for LoRA files (kohya, PEFT/diffusers, BFL-named lora_A/B, XLabs), judged from their keys alone."""
    return any(marker in key for key in keys for marker in LORA_KEY_MARKERS)


@dataclasses.dataclass(frozen=True)
class Format:
    """An export format: a module spelling, a suffix style, and whether alpha is stored or folded in."""

    name: str
    spelling: str
    suffixes: str
    store_alpha: bool


FORMATS: dict[str, Format] = {
    "kohya": Format("kohya", "kohya", "kohya", store_alpha=True),
    "comfy": Format("comfy", "bfl", "peft", store_alpha=True),
    "diffusers": Format("diffusers", "diffusers", "peft", store_alpha=False),
}

# What a file is called after import, by (spelling, suffix style).
FORMAT_NAMES: dict[tuple[str, str], str] = {
    ("kohya", "kohya"): "kohya",
    ("bfl", "kohya"): "kohya (diffusion_model. prefix)",
    ("bfl", "peft"): "comfy",
    ("diffusers", "peft"): "diffusers",
    ("diffusers_bare", "peft"): "diffusers (no transformer. prefix)",
    ("xlabs", "xlabs"): "xlabs",
    ("xlabs_prefixed", "xlabs"): "xlabs (diffusion_model. prefix)",
}


def _signature(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def _build_index() -> dict[str, list[tuple[re.Pattern, str, Target]]]:
    index: dict[str, list[tuple[re.Pattern, str, Target]]] = {}
    seen: set[str] = set()
    for spelling in SPELLINGS.values():
        for t in spelling.targets:
            if t.template in seen:
                raise AssertionError(f"two LoRA spellings share the module name {t.template!r}")
            seen.add(t.template)
            pattern = re.compile(re.escape(t.template).replace(re.escape("{i}"), r"(\d+)"))
            index.setdefault(_signature(t.template.replace("{i}", "0")), []).append((pattern, spelling.name, t))
    return index


_INDEX = _build_index()


def match_module(name: str) -> tuple[str, Target, int | None] | None:
    """(spelling, target, block index) of a file-side module name, or None."""
    for pattern, spelling, target in _INDEX.get(_signature(name), ()):
        if m := pattern.fullmatch(name):
            return spelling, target, int(m.group(1)) if target.entry.stack else None
    return None


# -- export ---------------------------------------------------------------------------------------------------


def diffusers_fold(scale: float) -> tuple[float, float]:
    """(down factor, up factor) with product `scale`, split as diffusers' kohya converter does.

    Loaders that read diffusers files apply no alpha, so alpha / r goes into the weights; this split keeps them
    bit-compatible with what diffusers itself makes of the same LoRA in kohya form. A negative scale (negative
    alpha, which ComfyUI and kohya apply as a negative scale) is the fold of its magnitude with the sign on the
    down factor: diffusers' own loop never ends for it. Scale 0 is refused before this point (`check_values`).
    """
    if scale == 0 or not math.isfinite(scale):
        raise ValueError(f"cannot fold LoRA scale {scale} into the weights")
    down, up = abs(scale), 1.0
    while down * 2 < up:  # ends: down doubles and up halves, from a finite non-zero magnitude
        down *= 2
        up /= 2
    return math.copysign(down, scale), up


def to_tensors(
    weights: Mapping[str, LoraWeights],
    fmt: str,
    cfg: FluxConfig | None,
    text_encoders: te.TextEncoderLoras | None = None,
) -> dict[str, np.ndarray]:
    """{key: float32 array} of the file in `fmt` (transformer parts, then text-encoder parts); alpha tensors are
    0-dim. `cfg` is needed only when a module is written as row pieces (diffusers)."""
    spec = FORMATS[fmt]
    by_entry: dict[ModuleEntry, list[Target]] = {}
    for t in SPELLINGS[spec.spelling].targets:
        by_entry.setdefault(t.entry, []).append(t)
    down_sfx, up_sfx = SUFFIXES[spec.suffixes]
    out: dict[str, np.ndarray] = {}
    for path in sorted_paths(weights):
        w = weights[path]
        entry, i = parse_module(path)
        targets = by_entry[entry]
        if targets[0].rows is None:
            pieces = [w]
        else:
            pieces = split(w, [t.rows(cfg) for t in targets])
        for t, p in zip(targets, pieces, strict=True):
            if p is None:
                continue
            up = swap_halves(p.up) if t.swap_halves else p.up
            name = flux_keys.fill(t.template, i)
            if spec.store_alpha:
                out[name + down_sfx], out[name + up_sfx] = p.down, up
                out[name + ALPHA] = np.asarray(p.alpha, np.float32)
            else:
                f_down, f_up = diffusers_fold(p.scale)
                out[name + down_sfx] = p.down if f_down == 1 else p.down * np.float32(f_down)
                out[name + up_sfx] = up if f_up == 1 else up * np.float32(f_up)
    if text_encoders:
        out.update(te.file_tensors(text_encoders, fmt, (down_sfx, up_sfx), spec.store_alpha, diffusers_fold))
    return out


# -- import ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Module:
    spelling: str
    target: Target
    index: int | None
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> key
    style: str | None = None


@dataclasses.dataclass
class _TeModule:
    spelling: te.TeSpelling
    module: str  # the encoder's module path, layer index filled in
    keys: dict[str, str] = dataclasses.field(default_factory=dict)
    style: str | None = None


def _parse_keys(keys: list[str], where: str) -> tuple[dict[str, _Module], dict[str, _TeModule]]:
    modules: dict[str, _Module] = {}
    te_modules: dict[str, _TeModule] = {}
    unmatched = []
    for key in keys:
        found = None
        for style, (down, up) in SUFFIXES.items():
            for role, sfx in (("down", down), ("up", up)):
                if key.endswith(sfx):
                    found = (key[: -len(sfx)], role, style)
                    break
            if found:
                break
        if found is None and key.endswith(ALPHA):
            found = (key[: -len(ALPHA)], "alpha", None)
        hit = match_module(found[0]) if found else None
        te_hit = te.match_module(found[0]) if found and hit is None and found[2] != "xlabs" else None
        if hit is None and te_hit is None:
            unmatched.append(key)
            continue
        name, role, style = found
        if te_hit is not None:
            mod = te_modules.setdefault(name, _TeModule(*te_hit))
        else:
            spelling, target, index = hit
            mod = modules.setdefault(name, _Module(spelling, target, index))
        if style is not None:
            if mod.style not in (None, style):
                raise CheckpointError(f"{where}: module {name} mixes {mod.style} and {style} key names")
            mod.style = style
        mod.keys[role] = key
    if unmatched:
        hint = _hint(unmatched)
        more = f" ... and {len(unmatched) - 20} more" if len(unmatched) > 20 else ""
        raise CheckpointError(
            f"{where}: {len(unmatched)} LoRA key(s) match no Flux transformer or text-encoder layer{hint}: "
            + ", ".join(unmatched[:20])
            + more
        )
    every = {**modules, **te_modules}
    incomplete = [f"{n} (has {sorted(m.keys)})" for n, m in every.items() if not {"down", "up"} <= set(m.keys)]
    if incomplete:
        raise CheckpointError(f"{where}: LoRA module(s) without both down and up weights: {', '.join(incomplete[:20])}")
    for name, m in modules.items():
        if m.spelling.startswith("xlabs") != (m.style == "xlabs"):
            raise CheckpointError(f"{where}: module {name} mixes XLabs and other key names")
    return modules, te_modules


def _hint(keys: list[str]) -> str:
    joined = " ".join(keys[:200])
    if "dora_scale" in joined or "lora_magnitude" in joined:
        return " (DoRA is not supported)"
    if "hada_" in joined or "lokr_" in joined:
        return " (LyCORIS LoHa/LoKr are not supported)"
    if any(marker in joined for marker in te.TE_KEY_MARKERS):
        return (
            " (text-encoder LoRA keys must name a Linear of CLIP-L's attention / MLP or of T5's attention / "
            "feed-forward)"
        )
    return ""


@dataclasses.dataclass(frozen=True)
class _PeftAlpha:
    """Alpha from diffusers' `lora_adapter_metadata`: one PEFT LoraConfig per component, its keys prefixed with the
    component's name (`transformer.`, `text_encoder.`, `text_encoder_2.`)."""

    r: int | None
    lora_alpha: float | None
    rank_pattern: dict
    alpha_pattern: dict
    rslora: bool

    @staticmethod
    def parse(raw: str, where: str, prefix: str = "transformer") -> _PeftAlpha:
        try:
            cfg = json.loads(raw)
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise CheckpointError(f"{where}: invalid lora_adapter_metadata ({e})") from None
        cfg = {k.removeprefix(f"{prefix}."): v for k, v in cfg.items() if k.startswith(f"{prefix}.")}
        if cfg.get("use_dora"):
            raise CheckpointError(f"{where}: DoRA LoRAs (use_dora in lora_adapter_metadata) are not supported")
        return _PeftAlpha(
            r=cfg.get("r"),
            lora_alpha=cfg.get("lora_alpha"),
            rank_pattern=cfg.get("rank_pattern") or {},
            alpha_pattern=cfg.get("alpha_pattern") or {},
            rslora=bool(cfg.get("use_rslora")),
        )

    @staticmethod
    def _lookup(pattern: dict, module: str):
        # PEFT's get_pattern_key: a pattern matches a module name it ends with, at a dot boundary.
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    def alpha(self, module: str, rank: int, where: str) -> float:
        want_r = self._lookup(self.rank_pattern, module) or self.r
        if want_r is not None and int(want_r) != rank:
            raise CheckpointError(f"{where}: {module} has rank {rank} but lora_adapter_metadata says {want_r}")
        alpha = self._lookup(self.alpha_pattern, module)
        if alpha is None:  # not `or`: an alpha_pattern value of 0 must not fall back to lora_alpha
            alpha = self.lora_alpha
        if alpha is None:
            return float(rank)
        # rsLoRA scales by alpha / sqrt(r); express it as alpha' / r.
        return float(alpha) * math.sqrt(rank) if self.rslora else float(alpha)


@dataclasses.dataclass
class _Problems:
    """What reading the modules found, refused together once every module was read."""

    nonfinite: list[str] = dataclasses.field(default_factory=list)  # tensors with NaN / Inf (unless allowed)
    bad_alpha: list[str] = dataclasses.field(default_factory=list)  # non-finite alphas (a scale cannot be NaN)
    zero_alpha: list[str] = dataclasses.field(default_factory=list)


def _read_module(
    name: str,
    keys: Mapping[str, str],
    get: Callable[[str], np.ndarray],
    alpha_from_metadata: Callable[[int], float] | None,
    swap: bool,
    where: str,
    found: _Problems,
    allow_nonfinite: bool,
) -> LoraWeights | None:
    """One module's LoraWeights from its down / up / alpha keys (None when its alpha is not finite)."""
    down, up = get(keys["down"]), get(keys["up"])
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise CheckpointError(
            f"{where}: {name} down {tuple(down.shape)} / up {tuple(up.shape)} are not [r, in] / [out, r]"
        )
    rank = down.shape[0]
    if "alpha" in keys:
        a = get(keys["alpha"])
        if a.size != 1 or (a.dtype.kind != "f" and a.dtype.name != "bfloat16"):
            raise CheckpointError(f"{where}: {keys['alpha']} must be a floating-point scalar, got {a.dtype}")
        alpha = float(np.asarray(a, np.float32).reshape(()))
        alpha_name = keys["alpha"]
    elif alpha_from_metadata is not None:
        alpha = alpha_from_metadata(rank)
        alpha_name = f"{name} (lora_adapter_metadata)"
    else:
        alpha = float(rank)  # what every loader assumes without an alpha
        alpha_name = name
    if not math.isfinite(alpha):
        found.bad_alpha.append(alpha_name)
        return None
    if alpha == 0:
        found.zero_alpha.append(alpha_name)
    if swap:
        up = swap_halves(np.asarray(up))
    try:
        w = LoraWeights(down, up, alpha)
    except ValueError as e:
        raise CheckpointError(f"{where}: {name}: {e}") from None
    if not allow_nonfinite:
        found.nonfinite.extend(keys[role] for role, x in (("down", w.down), ("up", w.up)) if not is_finite(x))
    return w


def from_tensors(
    keys: list[str],
    get: Callable[[str], np.ndarray],
    metadata: Mapping[str, str],
    config: Callable[[dict[ModuleEntry, int], set[tuple[ModuleEntry, int]]], FluxConfig],
    where: str,
    *,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, LoraWeights], te.TextEncoderLoras, str]:
    """Parse a LoRA state dict into fused BFL-module LoRAs and text-encoder LoRAs; returns (weights, text-encoder
    weights, format name). The text-encoder parts follow the same rules (alpha, rank, NaN / Inf, alpha = 0).

    `config(in_dims, blocks)` supplies the model config when row pieces need split sizes; it gets each module's input
    width and the (entry, block) pairs present so it can infer one. Refused, naming the file's keys: NaN / Inf in a
    down or up tensor (unless `allow_nonfinite`), a non-finite alpha, and alpha = 0 (see `weights.zero_alpha_error`).
    """
    modules, te_modules = _parse_keys(keys, where)
    found = _Problems()
    has_alpha_keys = any("alpha" in m.keys for m in (*modules.values(), *te_modules.values()))
    raw_peft = metadata.get("lora_adapter_metadata")
    if raw_peft is not None and has_alpha_keys:
        raise CheckpointError(f"{where}: has both .alpha tensors and lora_adapter_metadata; alpha is ambiguous")
    # By component prefix: the transformer's at once (a malformed or DoRA config is refused), a text encoder's
    # when one of its modules needs it.
    peft = {"transformer": _PeftAlpha.parse(raw_peft, where)} if raw_peft is not None else {}

    def alpha_from_metadata(prefix: str | None, name: str) -> Callable[[int], float] | None:
        if raw_peft is None or prefix is None:
            return None
        if prefix not in peft:
            peft[prefix] = _PeftAlpha.parse(raw_peft, where, prefix)
        module = name.removeprefix(f"{prefix}.")
        return lambda rank: peft[prefix].alpha(module, rank, where)

    # (entry, block) -> [(rows of the piece or None for the whole module, weights)]
    parts: dict[tuple[ModuleEntry, int | None], list[tuple[Callable | None, LoraWeights]]] = {}
    for name, m in modules.items():
        by_metadata = alpha_from_metadata("transformer" if m.spelling == "diffusers" else None, name)
        w = _read_module(name, m.keys, get, by_metadata, m.target.swap_halves, where, found, allow_nonfinite)
        if w is not None:
            parts.setdefault((m.target.entry, m.index), []).append((m.target.rows, w))

    text_encoders: te.TextEncoderLoras = {}
    te_names: dict[tuple[str, str], str] = {}  # (component, module) -> the file's name for it
    for name, m in te_modules.items():
        component = m.spelling.component
        if (component, m.module) in te_names:
            raise CheckpointError(
                f"{where}: {te.label(component, m.module)} is given more than once ({te_names[component, m.module]} "
                f"and {name})"
            )
        te_names[component, m.module] = name
        by_metadata = alpha_from_metadata(m.spelling.metadata_prefix, name)
        w = _read_module(name, m.keys, get, by_metadata, False, where, found, allow_nonfinite)
        if w is not None:
            text_encoders.setdefault(component, {})[m.module] = w

    bad_alpha, nonfinite, zero_alpha = found.bad_alpha, found.nonfinite, found.zero_alpha
    if bad_alpha:
        raise CheckpointError(f"{where}: alpha is NaN or Inf for {len(bad_alpha)} LoRA module(s): {listing(bad_alpha)}")
    if nonfinite:
        raise nonfinite_error(where, sorted(nonfinite))
    if zero_alpha:
        raise zero_alpha_error(where, sorted(zero_alpha))
    cfg = None
    if any(rows is not None for ps in parts.values() for rows, _ in ps):
        in_dims = {entry: ps[0][1].in_features for (entry, _), ps in parts.items()}
        cfg = config(in_dims, set(parts))
    out: dict[str, LoraWeights] = {}
    for (entry, i), ps in parts.items():
        path = flux_keys.fill(entry.bfl, i)
        if len(ps) == 1 and ps[0][0] is None:
            out[path] = ps[0][1]
            continue
        if any(rows is None for rows, _ in ps):
            raise CheckpointError(f"{where}: {path} is given more than once (under different key names)")
        placed = [Part(rows(cfg), w) for rows, w in ps]
        out_rows = flux_keys.module_shapes(cfg, entry)["weight"][0]
        try:
            out[path] = fuse(placed, out_rows, f"{where}: {path}")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    names = {FORMAT_NAMES.get(s, f"{s[0]}/{s[1]}") for s in {(m.spelling, m.style) for m in modules.values()}}
    names |= {
        te.FORMAT_NAMES.get(s, f"{s[0]} text encoders/{s[1]}")
        for s in {(m.spelling.format, m.style) for m in te_modules.values()}
    }
    ordered_te = {c: {k: text_encoders[c][k] for k in te.sorted_modules(c, text_encoders[c])} for c in text_encoders}
    return {p: out[p] for p in sorted_paths(out)}, ordered_te, " + ".join(sorted(names)) or "empty"


def infer_config(in_dims: Mapping[ModuleEntry, int], blocks, where: str) -> FluxConfig:
    """A Flux config that fits a LoRA with no config of its own: the Flux.1 architecture at the LoRA's width.

    The hidden size is read from any module whose input is the hidden state (found by probing the table with the
    default config); everything else keeps Flux.1's values (MLP ratio 4, head_dim 128), except that more blocks are
    assumed when the LoRA names higher block indices. The caller validates every shape against the result.
    """
    ref = FluxConfig()
    hidden = {dim for e, dim in in_dims.items() if flux_keys.module_shapes(ref, e)["weight"][1] == ref.hidden_size}
    if len(hidden) != 1:
        raise CheckpointError(
            f"{where}: cannot tell the model width from the LoRA (input widths {sorted(hidden) or 'unknown'}); "
            "pass the model config"
        )
    h = hidden.pop()
    if h % ref.head_dim:
        raise CheckpointError(f"{where}: LoRA width {h} is not a multiple of Flux's head_dim; pass the model config")
    depth = {s: max([i + 1 for e, i in blocks if e.stack == s], default=0) for s in ("double", "single")}
    return dataclasses.replace(
        ref,
        hidden_size=h,
        num_heads=h // ref.head_dim,
        depth=max(ref.depth, depth["double"]),
        depth_single_blocks=max(ref.depth_single_blocks, depth["single"]),
    )


def weights_config(weights: Mapping[str, LoraWeights], where: str) -> FluxConfig:
    """`infer_config` for fused weights (e.g. to export a LoRA file that carries no config to diffusers)."""
    in_dims, blocks = {}, set()
    for path, w in weights.items():
        entry, i = parse_module(path)
        in_dims[entry] = w.in_features
        blocks.add((entry, i))
    return infer_config(in_dims, blocks, where)
