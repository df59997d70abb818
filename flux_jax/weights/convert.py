"""Checkpoint conversion, both ways: PyTorch weights (BFL / fp8 / diffusers) <-> Flax checkpoint directories.

The one function behind `flux-jax convert` and the scripts in `convert/`. The direction follows from the source:
PyTorch weights become a Flax checkpoint, a Flax checkpoint becomes PyTorch weights (BFL single file by default);
`layout=` picks any output explicitly (e.g. diffusers -> BFL, or fp8 BFL -> bf16 BFL). Every output is written to
a temporary sibling and renamed into place when complete, so a failure never leaves a partial destination; the
temporaries of an earlier conversion to the same destination that was killed (SIGKILL, power loss) are removed
first. Every tensor is checked for NaN / Inf as it is written (`allow_nonfinite=True` skips the check).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from typing import Literal

import numpy as np

from flux_jax.atomic import OutputExistsError, remove_stale_temporaries
from flux_jax.dtypes import DTYPES, parse_dtype, storage_dtype
from flux_jax.errors import FluxJaxError
from flux_jax.model.config import FluxConfig
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.flax_checkpoint import write_flax_checkpoint
from flux_jax.weights.flax_layout import flax_layer_sources
from flux_jax.weights.handle import FluxCheckpoint
from flux_jax.weights.writers import DEFAULT_SHARD_BYTES, output_bytes, write_flux_bfl, write_flux_diffusers

OutputLayout = Literal["flax", "bfl", "diffusers"]
OUTPUT_LAYOUTS: tuple[str, ...] = ("flax", "bfl", "diffusers")


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    src: pathlib.Path
    dst: pathlib.Path
    src_layout: str
    layout: str
    dtype: str  # "keep" when each tensor kept its stored dtype
    bytes_written: int
    seconds: float


def default_dtype(ckpt: FluxCheckpoint, layout: str) -> np.dtype | None:
    """The output dtype when none is asked for: the source's own, so nothing is rounded.

    A Flax checkpoint has one storage dtype: the one holding most of the source's bytes (fp8 for an fp8 file
    whose few biases are bf16; fp8 kernels then keep their bits). PyTorch outputs keep each tensor's dtype (None).
    Dequantised scaled-fp8 weights are no longer fp8 values: they become bf16 (the dtype ComfyUI computes them
    in), not fp32, which would double the size for no information.
    """
    if ckpt.scaled_layers:
        return DTYPES["bf16"]
    if layout != "flax":
        return None
    stored = ckpt.stored_dtype
    if stored is None or stored not in DTYPES.values():
        return DTYPES["fp32"]
    return stored


def parse_size(text: str) -> int:
    """'10GB' / '500MB' / '200KB' / '12345' -> bytes (decimal units, like diffusers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            t, scale = t[: -len(unit)].strip(), factor
            break
    else:
        scale = 1
    try:
        value = float(t)
    except ValueError:
        raise FluxJaxError(f"invalid size {text!r} (examples: 10GB, 500MB, 200KB)") from None
    if value <= 0 or not math.isfinite(value):
        raise FluxJaxError(f"size must be positive, got {text!r}")
    return int(value * scale)


def _flax_bytes(ckpt: FluxCheckpoint, dtype: np.dtype) -> int:
    return sum(
        math.prod(src.shape) * storage_dtype(path, dtype).itemsize
        for path, (_, layers) in flax_layer_sources(ckpt.config, ckpt.tensors).items()
        for src in layers
    )


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    layout: OutputLayout | None = None,
    dtype: str | None = None,
    force: bool = False,
    config: FluxConfig | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> ConversionResult:
    """Convert the Flux transformer checkpoint at `src` into `dst`.

    layout: "flax" (an orbax checkpoint directory), "bfl" (single safetensors file) or "diffusers" (sharded
      directory); default: "flax" for PyTorch sources, "bfl" for Flax sources.
    dtype: "fp32" / "bf16" / "fp16" / "fp8", or None to keep the stored dtype (see `default_dtype`).
    force: replace an existing `dst` (only after the new one is complete).
    progress: show a tqdm progress bar in bytes written.
    allow_nonfinite: write tensors holding NaN / Inf; by default the first one fails the conversion
      (`NonFiniteError`, naming it) and nothing is written.
    """
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if layout is not None and layout not in OUTPUT_LAYOUTS:
        raise FluxJaxError(f"unknown output layout {layout!r}; choose one of {', '.join(OUTPUT_LAYOUTS)}")
    target = None if dtype is None else parse_dtype(dtype)
    remove_stale_temporaries(dst)  # left by an earlier run for this destination that was killed
    # Refuse before reading anything: an existing output is the cheapest mistake to report.
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} already exists (use --force to overwrite)")
    if dst.resolve() == src.resolve():
        raise FluxJaxError(f"{dst}: the output would overwrite the input")
    start = time.perf_counter()
    with open_checkpoint(src, config=config) as ckpt:
        layout = layout or ("bfl" if ckpt.layout == "flax" else "flax")
        target = target if target is not None else default_dtype(ckpt, layout)
        total = _flax_bytes(ckpt, target) if layout == "flax" else output_bytes(ckpt, target)
        bar = _progress_bar(total, f"{src.name} -> {dst.name}", enabled=progress)
        written = 0

        def step(n: int) -> None:
            nonlocal written
            written += n
            bar.update(n)

        try:
            options = {"force": force, "progress": step, "allow_nonfinite": allow_nonfinite}
            if layout == "flax":
                write_flax_checkpoint(ckpt, dst, dtype=target, **options)
            elif layout == "bfl":
                write_flux_bfl(ckpt, dst, dtype=target, **options)
            else:
                write_flux_diffusers(ckpt, dst, dtype=target, max_shard_bytes=max_shard_bytes, **options)
        finally:
            bar.close()
        return ConversionResult(
            src=src,
            dst=dst,
            src_layout=ckpt.layout,
            layout=layout,
            dtype="keep" if target is None else target.name,
            bytes_written=written,
            seconds=time.perf_counter() - start,
        )


def _progress_bar(total: int, desc: str, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=True)
