"""Accelerator facts: the TPU generations and slices, and the peak FLOP/s that MFU is measured against.

The lowest layer of the package: plain data and pure functions, importing only the standard library and
``flux_jax.errors`` (no JAX), so the launcher, the planner and the trainer all read the same table.

Every TPU fact (runtime image, HBM size and bandwidth, ICI bandwidth, TensorCores per chip, chips per VM, peak
FLOP/s, the ``device_kind`` strings JAX reports) lives in ``GENERATIONS`` and nowhere else; the mesh configs'
header comments are checked against it by the tests.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from flux_jax.errors import FluxJaxError


class SliceError(FluxJaxError):
    """A TPU slice name is invalid: not GENERATION-COUNT, an unknown generation, or an impossible size."""


# --------------------------------------------------------------------------------------------------
# TPU generations


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    """Our short name and the prefix of slice names (``v5e-8``) and AOT topologies (``v5e:2x4``)."""
    accelerator_prefix: str
    """Prefix of gcloud's ``--accelerator-type`` (v5e is ``v5litepod-N``)."""
    runtime_version: str
    """The TPU VM image for JAX (cloud.google.com/tpu/docs/runtimes)."""
    hbm_gib: int
    cores_per_chip: int
    """TensorCores per chip. v4 / v5p accelerator types count cores (v5p-8 is 4 chips); JAX sees one device
    per chip (megacore), which is what mesh sizes count."""
    topology_rank: int
    """2 for the 2D-torus generations, 3 for the 3D ones."""
    max_single_host_chips: int
    """The largest slice served by one VM; bigger slices have 4 chips per VM."""
    max_chips: int
    peak_flops: float
    """Dense bf16 peak FLOP/s of one chip (what MFU is measured against)."""
    device_kinds: tuple[str, ...]
    """Substrings of the ``device_kind`` that JAX reports for this generation's chips (see :func:`peak_flops`)."""
    hbm_bandwidth: float
    """HBM bytes/s of one chip."""
    ici_bandwidth: float
    """ICI bytes/s one chip sends over all its links at once (one direction): half the bidirectional per-chip
    figure Google gives. A collective over one torus axis uses only that axis's links, so this is a floor for
    the collective time, as peak FLOP/s is for compute."""


# Bandwidths from the system architecture tables of cloud.google.com/tpu/docs/v4, /v5e, /v5p and /v6e: HBM
# 1200, 819, 2765 and 1638 GB/s; bidirectional ICI per chip 400 (v5e), 1200 (v5p) and 800 (v6e) GB/s, halved here
# (older revisions of those pages give the one-way figures: 1600 and 4800 Gbps). The v4 page gives no ICI
# figure: its 6 links of 400 Gbps each way (glennklockwood.com/garden/processors/TPUv4, from the TPU v4 paper)
# are 300 GB/s one way.
# fmt: off
GENERATIONS: Mapping[str, Generation] = {
    g.name: g
    for g in (
        Generation("v4", "v4", "tpu-ubuntu2204-base", 32, 2, 3, 4, 4096, 275e12, ("TPU v4",),
                   hbm_bandwidth=1200e9, ici_bandwidth=300e9),
        Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", 16, 1, 2, 8, 256, 197e12, ("TPU v5 lite", "TPU v5e"),
                   hbm_bandwidth=819e9, ici_bandwidth=200e9),
        # v5p devices report their kind as plain "TPU v5" (a substring of v5e's "TPU v5 lite").
        Generation("v5p", "v5p", "v2-alpha-tpuv5", 95, 2, 3, 4, 4096, 459e12, ("TPU v5p", "TPU v5"),
                   hbm_bandwidth=2765e9, ici_bandwidth=600e9),
        Generation("v6e", "v6e", "v2-alpha-tpuv6e", 32, 1, 2, 8, 256, 918e12, ("TPU v6",),
                   hbm_bandwidth=1638e9, ici_bandwidth=400e9),
    )
}
# fmt: on
CHIPS_PER_HOST_MULTI = 4


# --------------------------------------------------------------------------------------------------
# Slices


@dataclasses.dataclass(frozen=True)
class Slice:
    generation: Generation
    chips: int

    @property
    def count(self) -> int:
        """The number in the slice name: TensorCores, which equals chips except on v4 / v5p."""
        return self.chips * self.generation.cores_per_chip

    @property
    def name(self) -> str:
        return f"{self.generation.name}-{self.count}"

    @property
    def accelerator_type(self) -> str:
        return f"{self.generation.accelerator_prefix}-{self.count}"

    @property
    def hosts(self) -> int:
        if self.chips <= self.generation.max_single_host_chips:
            return 1
        return self.chips // CHIPS_PER_HOST_MULTI

    @property
    def topology(self) -> str:
        """The ICI shape as ``jax.experimental.topologies`` names it, e.g. ``v5e:2x4`` or ``v4:2x2x1``."""
        return f"{self.generation.name}:{'x'.join(map(str, _torus_dims(self.chips, self.generation.topology_rank)))}"


def _torus_dims(chips: int, rank: int) -> list[int]:
    # Cloud TPU grows slices by doubling the smallest torus dimension (the last one among equals):
    # 2D 2x2 -> 2x4 -> 4x4 -> 4x8 ...; 3D 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ...
    dims = [1] * rank
    if rank == 3 and chips >= 4:
        dims = [2, 2, 1]
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return dims


_SLICE_RE = re.compile(r"^(?P<prefix>[a-z0-9]+)-(?P<count>\d+)$")


def parse_slice(text: str) -> Slice:
    """``v5e-8`` or gcloud's ``v5litepod-8`` -> Slice; the number counts TensorCores, as gcloud does."""
    match = _SLICE_RE.match(text.strip().lower())
    known = ", ".join(sorted(GENERATIONS))
    if not match:
        raise SliceError(f"slice {text!r} is not of the form GENERATION-COUNT (e.g. v5e-8); generations: {known}")
    prefix, count = match["prefix"], int(match["count"])
    gen = GENERATIONS.get(prefix) or next((g for g in GENERATIONS.values() if g.accelerator_prefix == prefix), None)
    if gen is None:
        raise SliceError(f"slice {text!r}: unknown TPU generation {prefix!r}; known: {known}")
    chips, rest = divmod(count, gen.cores_per_chip)
    smallest = 4 if gen.topology_rank == 3 else 1
    if (
        rest
        or chips < smallest
        or chips > gen.max_chips
        or chips & (chips - 1)
        or (gen.topology_rank == 2 and chips == 2)  # 2D slices go 1x1, then 2x2
    ):
        raise SliceError(
            f"slice {text!r}: {gen.name} slices have a power-of-two chip count from {smallest} to {gen.max_chips}"
            + (f" (the name counts TensorCores, {gen.cores_per_chip} per chip)" if gen.cores_per_chip > 1 else "")
        )
    return Slice(gen, chips)


# --------------------------------------------------------------------------------------------------
# Peak FLOP/s


GPU_PEAK_FLOPS: Mapping[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}
"""Dense bf16 peak FLOP/s of the GPUs we know, by a substring of their ``device_kind``."""

PEAK_FLOPS: Mapping[str, float] = {
    **GPU_PEAK_FLOPS,
    **{kind: g.peak_flops for g in GENERATIONS.values() for kind in g.device_kinds},
}
"""Dense bf16 peak FLOP/s per device by a substring of ``device_kind``: the GPUs, then every TPU generation."""


def peak_flops(device: Any, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else a known accelerator's bf16 peak, else None (e.g. CPU).

    ``device`` is anything with a ``device_kind`` (a ``jax.Device``). The longest key of :data:`PEAK_FLOPS`
    found in it (case-insensitively) wins, so "TPU v5 lite" is a v5e although it also contains v5p's "TPU v5".
    """
    if override_tflops:
        return override_tflops * 1e12
    kind = str(getattr(device, "device_kind", "")).lower()
    found = [name for name in PEAK_FLOPS if name.lower() in kind]
    if not found:
        return None
    return PEAK_FLOPS[max(found, key=len)]
