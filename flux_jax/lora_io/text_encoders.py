"""LoRA on Flux's text encoders (CLIP-L and T5-XXL): the key rules of each file format, and the merge into them.

A LoRA file from another trainer is often whole: transformer parts plus text-encoder parts. These are kept next to
the transformer's weights as ``{"clip": {module: LoraWeights}, "t5": {...}}`` (``TextEncoderLoras``), where a
module is the encoder's transformers module path, the names of the encoders' own checkpoint key tables
(`flux_jax.encoders.clip` as transformers >= 5 names `CLIPTextModel`, `flux_jax.encoders.t5`):

  clip  encoder.layers.{i}.self_attn.{q,k,v,out}_proj, encoder.layers.{i}.mlp.{fc1,fc2}
  t5    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}, encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}

How each format spells them (export writes the first spelling of a row; import reads every one, with kohya or PEFT
suffixes, `.alpha` optional):

  kohya      CLIP  lora_te1_text_model_<module, . -> _>  (also lora_te_)   sd-scripts' lora_flux; ComfyUI reads both
             T5    lora_te3_<module, . -> _>             (also lora_te2_)   sd-scripts writes te3 "to match ComfyUI"
  comfy      CLIP  text_encoders.clip_l.transformer.text_model.<module>     ComfyUI's generic `text_encoders.<key>`
             T5    text_encoders.t5xxl.transformer.<module>
  diffusers  CLIP  text_encoder.text_model.<module>      (also text_encoder.<module>, transformers >= 5 names)
             T5    text_encoder_2.<module>               alpha folded in, or `lora_adapter_metadata` (text_encoder_2.)

Who applies what: ComfyUI every kohya and comfy part and the CLIP part of a diffusers file; diffusers' FluxPipeline
the CLIP part only (it drops a kohya file's lora_te3_ keys and ignores `text_encoder_2.`). flux-jax applies both by
merging W += strength * alpha / r * up @ down into the encoder's weights before it encodes (the encoders run once
per prompt set, so a merge costs nothing at sampling time), in float32, rounded once to the encoders' dtype.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from flux_jax.encoders.clip import CLIP_KEY_TABLE, LEGACY_PREFIX
from flux_jax.encoders.keys import KeyTable, Transform
from flux_jax.encoders.t5 import T5_KEY_TABLE
from flux_jax.errors import CheckpointError
from flux_jax.lora_io.weights import LoraWeights, is_finite, listing, nonfinite_error, zero_alpha_error

# {"clip": {module: LoraWeights}, "t5": {...}}; a component without LoRA parts is left out.
TextEncoderLoras = dict[str, dict[str, LoraWeights]]

COMPONENTS = ("clip", "t5")
TITLES = {"clip": "CLIP-L", "t5": "T5"}
_TABLES: dict[str, KeyTable] = {"clip": CLIP_KEY_TABLE, "t5": T5_KEY_TABLE}


def _linear_templates(table: KeyTable) -> tuple[str, ...]:
    """The module templates of every Linear weight in an encoder's key table ('encoder.layers.{i}.mlp.fc1')."""
    return tuple(
        r.torch.removesuffix(".weight")
        for r in table.rules
        if r.transform is Transform.LINEAR and r.torch.endswith(".weight")
    )


MODULES: dict[str, tuple[str, ...]] = {c: _linear_templates(t) for c, t in _TABLES.items()}
_MODULE_PATTERNS = {
    c: [re.compile(re.escape(t).replace(re.escape("{i}"), r"(\d+)")) for t in ts] for c, ts in MODULES.items()
}


@dataclasses.dataclass(frozen=True)
class TeSpelling:
    """How one format names one encoder's modules: a prefix, then the module path (kohya: dots as underscores)."""

    format: str  # "kohya", "comfy" or "diffusers"
    component: str  # "clip" or "t5"
    prefix: str
    underscores: bool = False
    metadata_prefix: str | None = None  # diffusers: this component's key prefix in lora_adapter_metadata

    def name(self, module: str) -> str:
        return self.prefix + (module.replace(".", "_") if self.underscores else module)


# Per (format, component), the first spelling is the one export writes.
SPELLINGS: tuple[TeSpelling, ...] = (
    TeSpelling("kohya", "clip", "lora_te1_text_model_", underscores=True),
    TeSpelling("kohya", "clip", "lora_te_text_model_", underscores=True),  # older kohya; ComfyUI and diffusers read it
    TeSpelling("kohya", "t5", "lora_te3_", underscores=True),
    TeSpelling("kohya", "t5", "lora_te2_", underscores=True),  # early kohya Flux branch, OneTrainer
    TeSpelling("comfy", "clip", "text_encoders.clip_l.transformer.text_model."),
    TeSpelling("comfy", "t5", "text_encoders.t5xxl.transformer."),
    TeSpelling("diffusers", "clip", "text_encoder.text_model.", metadata_prefix="text_encoder"),
    TeSpelling("diffusers", "clip", "text_encoder.", metadata_prefix="text_encoder"),
    TeSpelling("diffusers", "t5", "text_encoder_2.", metadata_prefix="text_encoder_2"),
)
EXPORT_SPELLINGS: dict[tuple[str, str], TeSpelling] = {}
for _s in SPELLINGS:
    EXPORT_SPELLINGS.setdefault((_s.format, _s.component), _s)

# What a file's text-encoder keys are called after import, by (format, suffix style).
FORMAT_NAMES = {("kohya", "kohya"): "kohya", ("comfy", "peft"): "comfy", ("diffusers", "peft"): "diffusers"}
# Key fragments by which an unmatched key is told to be meant for a text encoder (for the error's hint).
TE_KEY_MARKERS = ("lora_te", "text_encoder")


def _build_index() -> list[tuple[re.Pattern, TeSpelling, str]]:
    index, seen = [], set()
    for s in SPELLINGS:
        for template in MODULES[s.component]:
            name = s.name(template)
            if name in seen:  # two spellings must never claim one key
                raise AssertionError(f"two text-encoder LoRA spellings share the module name {name!r}")
            seen.add(name)
            index.append((re.compile(re.escape(name).replace(re.escape("{i}"), r"(\d+)")), s, template))
    return index


_INDEX = _build_index()


def match_module(name: str) -> tuple[TeSpelling, str] | None:
    """(spelling, module with its layer index) of a file-side text-encoder module name, or None."""
    for pattern, spelling, template in _INDEX:
        if m := pattern.fullmatch(name):
            return spelling, template.replace("{i}", m.group(1))
    return None


def sort_key(component: str, module: str) -> tuple[int, int]:
    """Layer order, then the key table's order within a layer (what kohya's files list)."""
    for k, pattern in enumerate(_MODULE_PATTERNS[component]):
        if m := pattern.fullmatch(module):
            return int(m.group(1)), k
    return 1 << 30, 0


def sorted_modules(component: str, weights: Mapping[str, LoraWeights]) -> list[str]:
    return sorted(weights, key=lambda m: sort_key(component, m))


def label(component: str, module: str) -> str:
    """How errors and logs name a module: 'CLIP-L encoder.layers.0.mlp.fc1'."""
    return f"{TITLES[component]} {module}"


def count(loras: TextEncoderLoras) -> str:
    """'CLIP-L: 72 modules, T5: 168 modules' (the components present)."""
    return ", ".join(f"{TITLES[c]}: {len(loras[c])} modules" for c in COMPONENTS if loras.get(c))


def check_values(loras: TextEncoderLoras, where: str, *, allow_nonfinite: bool = False) -> None:
    """`weights.check_values` for the text-encoder parts: NaN / Inf (unless `allow_nonfinite`) and alpha = 0."""
    ordered = [(c, m) for c in COMPONENTS for m in sorted_modules(c, loras.get(c, {}))]
    if not allow_nonfinite:
        bad = [
            f"{label(c, m)} {role}"
            for c, m in ordered
            for role in ("down", "up")
            if not is_finite(getattr(loras[c][m], role))
        ]
        if bad:
            raise nonfinite_error(where, bad)
    zero = [label(c, m) for c, m in ordered if loras[c][m].alpha == 0]
    if zero:
        raise zero_alpha_error(where, zero)


def file_tensors(
    loras: TextEncoderLoras,
    fmt: str,
    suffixes: tuple[str, str],
    store_alpha: bool,
    fold: Callable[[float], tuple[float, float]],
) -> dict[str, np.ndarray]:
    """{key: float32 array} of the text-encoder parts in export format `fmt` (see `formats.to_tensors`); without
    `store_alpha`, alpha / r is folded into the weights by `fold` (diffusers' split, `formats.diffusers_fold`)."""
    down_sfx, up_sfx = suffixes
    out: dict[str, np.ndarray] = {}
    for component in COMPONENTS:
        weights = loras.get(component) or {}
        spelling = EXPORT_SPELLINGS[(fmt, component)]
        for module in sorted_modules(component, weights):
            w, name = weights[module], spelling.name(module)
            if store_alpha:
                out[name + down_sfx], out[name + up_sfx] = w.down, w.up
                out[name + ".alpha"] = np.asarray(w.alpha, np.float32)
            else:
                f_down, f_up = fold(w.scale)
                out[name + down_sfx] = w.down if f_down == 1 else w.down * np.float32(f_down)
                out[name + up_sfx] = w.up if f_up == 1 else w.up * np.float32(f_up)
    return out


# -- applying them to the encoders -------------------------------------------------------------------------------


def _state_key(component: str, module: str, keys) -> str:
    """The encoder checkpoint's key of a module's weight (CLIP files from transformers < 5 prefix `text_model.`)."""
    key = f"{module}.weight"
    if component == "clip" and key not in keys and LEGACY_PREFIX + key in keys:
        return LEGACY_PREFIX + key
    return key


def check_fits(component: str, shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, LoraWeights], where: str):
    """Every module is a Linear of this encoder checkpoint (`shapes`: its keys' shapes, headers suffice) with the
    LoRA's [out, in]; one error lists every problem."""
    problems = []
    for module in sorted_modules(component, weights):
        w, key = weights[module], _state_key(component, module, shapes)
        if key not in shapes:
            problems.append(f"{module} (no such Linear in this encoder)")
        elif tuple(shapes[key]) != (w.out_features, w.in_features):
            problems.append(f"{module} is [{w.out_features}, {w.in_features}] (the weight is {list(shapes[key])})")
    if problems:
        raise CheckpointError(
            f"{where}: the {TITLES[component]} LoRA parts do not fit this text encoder: {listing(problems)}"
        )


def merge_into_state(
    component: str,
    state: Mapping[str, np.ndarray],
    weights: Mapping[str, LoraWeights],
    *,
    dtype: np.dtype,
    where: str,
) -> dict[str, np.ndarray]:
    """`state` (a `CLIPTextModel` / `T5EncoderModel` state dict) with each module's weight replaced by
    W + alpha / r * up @ down, computed in float32 and rounded once to `dtype` (the dtype the encoder is loaded in).
    A result that is not finite (a delta that overflows, or one beyond fp16/bf16 range) is refused, naming it."""
    check_fits(component, {k: v.shape for k, v in state.items()}, weights, where)
    out = dict(state)
    overflow = []
    for module in sorted_modules(component, weights):
        key, w = _state_key(component, module, state), weights[module]
        with np.errstate(over="ignore", invalid="ignore"):  # checked below, naming the module
            merged = (np.asarray(state[key], np.float32) + w.delta()).astype(dtype)
        if not is_finite(merged):
            overflow.append(module)
        out[key] = merged
    if overflow:
        raise CheckpointError(f"{where}: {TITLES[component]} weight + LoRA delta is not finite for {listing(overflow)}")
    return out
