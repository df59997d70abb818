"""The in-memory LoRA: one `LoraWeights` per BFL module, keyed by its BFL path with the block index.

Every file format is read into and written from this one representation, so each format needs only its key
spelling (`formats.py`), and conversions between formats never go through a model. Arrays are PyTorch-oriented
(`down` = kohya lora_down = PEFT lora_A, [r, in]; `up` = lora_up = lora_B, [out, r]) and float32; the delta a
loader adds to the BFL weight [out, in] is `alpha / r * up @ down`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from flux_jax.errors import CheckpointError
from flux_jax.model.config import FluxConfig
from flux_jax.weights import flux_keys
from flux_jax.weights.flux_keys import ModuleEntry

# LoRA can sit on every Linear of the table (norm scales are not matrices).
LINEAR_ENTRIES: tuple[ModuleEntry, ...] = tuple(e for e in flux_keys.TABLE if e.kind == "linear")


def _frozen_f32(x, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f" and a.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        raise ValueError(f"{what} must be a floating-point array, got {a.dtype}")
    # An own copy: a view into a memory-mapped file must not outlive the file, and frozen means read-only.
    a = np.array(a, dtype=np.float32, order="C", copy=True)
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class LoraWeights:
    """The LoRA of one module: delta W = alpha / rank * up @ down, rank = down.shape[0]."""

    down: np.ndarray  # [r, in], float32
    up: np.ndarray  # [out, r], float32
    alpha: float

    def __post_init__(self) -> None:
        down = _frozen_f32(self.down, "LoRA down")
        up = _frozen_f32(self.up, "LoRA up")
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise ValueError(f"LoRA down {down.shape} / up {up.shape} are not [r, in] / [out, r] with r > 0")
        alpha = float(self.alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be finite, got {alpha}")
        object.__setattr__(self, "down", down)
        object.__setattr__(self, "up", up)
        object.__setattr__(self, "alpha", alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> np.ndarray:
        """scale * up @ down, [out, in] float32: what a loader adds to the PyTorch weight."""
        return (self.up @ self.down) * np.float32(self.scale)

    def same_as(self, other: LoraWeights) -> bool:
        """Bit-identical arrays and alpha."""
        return (
            self.alpha == other.alpha
            and self.down.shape == other.down.shape
            and self.up.shape == other.up.shape
            and np.array_equal(self.down.view(np.uint32), other.down.view(np.uint32))
            and np.array_equal(self.up.view(np.uint32), other.up.view(np.uint32))
        )


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


_BFL_PATTERNS = [(_template_regex(e.bfl), e) for e in LINEAR_ENTRIES]


def parse_module(path: str) -> tuple[ModuleEntry, int | None]:
    """'double_blocks.3.img_attn.qkv' -> (its table entry, 3); top-level modules have index None."""
    for pattern, entry in _BFL_PATTERNS:
        if m := pattern.fullmatch(path):
            return entry, int(m.group(1)) if entry.stack else None
    raise KeyError(f"{path!r} is not a Linear of the Flux transformer")


def sort_key(path: str) -> tuple[int, int]:
    """Table order, then block index: files list modules grouped by kind, as kohya's do."""
    entry, i = parse_module(path)
    return LINEAR_ENTRIES.index(entry), -1 if i is None else i


def sorted_paths(weights: Mapping[str, LoraWeights]) -> list[str]:
    return sorted(weights, key=sort_key)


def validate(weights: Mapping[str, LoraWeights], cfg: FluxConfig, where: str) -> None:
    """Every module exists in a model of this config and has the shape of its weight; one error lists all."""
    problems = []
    for path in sorted(weights, key=_safe_sort_key):
        w = weights[path]
        try:
            entry, i = parse_module(path)
        except KeyError as e:
            problems.append(str(e.args[0]))
            continue
        if entry not in flux_keys.entries(cfg):
            problems.append(f"{path} (this model has no guidance embedding)")
            continue
        depth = flux_keys.num_layers(cfg, entry.stack)
        if depth is not None and i >= depth:
            problems.append(f"{path} (block {i}; the model has {depth} {entry.stack} blocks)")
            continue
        out, inp = flux_keys.module_shapes(cfg, entry)["weight"]
        if (w.out_features, w.in_features) != (out, inp):
            problems.append(f"{path} is [{w.out_features}, {w.in_features}] (the weight is [{out}, {inp}])")
    if problems:
        more = f" ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{where}: LoRA does not fit the model: " + "; ".join(problems[:20]) + more)


def listing(items: list[str], limit: int = 20) -> str:
    """'a, b, c' with at most `limit` items, then '... and N more'."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def zero_alpha_error(where: str, modules: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{where}: alpha = 0 on {len(modules)} LoRA module(s): {listing(modules)}; the tools disagree on what it "
        "means (kohya reads alpha = rank, ComfyUI scale 0), so it is refused: store the alpha you mean"
    )


def nonfinite_error(where: str, tensors: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{where}: NaN or Inf values in {len(tensors)} LoRA tensor(s): {listing(tensors)} "
        "(--allow-nonfinite, or allow_nonfinite=True, accepts them)"
    )


def is_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


def check_values(weights: Mapping[str, LoraWeights], where: str, *, allow_nonfinite: bool = False) -> None:
    """Refuse what loaders would apply differently or not at all: alpha = 0 (see `zero_alpha_error`) and, unless
    `allow_nonfinite`, NaN / Inf in `down` or `up` (a diverged run). One error lists every module at fault."""
    paths = sorted(weights, key=_safe_sort_key)
    if not allow_nonfinite:
        bad = [f"{p} {role}" for p in paths for role in ("down", "up") if not is_finite(getattr(weights[p], role))]
        if bad:
            raise nonfinite_error(where, bad)
    zero = [p for p in paths if weights[p].alpha == 0]
    if zero:
        raise zero_alpha_error(where, zero)


def _safe_sort_key(path: str) -> tuple[int, int]:
    try:
        return sort_key(path)
    except KeyError:
        return (len(LINEAR_ENTRIES), 0)


def most_common(values) -> float | int | None:
    """The most frequent value (ties: the first seen); used to describe a LoRA by one rank and alpha."""
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.get) if counts else None
