"""`LoraWeights` <-> the adapters attached to a Flax Flux model (`flux_jax.model.lora`).

The model keeps one adapter per Linear, stacked over the blocks of a scanned stack ([L, in, r] / [L, r, out]) with
one rank and alpha and a per-layer mask; files keep one LoRA per BFL module and block. Reading gives one entry per
layer whose mask is non-zero. Writing attaches a fresh adapter to each covered Linear (its own rank and alpha, so
a kohya split_qkv qkv at rank 3r sits beside rank-r projections) and zeroes and masks out the layers the file does
not cover.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flux_jax.axes import DEFAULT_RULES, Rules
from flux_jax.lora_io.weights import LINEAR_ENTRIES, LoraWeights, parse_module, validate
from flux_jax.model.lora import apply_lora, linear_modules, lora_modules
from flux_jax.sharding import state_shardings
from flux_jax.weights import flux_keys

log = logging.getLogger(__name__)

_ENTRY_BY_MODEL_PATH = {".".join(str(p) for p in e.flax_path): e for e in LINEAR_ENTRIES}


def to_host(x) -> np.ndarray:
    """A LoRA array on this host as float32 (gathered across hosts when it is sharded over several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), dtype=np.float32)


def lora_weights_from_model(model: nnx.Module) -> dict[str, LoraWeights]:
    """Every adapter of the model as BFL-module LoRAs ("double_blocks.3.img_attn.qkv": down [r, in], up [out, r]).

    A stacked adapter gives one entry per layer whose mask is non-zero; a mask value other than 1 is folded into
    that layer's alpha. Works on a model whose base parameters are abstract (only the adapters are read).
    """
    out: dict[str, LoraWeights] = {}
    for path, linear in lora_modules(model):
        entry = _ENTRY_BY_MODEL_PATH.get(path)
        if entry is None:
            raise ValueError(f"adapter on {path}, which the Flux key table does not know")
        adapter = linear.lora
        a, b = to_host(adapter.lora_a[...]), to_host(adapter.lora_b[...])
        if entry.stack is None:
            out[entry.bfl] = LoraWeights(a.T, b.T, adapter.alpha)
            continue
        mask = to_host(adapter.mask[...]) if adapter.mask is not None else np.ones(a.shape[0], np.float32)
        for i, m in enumerate(mask):
            if m != 0:
                out[flux_keys.fill(entry.bfl, i)] = LoraWeights(a[i].T, b[i].T, adapter.alpha * float(m))
    return out


def apply_lora_weights(
    model: nnx.Module,
    weights: Mapping[str, LoraWeights],
    scale: float = 1.0,
    *,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    where: str = "LoRA",
) -> list[str]:
    """Attach `weights` to the model (replacing adapters on the Linears they cover); returns the adapted paths.

    scale: LoRA strength, multiplied into alpha (1.0 = the file's own effect).
    mesh / rules: where to place the adapters (by their logical axes, as the base); default: the default device.
    Layers of one stacked Linear may differ in rank and alpha: they are zero-padded to the largest rank (exact) and
    their own alpha / rank is folded into `up`, the adapter then having alpha = its rank.
    """
    validate(weights, model.config, where)
    linears = dict(linear_modules(model))
    groups: dict[str, dict[int | None, LoraWeights]] = {}
    for path, w in weights.items():
        entry, i = parse_module(path)
        model_path = ".".join(str(p) for p in entry.flax_path)
        if model_path not in linears:
            raise ValueError(f"LoRA module {path}: the model has no Linear {model_path}")
        groups.setdefault(model_path, {})[i] = w
    adapted = []
    for model_path, layers in groups.items():
        rank = max(w.rank for w in layers.values())
        uniform = len({(w.rank, w.alpha) for w in layers.values()}) == 1
        alpha = next(iter(layers.values())).alpha if uniform else float(rank)
        apply_lora(
            model,
            rank=rank,
            alpha=alpha * scale,
            targets=re.escape(model_path),
            rngs=nnx.Rngs(0),
            param_dtype=param_dtype,
        )
        adapter = linears[model_path].lora
        stack = adapter.lora_a.shape[0] if adapter.mask is not None else None
        a = np.zeros(adapter.lora_a.shape, np.float32)  # [L?, in, R]
        b = np.zeros(adapter.lora_b.shape, np.float32)  # [L?, R, out]
        mask = np.zeros((stack,), np.float32) if stack else None
        for i, w in layers.items():
            up = w.up if uniform else w.up * np.float32(w.scale)
            if stack:
                a[i, :, : w.rank], b[i, : w.rank] = w.down.T, up.T
                mask[i] = 1.0
            else:
                a[:, : w.rank], b[: w.rank] = w.down.T, up.T
        adapter.lora_a[...] = jnp.asarray(a, param_dtype)
        adapter.lora_b[...] = jnp.asarray(b, param_dtype)
        if stack:
            adapter.mask[...] = jnp.asarray(mask)
        if mesh is not None:
            state = nnx.state(adapter)
            nnx.update(adapter, jax.device_put(state, state_shardings(state, mesh, rules)))
        adapted.append(model_path)
    log.info("attached LoRA to %d module(s) (%d layer entries)", len(adapted), len(weights))
    return adapted
