"""TPU targets for ahead-of-time compilation on a machine without TPUs.

A target is named like a slice (``v5e-8``, gcloud's ``v5litepod-8``) or like a topology (``v5e:2x4``,
``v4:2x2x1``). Its compile-only devices come from libtpu (the ``tpu`` extra) through
``jax.experimental.topologies.get_topology_desc``, which needs the TPU plugin initialised with the environment
in ``AOT_ENV`` and JAX's own backend kept on the CPU; :func:`aot_environment` gives that environment, and
``flux-jax plan`` re-executes itself with it when its process was started without it.

Megacore: a v4 or v5p chip has two TensorCores that JAX on a TPU VM drives as one device (a v4-8 slice is 4
chips, 4 JAX devices, 32 GiB each). libtpu's default topology for v4 lists every TensorCore as a device (8 for
v4:2x2x1, each with half a chip), so targets of two-core generations ask for ``chip_config_name="megacore"``: one
device per chip, as on the VM. Memory and FLOPs below are therefore always per chip.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flux_jax import hardware
from flux_jax.errors import FluxJaxError
from flux_jax.hardware import GENERATIONS, Generation, Slice, SliceError, parse_slice

# The environment libtpu needs to describe a topology on a host that is not a TPU VM (no metadata server, one
# "worker"), with JAX's own backend on the CPU. ALLOW_MULTIPLE_LIBTPU_LOAD lets several such processes (e.g. tests
# in parallel) load libtpu at once instead of failing on its /tmp/libtpu_lockfile.
AOT_ENV: Mapping[str, str] = {
    "JAX_PLATFORMS": "cpu",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}

_TOPOLOGY_RE = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<dims>\d+(x\d+)*)$")


class TopologyError(FluxJaxError):
    """A TPU target name is invalid, or libtpu cannot describe it."""


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    generation: Generation
    chips: int
    topology: str
    """The name libtpu knows, e.g. ``v5e:2x4``."""

    @property
    def slice(self) -> Slice:
        return Slice(self.generation, self.chips)

    @property
    def name(self) -> str:
        """The slice name (``v5e-8``; v4 / v5p count TensorCores: ``v4-8`` is 4 chips)."""
        return self.slice.name

    @property
    def accelerator_type(self) -> str:
        return self.slice.accelerator_type

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_gib * 2**30

    @property
    def topology_options(self) -> dict[str, str]:
        return {"chip_config_name": "megacore"} if self.generation.cores_per_chip > 1 else {}


def parse_target(text: str) -> TpuTarget:
    """``v5e-8`` / ``v5litepod-8`` (a slice) or ``v5e:2x4`` (a topology) -> TpuTarget."""
    text = text.strip().lower()
    match = _TOPOLOGY_RE.match(text)
    if match is None:
        try:
            piece = parse_slice(text)
        except SliceError as e:
            raise TopologyError(f"{e}; or name a topology such as v5e:2x4") from None
        return TpuTarget(piece.generation, piece.chips, piece.topology)
    gen = GENERATIONS.get(match["gen"])
    if gen is None:
        raise TopologyError(f"topology {text!r}: unknown TPU generation {match['gen']!r}; known: {sorted(GENERATIONS)}")
    dims = [int(d) for d in match["dims"].split("x")]
    if len(dims) != gen.topology_rank or min(dims) < 1:
        example = "x".join(["2"] * gen.topology_rank)
        raise TopologyError(f"topology {text!r}: {gen.name} topologies have {gen.topology_rank} dimensions, "
                            f"e.g. {gen.name}:{example}")  # fmt: skip
    return TpuTarget(gen, math.prod(dims), text)


def aot_environment(target: TpuTarget) -> dict[str, str]:
    """The variables to set (before JAX starts) so that ``target``'s compile-only devices can be made."""
    return {**AOT_ENV, "TPU_ACCELERATOR_TYPE": target.accelerator_type}


def environment_ready(target: TpuTarget, environ: Mapping[str, str] = os.environ) -> bool:
    return all(environ.get(k) == v for k, v in aot_environment(target).items())


def devices(target: TpuTarget) -> Sequence[Any]:
    """The target's compile-only devices, one per chip (see the module docstring on megacore)."""
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **target.topology_options)
    except Exception as e:  # RuntimeError (no libtpu), JaxRuntimeError (bad name, lockfile): all user-facing
        hint = ""
        if "not installed" in str(e) or "libtpu" in str(e).lower():
            hint = " (install the tpu extra: pip install 'flux-jax[tpu]', which brings libtpu)"
        raise TopologyError(f"cannot describe TPU topology {target.topology!r}: {str(e).strip()}{hint}") from None
    found = list(topo.devices)
    if len(found) != target.chips:
        raise TopologyError(f"topology {target.topology!r} has {len(found)} devices, expected one per chip "
                            f"({target.chips})")  # fmt: skip
    return found


def peak_flops(target: TpuTarget, device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of one chip: the device kind's entry in ``flux_jax.hardware.PEAK_FLOPS``, else the
    generation's own ``peak_flops``.

    A compile-only v5p device calls itself "TPU v5", which the hardware table maps to v5p; a kind the table does
    not know still gets the target generation's peak.
    """
    return hardware.peak_flops(device) or target.generation.peak_flops
