"""Matmul FLOPs of a compiled XLA module, counting loop bodies as many times as the loops run.

XLA's ``cost_analysis()`` counts a ``while`` body once. The Flux step runs its 19 double and 38 single blocks in
``lax.scan`` loops (forward, and again for the backward pass and rematerialisation), so XLA's figure is off by
roughly the depth. This module reads the optimized HLO text (``compiled.as_text()``), counts the FLOPs of every
``dot`` and ``convolution`` (``2 x output elements x contracted size``, the usual multiply-add count) and
multiplies each computation by how often it runs: a ``while`` body by its trip count, read from the loop's
condition (``counter < N``), the counter's initial value and its step (XLA unrolls some loops and then steps by
more than 1); everything else (fusions, calls) once. A loop whose count cannot be read is counted once and
reported in ``FlopCount.loops``.

Only matmul FLOPs are counted (elementwise work is small next to them in a transformer), including those inside
the splash-attention kernels, which are custom calls XLA's own count skips; ``flat`` gives the
same count with every loop body once, for a like-for-like check against ``cost_analysis()["flops"]``.

``Module`` holds the parsed text and walks it with those multiplicities; ``hlo_traffic`` counts bytes with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable

import numpy as np

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?P<root>ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"^(?P<dtype>\w+)\[(?P<dims>[\d,\s]*)\]")
_LEAF = re.compile(r"\b(?P<dtype>[a-z]+\d*[a-z\d]*)\[(?P<dims>[\d,\s]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALL_ATTRS = ("calls", "to_apply", "true_computation", "false_computation")
_LIST_ATTRS = ("branch_computations", "called_computations")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: tuple[int, ...] | None
    """Array dims; None for tuples and tokens."""
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    """Everything after the operand list (attributes, metadata)."""
    root: bool = False
    literal: str = ""
    """The text inside a ``constant(...)`` or a ``parameter(...)`` (its number)."""
    leaves: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(element type, dims) of every array in the result type, in order (one for an array, each element of a
    tuple); tokens and other non-arrays are left out."""

    @property
    def bytes(self) -> int:
        """Bytes of the result: every array leaf, unpadded (XLA's tiled layouts may pad on the device)."""
        return sum(_array_bytes(dtype, dims) for dtype, dims in self.leaves)


@dataclasses.dataclass(frozen=True)
class LoopInfo:
    body: str
    trips: int
    known: bool
    """False when the trip count could not be read from the HLO (then it is counted once)."""


@dataclasses.dataclass(frozen=True)
class FlopCount:
    flops: float
    """Matmul FLOPs of one execution of the module (per device: the module is the SPMD-partitioned program)."""
    flat_flops: float
    """The same with every loop body counted once, as XLA's cost analysis does."""
    loops: tuple[LoopInfo, ...]

    @property
    def unknown_loops(self) -> int:
        return sum(not loop.known for loop in self.loops)


# Bits per element of XLA's array types; "f8e4m3fn" and the other 8-bit floats are matched by their prefix.
_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8": 8, "f4": 4, "s16": 16, "u16": 16,
         "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64,
         "c128": 128}  # fmt: skip


def _element_bits(dtype: str) -> int | None:
    if dtype in _BITS:
        return _BITS[dtype]
    return 8 if dtype.startswith("f8") else 4 if dtype.startswith("f4") else None  # f8e4m3fn, f4e2m1fn, ...


def _array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return math.prod(dims) * (_element_bits(dtype) or 0) // 8


def _leaves(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d.strip()))
                 for m in _LEAF.finditer(type_text) if _element_bits(m["dtype"]) is not None)  # fmt: skip


def _split_type(rest: str) -> tuple[str, str]:
    """``"bf16[2,3]{1,0} dot(...)..."`` -> (type text, remainder); tuple types are matched by parentheses."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
        return rest, ""
    head, _, tail = rest.partition(" ")
    return head, tail.lstrip()


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    type_text, rest = _split_type(m["rest"])
    array = _ARRAY.match(type_text)
    shape = tuple(int(d) for d in array["dims"].split(",") if d.strip()) if array else None
    opcode, paren, after = rest.partition("(")
    leaves = _leaves(type_text)
    if not paren:
        return Instruction(m["name"], shape, opcode.strip(), (), "", bool(m["root"]), leaves=leaves)
    depth, end = 1, len(after)
    for i, ch in enumerate(after):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    opcode = opcode.strip()
    inside = after[:end]
    return Instruction(m["name"], shape, opcode, tuple(_OPERAND.findall(inside)), after[end + 1 :], bool(m["root"]),
                       inside if opcode in ("constant", "parameter") else "", leaves)  # fmt: skip


def parse_module(text: str) -> dict[str, list[Instruction]]:
    """Computation name -> its instructions, from HLO module text; the entry computation is also ``"ENTRY"``."""
    comps: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = comps.setdefault(header["name"], [])
                if line.startswith("ENTRY"):
                    comps["ENTRY"] = current
            continue
        if line.strip() == "}":
            current = None
            continue
        inst = _parse_instruction(line)
        if inst is not None:
            current.append(inst)
    return comps


def _root(insts: list[Instruction]) -> Instruction | None:
    return next((i for i in insts if i.root), None)


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"(?:^|[\s,]){key}=(\{{[^}}]*\}}|[^,\s]+)", attrs)
    return m.group(1) if m else None


def _dims(text: str | None) -> list[int]:
    if not text:
        return []
    return [int(d) for d in text.strip("{}").split(",") if d.strip()]


def _dot_flops(inst: Instruction, shapes: dict[str, tuple[int, ...] | None]) -> float:
    if inst.shape is None or not inst.operands:
        return 0.0
    out = math.prod(inst.shape)
    if inst.opcode == "dot":
        lhs = shapes.get(inst.operands[0])
        if lhs is None:
            return 0.0
        contracted = math.prod(lhs[d] for d in _dims(_attr(inst.attrs, "lhs_contracting_dims")))
        return 2.0 * out * contracted
    # convolution: every output element contracts the kernel's input features over the window positions that land
    # on real (not padding, not dilation-hole) input elements. TPU HLO writes batched matmuls (attention) as
    # convolutions whose batch dim is a spatial dim with lhs_dilate = window size, where one position is valid.
    labels = _attr(inst.attrs, "dim_labels")
    if not labels or len(inst.operands) < 2:
        return 0.0
    lhs, rhs = shapes.get(inst.operands[0]), shapes.get(inst.operands[1])
    lhs_labels, rest = labels.split("_", 1)
    rhs_labels, out_labels = rest.split("->")
    if lhs is None or rhs is None or len(lhs_labels) != len(lhs) or len(rhs_labels) != len(rhs):
        return 0.0
    if len(out_labels) != len(inst.shape):
        return 0.0
    out_nonspatial = math.prod(size for label, size in zip(out_labels, inst.shape, strict=True) if label in "bf")
    in_features = rhs[rhs_labels.index("i")]
    window = _window(inst.attrs)
    valid = 1
    for d in sorted(c for c in rhs_labels if c.isdigit()):
        w = window[int(d)] if int(d) < len(window) else {}
        valid *= _valid_pairs(
            in_size=lhs[lhs_labels.index(d)],
            kernel=rhs[rhs_labels.index(d)],
            out_size=inst.shape[out_labels.index(d)],
            stride=w.get("stride", 1),
            pad_low=w.get("pad_low", 0),
            lhs_dilate=w.get("lhs_dilate", 1),
            rhs_dilate=w.get("rhs_dilate", 1),
        )
    return 2.0 * out_nonspatial * in_features * valid


def _window(attrs: str) -> list[dict[str, int]]:
    """``window={size=24 stride=23 lhs_dilate=24 pad=1_1}`` -> per spatial dim {stride, pad_low, dilations}."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    if not m:
        return []
    dims: list[dict[str, int]] = []
    for field in m.group(1).split():
        name, _, value = field.partition("=")
        parts = value.split("x")
        while len(dims) < len(parts):
            dims.append({})
        for i, part in enumerate(parts):
            if name == "pad":
                dims[i]["pad_low"] = int(part.split("_")[0])
            elif name in ("stride", "lhs_dilate", "rhs_dilate"):
                dims[i][name] = int(part)
    return dims


def _valid_pairs(*, in_size: int, kernel: int, out_size: int, stride: int, pad_low: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:  # fmt: skip
    """(output position, kernel position) pairs of one spatial dim that read a real input element."""
    out = np.arange(out_size, dtype=np.int64)[:, None]
    k = np.arange(kernel, dtype=np.int64)[None, :]
    pos = out * stride + k * rhs_dilate - pad_low  # index into the lhs after base dilation and padding
    real = (pos >= 0) & (pos % lhs_dilate == 0) & (pos // lhs_dilate < in_size)
    return int(real.sum())


def _resolve_constant(name: str, defs: dict[str, Instruction], consts: dict[str, int]) -> int | None:
    """The integer a scalar instruction holds, following copies and bitcasts to a constant."""
    for _ in range(16):
        if name in consts:
            return consts[name]
        inst = defs.get(name)
        if inst is None or inst.opcode not in ("copy", "bitcast", "convert") or not inst.operands:
            return None
        name = inst.operands[0]
    return None


def _through_copies(name: str, defs: dict[str, Instruction]) -> Instruction | None:
    """The instruction behind ``name``, skipping copies, bitcasts and converts (loop counters pass through them)."""
    inst = defs.get(name)
    for _ in range(16):
        if inst is None or inst.opcode not in ("copy", "bitcast", "convert") or not inst.operands:
            return inst
        inst = defs.get(inst.operands[0])
    return inst


class Module:
    """A parsed HLO module and how often each of its computations runs; ``hlo_traffic`` walks it the same way."""

    def __init__(self, text: str):
        self.comps = parse_module(text)
        if "ENTRY" not in self.comps:
            raise ValueError("no ENTRY computation in the HLO text")
        self.defs = {inst.name: inst for insts in self.comps.values() for inst in insts}
        self.shapes = {name: inst.shape for name, inst in self.defs.items()}
        self.consts = {
            name: int(inst.literal)
            for name, inst in self.defs.items()
            if inst.opcode == "constant" and inst.shape == () and re.fullmatch(r"-?\d+", inst.literal)
        }
        header = re.search(r"^HloModule\s.*?\bnum_partitions=(\d+)", text, re.MULTILINE)
        self.num_partitions = int(header.group(1)) if header else 1
        replicas = re.search(r"^HloModule\s.*?\breplica_count=(\d+)", text, re.MULTILINE)
        self.replica_count = int(replicas.group(1)) if replicas else 1

    def root(self, comp: str) -> Instruction | None:
        return _root(self.comps.get(comp, []))

    def trip_count(self, inst: Instruction) -> tuple[int, bool]:
        """How often the ``while`` ``inst`` runs its body, and whether that could be read (else 1)."""
        defs, consts = self.defs, self.consts
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
        if known:
            return int(known.group(1)), True
        cond = (_attr(inst.attrs, "condition") or "").lstrip("%")
        root = _root(self.comps.get(cond, []))
        if root is None or root.opcode != "compare" or len(root.operands) != 2:
            return 1, False
        direction = _attr(root.attrs, "direction")
        a, b = (_through_copies(o, defs) for o in root.operands)
        if direction == "GT":  # N > counter is counter < N
            a, b, direction = b, a, "LT"
        if direction not in ("LT", "LE") or a is None or b is None or a.opcode != "get-tuple-element":
            return 1, False
        limit = _resolve_constant(b.name, defs, consts)
        index = _attr(a.attrs, "index")
        init_tuple = defs.get(inst.operands[0]) if inst.operands else None
        if limit is None or index is None or init_tuple is None or init_tuple.opcode != "tuple":
            return 1, False
        start = _resolve_constant(init_tuple.operands[int(index)], defs, consts)
        step = self._loop_step(_attr(inst.attrs, "body"), int(index))
        if start is None or step is None or step <= 0:
            return 1, False
        # XLA unrolls some loops (collective matmuls) and then steps the counter by more than 1.
        trips = -(-(limit - start + (direction == "LE")) // step)
        return max(trips, 0), True

    def _loop_step(self, body: str | None, index: int) -> int | None:
        """The constant the body adds to tuple element ``index`` (the loop counter) each iteration."""
        defs = self.defs
        root = _root(self.comps.get((body or "").lstrip("%"), []))
        if root is None or root.opcode != "tuple" or index >= len(root.operands):
            return None
        update = defs.get(root.operands[index])
        if update is None or update.opcode != "add" or len(update.operands) != 2:
            return None
        for counter, other in (update.operands, update.operands[::-1]):
            c = _through_copies(counter, defs)
            if c is not None and c.opcode == "get-tuple-element" and _attr(c.attrs, "index") == str(index):
                return _resolve_constant(other, defs, self.consts)
        return None

    def total(self, cost: Callable[[Instruction, str], float], *, flat: bool,
              descend: Callable[[Instruction], bool] = lambda inst: True,
              loops: list[LoopInfo] | None = None) -> float:  # fmt: skip
        """Sum of ``cost(instruction, computation)`` over one run of the module: the entry computation, a
        ``while`` body times its trip count (once when ``flat``) and its condition once, the most expensive
        branch of a conditional, and every other computation an instruction calls (fusions, calls, async
        wrappers, reducers) once per call where ``descend(instruction)``. The loops met are appended to
        ``loops``."""

        @functools.cache
        def of(comp: str) -> float:
            total = 0.0
            for inst in self.comps.get(comp, []):
                total += cost(inst, comp)
                if inst.opcode.endswith("-done"):  # an async pair's work belongs to its "-start"
                    continue
                if inst.opcode == "while":
                    body, cond = _attr(inst.attrs, "body"), _attr(inst.attrs, "condition")
                    body, cond = (body or "").lstrip("%"), (cond or "").lstrip("%")
                    trips, known = (1, True) if flat else self.trip_count(inst)
                    if loops is not None and not flat:
                        loops.append(LoopInfo(body, trips, known))
                    total += trips * of(body) + of(cond)
                    continue
                if not descend(inst):
                    continue
                for key in _CALL_ATTRS:
                    callee = _attr(inst.attrs, key)
                    if callee:
                        total += of(callee.lstrip("%"))
                for key in _LIST_ATTRS:
                    callees = _attr(inst.attrs, key)
                    if callees:
                        names = [c.strip().lstrip("%") for c in callees.strip("{}").split(",") if c.strip()]
                        # A conditional runs one branch: count the most expensive.
                        parts = [of(c) for c in names]
                        total += max(parts) if key == "branch_computations" else sum(parts)
            return total

        return of("ENTRY")


# The Pallas splash-attention kernels (``flux_jax.model.attention`` on TPU) are custom calls whose FLOPs XLA cannot
# see; their instruction names say which kernel runs. Per (q, k) pair the forward does 2 matmuls (q k^T, p v), the
# dq kernel recomputes q k^T and adds do v^T and ds k (3), the dkv kernel recomputes q k^T and adds p^T do, do v^T
# and ds^T q (4); each matmul is 2 x q rows x k rows x head_dim. q, k, v (and do) are the kernel's largest operands
# ([..., heads, length, head_dim], Flux's self-attention: all the same size); q and k are the first two of them
# (the smaller ones are the block mask tables and the softmax statistics).
_SPLASH = re.compile(r"^splash_mha_(fwd|dq|dkv)")
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _splash_flops(inst: Instruction, shapes: dict[str, tuple[int, ...] | None]) -> float:
    kind = _SPLASH.match(inst.name)
    arrays = [s for s in (shapes.get(o) for o in inst.operands) if s is not None and len(s) >= 3]
    if kind is None or not arrays:
        return 0.0
    largest = max(math.prod(s) for s in arrays)
    big = [s for s in arrays if math.prod(s) == largest]
    if len(big) < 2:
        return 0.0
    q, k = big[0], big[1]
    return _SPLASH_MATMULS[kind[1]] * 2.0 * math.prod(q[:-1]) * k[-2] * q[-1]


def count_flops(text: str) -> FlopCount:
    """Loop-aware matmul FLOPs of the HLO module ``text`` (see the module docstring)."""
    module = Module(text)
    loops: list[LoopInfo] = []

    def dots(inst: Instruction, comp: str) -> float:
        if inst.opcode == "custom-call":
            return _splash_flops(inst, module.shapes)
        return _dot_flops(inst, module.shapes) if inst.opcode in ("dot", "convolution") else 0.0

    flops = module.total(dots, flat=False, loops=loops)
    flat = module.total(dots, flat=True)
    return FlopCount(flops=flops, flat_flops=flat, loops=tuple(loops))
