"""Bytes a compiled XLA module moves per device: over the chip interconnect (collectives) and to and from HBM.

Read from the same optimized HLO text as ``hlo_flops`` and walked the same way (``hlo_flops.Module``): a ``while``
body counts as many times as the loop runs, so the 19 + 38 scanned Flux blocks are all in the figures.

**Collectives** (per device, every loop iteration): each all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute, sync or async, counted once (an async ``-start`` carries the work, its ``-done`` none; libtpu's
async collective fusions repeat one collective, tagged with a ``chain_id``, in their start, continuation and done
computations, and only the one under the ``AsyncCollectiveStart`` is counted). The group size n is read from
``replica_groups`` (``{{0,1},{2,3}}``, iota ``[2,4]<=[8]`` and ``mesh[...] {axes}`` forms). Bytes each device sends
over ICI, by the usual ring costs: all-gather (n-1)/n x output (= (n-1) x input), reduce-scatter (n-1)/n x input,
all-reduce 2(n-1)/n x input, all-to-all (n-1)/n x input, collective-permute its input.

**HBM traffic** (an estimate): every top-level instruction of each computation that runs reads its operands and
writes its output, times how often the computation runs. A fusion counts its operands and output, not its insides
(the point of fusing), with XLA's cost-analysis refinements: a fusion operand read only through a slice or
dynamic-slice counts the slice, an operand updated in place by a dynamic-update-slice counts nothing and the output
the update, and an operand a multi-output fusion passes through to its output untouched (libtpu's async collective
fusions carry their buffers so) counts neither as read nor as written; top-level slices, dynamic-(update-)slices
and gathers likewise count the part they touch. Parameters,
constants, tuples, get-tuple-element, bitcasts and control flow (whose bodies are counted themselves) move nothing.
It ignores caching (a weight read by two fusions counts twice), buffer aliasing beyond those in-place updates,
on-chip memory (TPU operands in VMEM count as HBM) and layout padding (sizes are unpadded). ``flat_hbm_bytes`` is
the same sum with every loop body counted once, as ``cost_analysis()["bytes accessed"]`` does. For a CPU-compiled
module the two agree up to what XLA adds for tuples (their index tables, 8 bytes per element, where this counts
nothing); custom calls (XLA counts -1 each; here operands and output) and async wrappers (XLA also counts an
``async-done``'s output) would differ too. libtpu's own cost analysis differs more: it sizes arrays by their tiled,
padded TPU layouts and has its own rules (for the tiny model on v5e-4 with fsdp 4, whose small dims pad a lot, this
flat figure is under half of XLA's).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict

from flux_jax.planning.hlo_flops import Instruction, LoopInfo, Module

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# Opcodes that start (or are) one collective; async-wrapped ones ("async-start", calls=...) are found inside the
# wrapped computation as their sync opcode.
_COLLECTIVES = {
    "all-gather": "all-gather",
    "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute",
}
# Move no data themselves (control flow is walked into instead).
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
         "after-all", "add-dependency", "opt-barrier", "domain", "async-start",
         "async-update", "async-done"}  # fmt: skip
# Only these run their called computations as top-level code (a fusion's or reducer's computation does not).
_RUNS_CALLEES = {"call", "conditional", "async-start"}


@dataclasses.dataclass(frozen=True)
class Traffic:
    collective_bytes: dict[str, float]
    """Bytes each device sends over ICI per run of the module, by collective kind (every loop iteration)."""
    hbm_bytes: float
    """Estimated HBM bytes read and written per device per run (every loop iteration; see the module docstring)."""
    flat_hbm_bytes: float
    """The same with every loop body counted once, comparable to ``cost_analysis()["bytes accessed"]``."""
    loops: tuple[LoopInfo, ...]
    unknown_groups: int = 0
    """Collectives whose ``replica_groups`` could not be read (counted over every device)."""

    @property
    def ici_bytes(self) -> float:
        return sum(self.collective_bytes.values())


def group_size(inst: Instruction, module: Module) -> int | None:
    """Devices in each of ``inst``'s replica groups, or None where the attribute is unreadable."""
    m = re.search(r"replica_groups=", inst.attrs)
    if m is None:
        return _all_devices(inst, module)
    text = inst.attrs[m.end() :]
    if text.startswith("mesh["):  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the listed axes form a group
        mesh = re.match(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
        if mesh is None:
            return None
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        axes = re.findall(r"'([^']+)'", mesh.group(2))
        if any(axis not in sizes for axis in axes):
            return None
        return math.prod(sizes[axis] for axis in axes)
    iota = re.match(r"\[(\d+(?:,\d+)*)\]<=", text)  # [groups, size]<=[devices]
    if iota:
        return int(iota.group(1).split(",")[-1])
    explicit = re.match(r"\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)?\}", text)
    if explicit is None:
        return None
    if not explicit.group(1):  # {}: one group of every device
        return _all_devices(inst, module)
    first = re.match(r"\{([\d,\s]*)\}", explicit.group(1))
    return len([d for d in first.group(1).split(",") if d.strip()])


def _all_devices(inst: Instruction, module: Module) -> int:
    if "use_global_device_ids=true" in inst.attrs:
        return module.num_partitions * module.replica_count
    return module.num_partitions if "channel_id=" in inst.attrs else module.replica_count


def _operand_bytes(inst: Instruction, module: Module, operands: tuple[str, ...] | None = None) -> int:
    names = inst.operands if operands is None else operands
    return sum(module.defs[o].bytes for o in names if o in module.defs)


def count_traffic(text: str) -> Traffic:
    """Collective and HBM bytes per device of the HLO module ``text`` (see the module docstring)."""
    module = Module(text)
    starts = {
        name
        for name, insts in module.comps.items()
        if (root := module.root(name)) is not None
        and root.opcode == "custom-call"
        and 'custom_call_target="AsyncCollectiveStart"' in root.attrs
    }
    unknown: set[str] = set()

    def collective(kind: str):
        def cost(inst: Instruction, comp: str) -> float:
            if _COLLECTIVES.get(inst.opcode) != kind:
                return 0.0
            if 'chain_id="' in inst.attrs and comp not in starts:
                return 0.0  # a continuation or done of an async collective fusion: counted at its start
            if kind == "collective-permute":
                data = inst.operands[:1] if "slice_sizes=" in inst.attrs else inst.operands  # in-place form
                return float(_operand_bytes(inst, module, data))
            n = group_size(inst, module)
            if n is None:
                unknown.add(inst.name)
                n = _all_devices(inst, module)
            sent = _operand_bytes(inst, module)
            factor = {"all-gather": n - 1, "reduce-scatter": (n - 1) / n, "all-reduce": 2 * (n - 1) / n,
                      "all-to-all": (n - 1) / n}[kind]  # fmt: skip
            return factor * sent

        return cost

    hbm = _HbmCost(module)
    loops: list[LoopInfo] = []
    collectives = {kind: module.total(collective(kind), flat=False) for kind in KINDS}
    hbm_bytes = module.total(hbm, flat=False, descend=lambda i: i.opcode in _RUNS_CALLEES, loops=loops)
    flat = module.total(hbm, flat=True, descend=lambda i: i.opcode in _RUNS_CALLEES)
    return Traffic(collective_bytes=collectives, hbm_bytes=hbm_bytes, flat_hbm_bytes=flat, loops=tuple(loops),
                   unknown_groups=len(unknown))  # fmt: skip


class _HbmCost:
    """Bytes one top-level instruction reads and writes (the rules of the module docstring)."""

    def __init__(self, module: Module):
        self.module = module
        self.defs = module.defs

    def __call__(self, inst: Instruction, comp: str) -> float:
        op = inst.opcode
        if op in _FREE:
            return 0.0
        if op.endswith("-start"):  # all-gather-start, copy-start, ...: reads its operands
            return float(_operand_bytes(inst, self.module))
        if op.endswith("-done"):  # ... and its -done writes the result
            return float(inst.bytes)
        if op == "fusion":
            return float(self._fusion(inst))
        if op == "slice":
            return 2.0 * inst.bytes
        if op == "dynamic-slice":
            return 2.0 * inst.bytes + _operand_bytes(inst, self.module, inst.operands[1:])
        if op == "dynamic-update-slice":
            return 2.0 * self._bytes(inst.operands[1]) + _operand_bytes(inst, self.module, inst.operands[2:])
        if op == "gather":
            return 2.0 * inst.bytes + self._bytes(inst.operands[1])
        if op == "scatter" and len(inst.operands) == 3:
            return 3.0 * self._bytes(inst.operands[2]) + self._bytes(inst.operands[1])
        return float(_operand_bytes(inst, self.module) + inst.bytes)

    def _bytes(self, name: str) -> int:
        inst = self.defs.get(name)
        return inst.bytes if inst is not None else 0

    def _fusion(self, inst: Instruction) -> int:
        fused = self._called(inst)
        if fused is None:
            return _operand_bytes(inst, self.module) + inst.bytes
        insts = self.module.comps[fused]
        root = self.module.root(fused)
        total = inst.bytes
        if root is not None and root.opcode == "dynamic-update-slice":  # written in place: only the update moves
            total = self._bytes(root.operands[1])
        elif root is not None and root.opcode == "tuple":
            total = 0
            for name in root.operands:
                part = self.defs.get(name)
                if part is None or part.opcode == "parameter":  # passed through (libtpu's async collectives)
                    continue
                total += self._bytes(part.operands[1]) if part.opcode == "dynamic-update-slice" else part.bytes
        params = self._params(fused)
        for i in range(len(inst.operands)):
            if i in params:
                total += self._read(fused, params[i])
        # Constant arrays inside the fusion are read from memory too (scalars are immediates).
        total += sum(c.bytes for c in insts if c.opcode == "constant" and c.leaves and math.prod(c.leaves[0][1]) > 1)
        return total

    def _called(self, inst: Instruction) -> str | None:
        m = re.search(r"calls=%?([\w.\-]+)", inst.attrs)
        return m.group(1) if m and m.group(1) in self.module.comps else None

    @functools.cache  # noqa: B019 (one instance per count_traffic call)
    def _params(self, comp: str) -> dict[int, Instruction]:
        return {int(i.literal): i for i in self.module.comps[comp] if i.opcode == "parameter" and i.literal.isdigit()}

    @functools.cache  # noqa: B019
    def _users(self, comp: str) -> dict[str, list[tuple[Instruction, int]]]:
        users: dict[str, list[tuple[Instruction, int]]] = defaultdict(list)
        for inst in self.module.comps[comp]:
            for k, name in enumerate(inst.operands):
                users[name].append((inst, k))
        return users

    def _read(self, comp: str, param: Instruction) -> int:
        """Bytes a fused computation reads of ``param`` (XLA's ``FusionParameterReadBytes``)."""
        size, shared = 0, False
        seen: set[str] = set()
        for user, k in self._users(comp).get(param.name, []):
            if user.opcode == "fusion":  # a nested fusion: what it reads of its own parameter
                nested = self._called(user)
                inner = self._params(nested).get(k) if nested else None
                size += self._read(nested, inner) if inner is not None else param.bytes
                continue
            if user.name in seen or (user.opcode == "tuple" and user.root):
                continue  # read once; or passed through to the output untouched
            seen.add(user.name)
            if user.opcode == "slice" or (user.opcode == "dynamic-slice" and k == 0):
                size += user.bytes
            elif user.opcode in ("broadcast", "reshape"):
                size += param.bytes
            elif user.opcode == "dynamic-update-slice" and k == 0:
                continue  # updated in place
            elif not shared:  # every other reader shares one read
                shared = True
                size += param.bytes
        return size
