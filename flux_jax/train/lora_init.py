"""``lora.init_from``: start a run's adapters from an existing LoRA instead of (random A, zero B).

The source is a LoRA file in any format flux-jax imports (kohya, diffusers/PEFT, ComfyUI, XLabs, split_qkv) or a
training run / checkpoint directory (its latest checkpoint). Each layer the file covers gets the file's A and B,
with the file's alpha / rank folded into B so the run's own alpha keeps meaning what the config says; layers the
run adapts and the file does not keep their fresh initialisation. Refused with the module named: a module the run
does not adapt (its weights would be silently dropped) and a rank other than ``lora.rank``.

A file with text-encoder parts (CLIP-L, T5: a whole LoRA from another trainer) is accepted; those parts are not
trained (the recipe trains the transformer only; one note says so). Validation encodes its prompts with them
(`text_encoder_parts`), so its pictures show the LoRA whole; the run's checkpoints and exports hold the transformer
LoRA alone.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.errors import ConfigError
from flux_jax.lora_io.adapters import to_host
from flux_jax.lora_io.text_encoders import TextEncoderLoras, count
from flux_jax.lora_io.weights import LoraWeights, parse_module
from flux_jax.model.config import FluxConfig
from flux_jax.model.flux import Flux
from flux_jax.model.lora import lora_modules
from flux_jax.storage import is_local_file, is_remote
from flux_jax.train.lora_sources import read_lora

log = logging.getLogger(__name__)

KEY = "lora.init_from"


def _short(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def init_lora_from(model: Flux, source: str | os.PathLike) -> int:
    """Overwrite the model's attached adapters with the LoRA at ``source``; returns the number of layers set.

    The adapters keep their shardings: each new value is computed by a jitted select between the file's values
    (host arrays, the same on every host) and the current ones, with the current sharding as the output's.
    """
    lora = read_lora(source, config=model.config)
    weights = lora.weights
    if lora.text_encoders:
        log.warning(
            "%s: %s also holds text-encoder LoRA parts (%s); they are not trained (this recipe trains the transformer "
            "only): validation encodes its prompts with them, and the run's checkpoints and exports hold the "
            "transformer LoRA alone",
            KEY,
            source,
            count(lora.text_encoders),
        )
    adapters = {path: linear.lora for path, linear in lora_modules(model)}
    masks = {p: to_host(ad.mask[...]) if ad.mask is not None else np.ones(1, np.float32) for p, ad in adapters.items()}
    by_module: dict[str, dict[int | None, LoraWeights]] = {}
    foreign, bad_rank = [], []
    for name, w in weights.items():
        entry, layer = parse_module(name)
        path = ".".join(str(p) for p in entry.flax_path)
        adapter = adapters.get(path)
        masked_out = adapter is not None and layer is not None and masks[path][layer] == 0
        if adapter is None or masked_out:
            foreign.append(name)
        elif w.rank != adapter.rank:
            bad_rank.append(f"{name} (rank {w.rank})")
        else:
            by_module.setdefault(path, {})[layer] = w
    if foreign:
        raise ConfigError(
            f"{source}: has LoRA weights for {len(foreign)} module(s) this run does not adapt (see lora.targets / "
            f"lora.blocks): {_short(sorted(foreign))}",
            key=KEY,
        )
    if bad_rank:
        rank = next(iter(adapters.values())).rank
        raise ConfigError(
            f"{source}: LoRA rank differs from lora.rank={rank} for {_short(sorted(bad_rank))}; set lora.rank to "
            "the file's rank",
            key=KEY,
        )
    layers = 0
    updates = []  # (variable, covered layers, new value, current value)
    for path, entries in by_module.items():
        adapter = adapters[path]
        a, b = np.zeros(adapter.lora_a.shape, np.float32), np.zeros(adapter.lora_b.shape, np.float32)
        covered = np.zeros(a.shape[0] if adapter.mask is not None else 1, bool)
        for layer, w in entries.items():
            # delta = file.alpha / r * up @ down = run.alpha / r * (up * file.alpha / run.alpha) @ down
            up = w.up * np.float32(w.alpha / adapter.alpha)
            if layer is None:
                a[...], b[...] = w.down.T, up.T
                covered[0] = True
            else:
                a[layer], b[layer] = w.down.T, up.T
                covered[layer] = True
        for var, new in ((adapter.lora_a, a), (adapter.lora_b, b)):
            mask = covered.reshape((-1,) + (1,) * (new.ndim - 1)) if adapter.mask is not None else covered[0]
            updates.append((var, mask, new, var[...]))
        layers += len(entries)
    values = _select([u[1:] for u in updates], tuple(u[3].sharding for u in updates))
    for (var, *_), value in zip(updates, values, strict=True):
        var[...] = value
    total = sum(int(np.count_nonzero(m)) for m in masks.values())
    log.info("initialised %d of %d adapted layers from %s", layers, total, source)
    if layers < total:
        log.warning("%d adapted layer(s) are not in %s and start fresh (random A, zero B)", total - layers, source)
    return layers


def text_encoder_parts(source: str | os.PathLike | None, config: FluxConfig) -> TextEncoderLoras:
    """The text-encoder parts of a ``lora.init_from`` file ({} for none, or for a run directory, which has none).

    Read again when validation is built (a resumed run does not apply ``init_from``, yet its validation must
    encode the prompts as before): a file that is gone by then is a warning, and validation runs without them."""
    if not source:
        return {}
    if not is_local_file(source):
        if not is_remote(source) and not os.path.exists(source):
            log.warning("%s: %s is gone; validation encodes its prompts without its text-encoder parts", KEY, source)
        return {}
    return read_lora(source, config=config).text_encoders


def _select(items: list[tuple[np.ndarray, np.ndarray, jax.Array]], shardings: tuple) -> list[jax.Array]:
    """For each (covered, new, current): ``new`` where covered else ``current``, in current's dtype and sharding.

    One jitted program for all adapters (the file's host arrays are the same on every host)."""

    def select(items):
        return [jnp.where(m, n.astype(o.dtype), o) for m, n, o in items]

    return jax.jit(select, out_shardings=list(shardings))(items)
