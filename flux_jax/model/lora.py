"""LoRA adapters on the Flux linears: chosen by regex over module paths, trainable by variable type.

An adapter is attached to a `Linear` as its `lora` attribute; the model stays one model (no wrapper), and
`nnx.LoRAParam` marks what the optimiser updates (`nnx.state(model, nnx.LoRAParam)`). Adapters inside the stacked
blocks are stacked too ([layers, in, r] / [layers, r, out]); a per-layer mask restricts training to chosen block
indices without breaking the scan.

Module paths are the BFL paths without the block index, e.g. `double_blocks.img_attn.qkv`,
`single_blocks.linear1`, `txt_in`, `final_layer.linear`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax.model.layers import Linear

_DOUBLE_LINEARS = r"(img|txt)_(attn\.(qkv|proj)|mlp\.(0|2)|mod\.lin)"
_SINGLE_LINEARS = r"(linear1|linear2|modulation\.lin)"
_EMBEDDERS = r"(img_in|txt_in|(time_in|vector_in|guidance_in)\.(in_layer|out_layer))"

# Named target sets (regexes over module paths, matched in full).
PRESETS: dict[str, str] = {
    # kohya `lora_flux` default: every Linear of the double and single blocks (10 + 3 per block).
    "all_blocks": rf"double_blocks\.{_DOUBLE_LINEARS}|single_blocks\.{_SINGLE_LINEARS}",
    "attention": r"double_blocks\.(img|txt)_attn\.(qkv|proj)|single_blocks\.(linear1|linear2)",
    "double_blocks": rf"double_blocks\.{_DOUBLE_LINEARS}",
    "single_blocks": rf"single_blocks\.{_SINGLE_LINEARS}",
    "all_blocks_and_embedders": rf"double_blocks\.{_DOUBLE_LINEARS}|single_blocks\.{_SINGLE_LINEARS}|{_EMBEDDERS}",
}


class LoRAMask(nnx.Variable):
    """Per-layer 0/1 mask of a stacked adapter (frozen; not an `nnx.LoRAParam`)."""


class LoRADropoutKey(nnx.Variable):
    """Raw PRNG key data for LoRA dropout, one per layer of a stacked adapter.

    Kept as state (not an `nnx.Rngs`) so that `lax.scan` slices it per layer like every other block variable;
    the trainer reseeds it each step with `seed_dropout`.
    """


class LoRA(nnx.Module):
    """delta(x) = scale * (x @ A) @ B with scale = alpha / rank; A [in, r] random, B [r, out] zero at init.

    (A is PyTorch's `lora_down.weight` transposed, B is `lora_up.weight` transposed.)

    in_axis / out_axis: the adapted kernel's logical axes. A's in dim and B's out dim are labelled
    ``(kernel axis, "lora_feature")``, so both follow the kernel's layout and are also split over fsdp (the rule
    table in `flux_jax.axes`); the rank dim is never split.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        rngs: nnx.Rngs,
        stack: int | None = None,
        out_axis: str | None = None,
        in_axis: str | None = None,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        dropout: float = 0.0,
    ):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        lead = (stack,) if stack else ()
        lead_axes = ("layers",) if stack else ()
        # Each feature dim follows its kernel's axis and then "lora_feature" (fsdp by default): see flux_jax.axes.
        in_dim, out_dim = _feature_dim(in_axis), _feature_dim(out_axis)
        # kohya / PEFT init: kaiming-uniform(a=sqrt(5)) on A = U(+-1/sqrt(in)); B = 0, so training starts at the base.
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (*lead, in_features, rank), param_dtype, -bound, bound),
            logical_axes=(*lead_axes, in_dim, "lora_rank"),
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead, rank, out_features), param_dtype), logical_axes=(*lead_axes, "lora_rank", out_dim)
        )
        self.mask = LoRAMask(jnp.ones(lead, jnp.float32), logical_axes=lead_axes) if stack else None
        self.rank = rank
        self.alpha = float(alpha)
        self.dtype = dtype
        self.dropout = dropout
        self.dropout_key = (
            LoRADropoutKey(jnp.zeros((*lead, 2), jnp.uint32), logical_axes=(*lead_axes, None)) if dropout > 0 else None
        )
        self.deterministic = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.dropout > 0 and not self.deterministic:
            key = jax.random.wrap_key_data(self.dropout_key[...], impl="threefry2x32")
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(self.dtype)
        h = jnp.einsum("...i,ir->...r", x, self.lora_a[...].astype(self.dtype), preferred_element_type=jnp.float32)
        y = jnp.einsum("...r,ro->...o", h.astype(self.dtype), self.lora_b[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)  # fmt: skip
        scale = self.scale if self.mask is None else self.scale * self.mask[...]
        return y * scale


def _feature_dim(kernel_axis: str | None) -> tuple[str, ...]:
    """An adapter feature dim's composite logical name: its kernel's axis, then ``lora_feature``."""
    return ("lora_feature",) if kernel_axis is None else (kernel_axis, "lora_feature")


def linear_modules(model: nnx.Module) -> Iterable[tuple[str, Linear]]:
    """(module path, Linear) for every Linear of the model, paths dotted BFL-style without block indices."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            yield ".".join(str(p) for p in path), module


def resolve_targets(targets: str | Sequence[str]) -> re.Pattern:
    """A preset name, a regex, or a list of either -> one full-match pattern."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise ValueError("LoRA targets are empty")
    parts = [PRESETS.get(t, t) for t in items]
    for p in parts:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"invalid LoRA target regex {p!r}: {e}") from None
    return re.compile("|".join(f"(?:{p})" for p in parts))


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    targets: str | Sequence[str] = "all_blocks",
    blocks: Sequence[int] | None = None,
    rngs: nnx.Rngs,
    param_dtype=jnp.float32,
    dropout: float = 0.0,
) -> list[str]:
    """Attach adapters to every Linear whose path matches `targets`; returns the adapted paths.

    blocks: optional block indices to train, numbered in forward order (double blocks 0..depth-1, then single
      blocks); the other layers of a stacked adapter keep a zero mask.
    """
    pattern = resolve_targets(targets)
    if blocks is not None:
        total = _num_double(model) + _num_single(model)
        bad = sorted(b for b in blocks if not 0 <= b < total)
        if bad:
            raise ValueError(f"LoRA block indices {bad} out of range: blocks are numbered 0..{total - 1} "
                             f"(double blocks first, then single blocks)")  # fmt: skip
    chosen = []
    for path, linear in linear_modules(model):
        if not pattern.fullmatch(path):
            continue
        kernel = linear.kernel
        stack = kernel.shape[0] if kernel.ndim == 3 else None
        axes = kernel.get_metadata().get("logical_axes") or (None, None)
        adapter = LoRA(
            linear.in_features,
            linear.out_features,
            rank=rank,
            alpha=alpha,
            rngs=rngs,
            stack=stack,
            in_axis=axes[-2],
            out_axis=axes[-1],
            param_dtype=param_dtype,
            dtype=linear.dtype,
            dropout=dropout,
        )
        if blocks is not None and stack:
            # Unified block numbering in forward order: double blocks first, then single blocks.
            offset = 0 if path.startswith("double_blocks") else _num_double(model)
            mask = np.zeros((stack,), np.float32)
            mask[[b - offset for b in blocks if 0 <= b - offset < stack]] = 1.0
            adapter.mask[...] = jnp.asarray(mask)
        linear.lora = nnx.data(adapter)
        chosen.append(path)
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of the model")
    return chosen


def _num_double(model) -> int:
    return model.config.depth


def _num_single(model) -> int:
    return model.config.depth_single_blocks


def seed_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Give every dropout-enabled adapter a fresh key (call inside the jitted step with a per-step key)."""
    for i, (_, linear) in enumerate(lora_modules(model)):
        adapter = linear.lora
        if adapter.dropout_key is None:
            continue
        k = jax.random.fold_in(key, i)
        lead = adapter.dropout_key.shape[:-1]
        keys = jax.random.split(k, lead[0]) if lead else k
        adapter.dropout_key[...] = jax.random.key_data(keys).astype(jnp.uint32)


def set_lora_training(model: nnx.Module, training: bool) -> None:
    """Enable LoRA dropout (training) or disable it (evaluation / export)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRA):
            module.deterministic = not training


def lora_modules(model: nnx.Module) -> Iterable[tuple[str, Linear]]:
    """(path, Linear) for every Linear carrying an adapter."""
    for path, linear in linear_modules(model):
        if linear.lora is not None:
            yield path, linear


def remove_lora(model: nnx.Module) -> None:
    for _, linear in linear_modules(model):
        linear.lora = nnx.data(None)
