"""Device memory of a compiled step, and ``model.remat: auto``: the cheapest remat policy whose step fits.

Rematerialisation trades compute for memory: "none" keeps every activation of the 57 blocks for the backward pass
(fastest, most memory), "save_matmuls" keeps only the weight matmuls' outputs and recomputes the rest, "full" keeps
nothing but each block's input (about a third more compute). Which one fits depends on the model, the resolution,
the batch per chip and the chip, so a fixed default is either wasteful or out of memory somewhere. ``auto`` asks the
compiler: before the first step runs, the step is compiled with each policy in ``AUTO_ORDER`` (cheapest in compute
first) and the first whose compiled memory (``memory_analysis()``: arguments + outputs + temporaries - donated
aliases, per device) is within the device's memory is the one the run uses; the chosen executable is the one that
runs, so choosing costs one compile when "none" fits. The TPU compiler refuses a program that does not fit HBM; that
refusal counts as "does not fit" with the figures it names (``parse_oom``).

``flux-jax plan`` compiles every policy (``evaluate_all``) and prints each one's per-chip memory for the slice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from flux_jax.errors import FluxJaxError
from flux_jax.model.flux import configure

log = logging.getLogger(__name__)

AUTO = "auto"
AUTO_ORDER: tuple[str, ...] = ("none", "save_matmuls", "full")
"""Cheapest in compute first: no recomputation, then recomputing only the cheap elementwise work, then all of it."""


def initial_policy(remat: str) -> str:
    """The policy a model is built with: ``auto`` builds as the first candidate (the compiler later decides)."""
    return AUTO_ORDER[0] if remat == AUTO else remat


# The TPU compiler's out-of-memory errors, e.g. "Ran out of memory on HBM, the total memory required for HLO
# temporaries (36.00G) exceeds available HBM (15.75G)." (libtpu 0.0.42) or "Used 20.1G of 15.75G hbm.".
_OOM = (
    re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", re.IGNORECASE),
    re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.IGNORECASE),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the TPU compiler's out-of-memory error, or None for other errors."""
    for pattern in _OOM:
        m = pattern.search(message)
        if m:
            need, available = (float(m.group(i)) * _UNITS[m.group(i + 1).upper()] for i in (1, 3))
            return int(need), int(available)
    return None


def memory_summary(compiled: jax.stages.Compiled) -> dict[str, float] | None:
    """Per-device bytes of the compiled step (arguments, outputs, temporaries, donated aliases), in GiB."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if stats is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {f.removesuffix("_size_in_bytes"): getattr(stats, f, 0) / 2**30 for f in fields}
    # Peak live memory of the step: inputs + outputs + temporaries, minus outputs that reuse donated inputs.
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def device_capacity(device: Any) -> int | None:
    """Bytes one device can hold: the runtime's limit (GPU, TPU); on the CPU, this host's memory shared by its
    local devices (fake CPU devices all live in one process's RAM); None when unknown (then any policy fits)."""
    try:
        stats = device.memory_stats()
    except Exception:  # not implemented on every backend
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        return host // max(1, jax.local_device_count("cpu"))
    return None


@dataclasses.dataclass(frozen=True)
class RematOption:
    """One policy's compiled per-device memory."""

    policy: str
    total: int | None
    """Per-device bytes of the compiled step (the compiler's own "needed" figure when it refused); None when the
    backend has no memory analysis."""
    refused: bool = False
    """The compiler refused the program (out of memory)."""

    def fits(self, capacity: int | None) -> bool:
        return not self.refused and (capacity is None or self.total is None or self.total <= capacity)


@dataclasses.dataclass(frozen=True)
class RematSearch:
    """How ``auto`` searches: the device capacity to fit, and whether to compile every policy (the planner) or
    stop at the first that fits (the trainer)."""

    capacity: int | None
    evaluate_all: bool = False
    candidates: Sequence[str] = AUTO_ORDER


class NoRematFits(FluxJaxError):
    """The compiler refused the step under every remat policy (out of device memory)."""

    def __init__(self, message: str, options: Sequence[RematOption]):
        super().__init__(message)
        self.options = tuple(options)


def with_remat(graphdef: nnx.GraphDef, states: Sequence[Any], policy: str) -> nnx.GraphDef:
    """``graphdef`` with another remat policy (a static attribute of the model, so part of the graph definition).
    ``states``: the model's state pieces (arrays or ShapeDtypeStructs), only to rebuild the module."""
    model = nnx.merge(graphdef, *states)
    configure(model, remat=policy)
    return nnx.graphdef(model)


def choose(compile_policy, search: RematSearch) -> tuple[str, Any, tuple[RematOption, ...]]:
    """Compile with each candidate policy (``compile_policy(policy) -> compiled``) and pick the first that fits
    (see the module docstring). Returns (policy, its executable, the options compiled). When every compiled
    policy exceeds the capacity, the one needing the least memory is used, with a warning (the capacity is an
    estimate on some backends); when the compiler refused every policy, ``NoRematFits``."""
    options: list[RematOption] = []
    compiled_by: dict[str, Any] = {}
    chosen = None
    for policy in search.candidates:
        try:
            compiled = compile_policy(policy)
        except jax.errors.JaxRuntimeError as e:
            oom = parse_oom(str(e))
            if oom is None:
                raise
            options.append(RematOption(policy, oom[0], refused=True))
            continue
        mem = memory_summary(compiled)
        total = None if mem is None else int(round(mem["total"] * 2**30))
        option = RematOption(policy, total)
        options.append(option)
        compiled_by[policy] = compiled
        if chosen is None and option.fits(search.capacity):
            chosen = policy
            if not search.evaluate_all:
                break
    summary = ", ".join(_describe(o, search.capacity) for o in options)
    if chosen is None:
        if not compiled_by:
            raise NoRematFits(f"the train step does not fit the device under any remat policy ({summary})", options)
        chosen = min((o for o in options if o.policy in compiled_by), key=lambda o: o.total or 0).policy
        log.warning("remat auto: no policy fits the device's %s (%s); using %r, which needs the least",
                    _gib(search.capacity), summary, chosen)  # fmt: skip
    else:
        log.info("remat auto: chose %r for %s per device (%s)", chosen, _gib(search.capacity), summary)
    return chosen, compiled_by[chosen], tuple(options)


def _describe(o: RematOption, capacity: int | None) -> str:
    size = "no memory analysis" if o.total is None else _gib(o.total)
    verdict = "refused by the compiler" if o.refused else ("fits" if o.fits(capacity) else "does not fit")
    return f"{o.policy} {size} ({verdict})"


def _gib(n: int | None) -> str:
    return "unknown memory" if n is None else f"{n / 2**30:.2f} GiB"
