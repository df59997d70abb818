"""The planner's time estimate: collective and HBM bytes counted from the compiled HLO, and how the plan reports them.

Hand-made HLO modules pin down the rules exactly (every collective form, loop multiplicity, fusion reads); a real
program sharded over the 8 fake CPU devices checks the counts against hand-computed bytes and XLA's own
``bytes accessed``; a Plan built by hand checks the report block and the plan table.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flux_jax.hardware import GENERATIONS
from flux_jax.planning.fit import Memory, Plan, format_report
from flux_jax.planning.hlo_flops import parse_module
from flux_jax.planning.hlo_traffic import count_traffic
from flux_jax.planning.topology import parse_target

ROOT = Path(__file__).resolve().parents[1]

# A loop of 3 trips (counter < 3) whose body runs one collective of each form; n is each one's group size:
#   all-gather       sync, explicit groups of 4:         (4-1) x 128 B input               = 384
#   all-gather       async -start/-done, {} = all 8:     (8-1) x 64 B input                = 448
#   all-gather       libtpu async fusion, chain_id "7" in its start and done computations: counted once at the
#                    start, mesh groups {'y'} of 4:      (4-1) x 128 B input               = 384
#   all-reduce       async -start/-done, iota [4,2]:     2 x (2-1)/2 x 512 B               = 512
#   reduce-scatter   wrapped in async-start, mesh {'y'} of 4 (x=2, y=4):  (4-1)/4 x 512 B  = 384
#   collective-permute  async -start/-done:             its 128 B input                   = 128
# and, once outside the loop, an all-to-all over {{0..7}}: (8-1)/8 x 256 B = 224.
COLLECTIVES_HLO = """HloModule collectives, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%rs_wrapped (w.0: f32[16,8]) -> f32[4,8] {
  %w.0 = f32[16,8]{1,0} parameter(0)
  ROOT %rs = f32[4,8]{1,0} reduce-scatter(%w.0), channel_id=4, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, to_apply=%add
}

%ag_start_comp (s.0: f32[4,8]) -> (f32[4,8], f32[16,8]) {
  %s.0 = f32[4,8]{1,0} parameter(0)
  %ag.chain.0 = f32[16,8]{1,0} all-gather(%s.0), channel_id=7, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, frontend_attributes={chain_id="7"}
  ROOT %cc.start = (f32[4,8]{1,0}, f32[16,8]{1,0}) custom-call(%ag.chain.0), custom_call_target="AsyncCollectiveStart"
}

%ag_done_comp (d.0: f32[4,8], d.1: f32[16,8]) -> f32[16,8] {
  %d.0 = f32[4,8]{1,0} parameter(0)
  %d.1 = f32[16,8]{1,0} parameter(1)
  %ag.chain.1 = f32[16,8]{1,0} all-gather(%d.0), channel_id=7, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, frontend_attributes={chain_id="7"}
  ROOT %cc.done = f32[16,8]{1,0} custom-call(%d.0, %d.1, %ag.chain.1), custom_call_target="AsyncCollectiveDone"
}

%cond (p.c: (s32[], f32[4,8], f32[2,8], f32[16,8])) -> pred[] {
  %p.c = (s32[], f32[4,8], f32[2,8], f32[16,8]) parameter(0)
  %i.c = s32[] get-tuple-element(%p.c), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.c, %three), direction=LT
}

%body (p.b: (s32[], f32[4,8], f32[2,8], f32[16,8])) -> (s32[], f32[4,8], f32[2,8], f32[16,8]) {
  %p.b = (s32[], f32[4,8], f32[2,8], f32[16,8]) parameter(0)
  %i = s32[] get-tuple-element(%p.b), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %a = f32[4,8]{1,0} get-tuple-element(%p.b), index=1
  %b = f32[2,8]{1,0} get-tuple-element(%p.b), index=2
  %c = f32[16,8]{1,0} get-tuple-element(%p.b), index=3
  %ag.sync = f32[16,8]{1,0} all-gather(%a), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %ag.start = (f32[2,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%b), channel_id=2, replica_groups={}, dimensions={0}, use_global_device_ids=true
  %ag.done = f32[16,8]{1,0} all-gather-done(%ag.start)
  %ar.start = f32[16,8]{1,0} all-reduce-start(%c), channel_id=3, replica_groups=[4,2]<=[8], use_global_device_ids=true, to_apply=%add
  %ar.done = f32[16,8]{1,0} all-reduce-done(%ar.start)
  %rs.start = ((f32[16,8]{1,0}), f32[4,8]{1,0}) async-start(%ar.done), calls=%rs_wrapped
  %rs.done = f32[4,8]{1,0} async-done(%rs.start), calls=%rs_wrapped
  %cp.start = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%rs.done), channel_id=5, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cp.done = f32[4,8]{1,0} collective-permute-done(%cp.start)
  %agc.start = (f32[4,8]{1,0}, f32[16,8]{1,0}) fusion(%cp.done), kind=kCustom, calls=%ag_start_comp
  %agc.s0 = f32[4,8]{1,0} get-tuple-element(%agc.start), index=0
  %agc.s1 = f32[16,8]{1,0} get-tuple-element(%agc.start), index=1
  %agc.done = f32[16,8]{1,0} fusion(%agc.s0, %agc.s1), kind=kCustom, calls=%ag_done_comp
  ROOT %t.b = (s32[], f32[4,8], f32[2,8], f32[16,8]) tuple(%next, %cp.done, %b, %agc.done)
}

ENTRY %main (a.0: f32[4,8], b.0: f32[2,8], c.0: f32[16,8], d: f32[8,8]) -> f32[8,8] {
  %a.0 = f32[4,8]{1,0} parameter(0)
  %b.0 = f32[2,8]{1,0} parameter(1)
  %c.0 = f32[16,8]{1,0} parameter(2)
  %d = f32[8,8]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8], f32[2,8], f32[16,8]) tuple(%zero, %a.0, %b.0, %c.0)
  %loop = (s32[], f32[4,8], f32[2,8], f32[16,8]) while(%init), condition=%cond, body=%body
  ROOT %a2a = f32[8,8]{1,0} all-to-all(%d), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}
"""  # noqa: E501 (HLO text as XLA prints it)


def test_collective_bytes_every_form_and_loop_iteration():
    traffic = count_traffic(COLLECTIVES_HLO)
    assert [(loop.trips, loop.known) for loop in traffic.loops] == [(3, True)]
    assert traffic.collective_bytes == {
        "all-gather": 3 * (384 + 448 + 384),
        "reduce-scatter": 3 * 384,
        "all-reduce": 3 * 512,
        "all-to-all": 224,
        "collective-permute": 3 * 128,
    }
    assert traffic.ici_bytes == 3 * (384 + 448 + 384 + 384 + 512 + 128) + 224
    assert traffic.unknown_groups == 0


# HBM traffic of a 5-trip loop over a stacked [5, 8, 8] weight (bytes: f32 = 4 per element, s32 4, pred 1):
#   slice fusion     reads its layer through a dynamic-slice (256) and the index (4), writes 256       = 516
#   dot fusion       reads [4,8] (128) and [8,8] (256), writes [4,8] (128)                              = 512
#   update fusion    writes one [4,8] row in place into [5,4,8]: the row (128) in, the row (128) out, the
#                    index (4); the [5,4,8] operand it updates moves nothing                           = 260
#   carry fusion     negates [4,8] (128 in, 128 out) and passes the [5,8,8] stack through untouched, as
#                    libtpu's async collective fusions pass their buffers: the stack moves nothing        = 256
#   counter add      two s32 operands and an s32 result                                                = 12
# per trip 1556; the condition's compare (4 + 4 in, 1 out) once. Tuples, get-tuple-element, parameters,
# constants, bitcasts and the while itself move nothing.
HBM_HLO = """HloModule hbm

%slice_layer (p.0: f32[5,8,8], p.1: s32[]) -> f32[8,8] {
  %p.0 = f32[5,8,8]{2,1,0} parameter(0)
  %p.1 = s32[] parameter(1)
  %z.0 = s32[] constant(0)
  %ds = f32[1,8,8]{2,1,0} dynamic-slice(%p.0, %p.1, %z.0, %z.0), dynamic_slice_sizes={1,8,8}
  ROOT %bc = f32[8,8]{1,0} bitcast(%ds)
}

%matmul (q.0: f32[4,8], q.1: f32[8,8]) -> f32[4,8] {
  %q.0 = f32[4,8]{1,0} parameter(0)
  %q.1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot = f32[4,8]{1,0} dot(%q.0, %q.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%update_row (u.0: f32[5,4,8], u.1: f32[4,8], u.2: s32[]) -> f32[5,4,8] {
  %u.0 = f32[5,4,8]{2,1,0} parameter(0)
  %u.1 = f32[4,8]{1,0} parameter(1)
  %u.2 = s32[] parameter(2)
  %z.1 = s32[] constant(0)
  %row = f32[1,4,8]{2,1,0} bitcast(%u.1)
  ROOT %dus = f32[5,4,8]{2,1,0} dynamic-update-slice(%u.0, %row, %u.2, %z.1, %z.1)
}

%carry (r.0: f32[4,8], r.1: f32[5,8,8]) -> (f32[4,8], f32[5,8,8]) {
  %r.0 = f32[4,8]{1,0} parameter(0)
  %r.1 = f32[5,8,8]{2,1,0} parameter(1)
  %neg = f32[4,8]{1,0} negate(%r.0)
  ROOT %rt = (f32[4,8]{1,0}, f32[5,8,8]{2,1,0}) tuple(%neg, %r.1)
}

%cond (c.p: (s32[], f32[4,8], f32[5,8,8], f32[5,4,8])) -> pred[] {
  %c.p = (s32[], f32[4,8], f32[5,8,8], f32[5,4,8]) parameter(0)
  %c.i = s32[] get-tuple-element(%c.p), index=0
  %five = s32[] constant(5)
  ROOT %lt = pred[] compare(%c.i, %five), direction=LT
}

%body (b.p: (s32[], f32[4,8], f32[5,8,8], f32[5,4,8])) -> (s32[], f32[4,8], f32[5,8,8], f32[5,4,8]) {
  %b.p = (s32[], f32[4,8], f32[5,8,8], f32[5,4,8]) parameter(0)
  %i = s32[] get-tuple-element(%b.p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%b.p), index=1
  %w = f32[5,8,8]{2,1,0} get-tuple-element(%b.p), index=2
  %ys = f32[5,4,8]{2,1,0} get-tuple-element(%b.p), index=3
  %layer = f32[8,8]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_layer
  %y = f32[4,8]{1,0} fusion(%x, %layer), kind=kOutput, calls=%matmul
  %ys.next = f32[5,4,8]{2,1,0} fusion(%ys, %y, %i), kind=kLoop, calls=%update_row
  %pair = (f32[4,8]{1,0}, f32[5,8,8]{2,1,0}) fusion(%y, %w), kind=kLoop, calls=%carry
  %y.next = f32[4,8]{1,0} get-tuple-element(%pair), index=0
  %w.next = f32[5,8,8]{2,1,0} get-tuple-element(%pair), index=1
  %one = s32[] constant(1)
  %i.next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,8], f32[5,8,8], f32[5,4,8]) tuple(%i.next, %y.next, %w.next, %ys.next)
}

ENTRY %main (x.0: f32[4,8], w.0: f32[5,8,8], ys.0: f32[5,4,8]) -> (s32[], f32[4,8], f32[5,8,8], f32[5,4,8]) {
  %x.0 = f32[4,8]{1,0} parameter(0)
  %w.0 = f32[5,8,8]{2,1,0} parameter(1)
  %ys.0 = f32[5,4,8]{2,1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8], f32[5,8,8], f32[5,4,8]) tuple(%zero, %x.0, %w.0, %ys.0)
  ROOT %loop = (s32[], f32[4,8], f32[5,8,8], f32[5,4,8]) while(%init), condition=%cond, body=%body
}
"""


def test_hbm_traffic_counts_fusion_reads_and_in_place_updates():
    traffic = count_traffic(HBM_HLO)
    per_trip = 516 + 512 + 260 + 256 + 12
    assert traffic.hbm_bytes == 5 * per_trip + 9
    assert traffic.flat_hbm_bytes == per_trip + 9
    assert traffic.ici_bytes == 0


# --------------------------------------------------------------------------------------------------
# A real program on the 8 fake CPU devices

LAYERS, M, K = 3, 16, 64


def _sharded_scan():
    """A scan over LAYERS fsdp-sharded [K, K] weights: each step all-gathers its layer, reduce-scatters the
    matmul output and all-reduces that."""
    mesh = jax.make_mesh((8,), ("fsdp",))

    def local(x, w):
        def body(c, wi):
            full = jax.lax.all_gather(wi, "fsdp", axis=0, tiled=True)  # [K/8, K] -> [K, K]
            y = c @ full
            r = jax.lax.psum_scatter(y, "fsdp", scatter_dimension=1, tiled=True)  # [M, K] -> [M, K/8]
            return jnp.tanh(y) + jnp.tile(jax.lax.psum(r, "fsdp"), (1, 8)), None

        return jax.lax.scan(body, x, w)[0]

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "fsdp", None)), out_specs=P(), check_vma=False)
    x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=NamedSharding(mesh, P()))
    w = jax.ShapeDtypeStruct((LAYERS, K, K), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
    return jax.jit(fn).lower(x, w).compile()


def test_collective_bytes_of_a_sharded_scan_on_cpu():
    compiled = _sharded_scan()
    traffic = count_traffic(compiled.as_text())
    shard = K // 8 * K * 4  # one device's rows of one layer
    out = M * K * 4  # the matmul output
    assert traffic.collective_bytes == {
        "all-gather": LAYERS * 7 * shard,  # (n-1)/n of the gathered [K, K] layer
        "reduce-scatter": LAYERS * 7 / 8 * out,
        "all-reduce": LAYERS * 2 * 7 / 8 * (out // 8),
        "all-to-all": 0,
        "collective-permute": 0,
    }
    # XLA's "bytes accessed" counts each loop body once, like `flat_hbm_bytes`; the two differ only by the index
    # tables XLA counts for tuple instructions (8 bytes per element on CPU), which move no array data.
    comps = parse_module(compiled.as_text())
    top_level = ["ENTRY", *(loop.body for loop in traffic.loops)]
    tuple_tables = sum(8 * len(i.operands) for name in top_level for i in comps[name] if i.opcode == "tuple")
    assert tuple_tables > 0
    assert traffic.flat_hbm_bytes + tuple_tables == compiled.cost_analysis()["bytes accessed"]
    assert traffic.hbm_bytes > 2 * traffic.flat_hbm_bytes  # the 3-trip body dominates


# --------------------------------------------------------------------------------------------------
# The report and the table


def _plan(**kw) -> Plan:
    target = parse_target("v5e-8")
    memory = Memory(argument=3 * 2**30, output=2**20, temp=5 * 2**30, alias=2**20, total=8 * 2**30)
    fields = dict(target=target, model="dev", mesh={"data": 1, "fsdp": 8, "tensor": 1}, batch_size=8, grad_accum=1,
                  resolution=1024, text_len=512, base_dtype="bf16", remat="full", attention="xla", memory=memory,
                  capacity=target.hbm_bytes, flops=1.97e14, xla_flops=1e12, xla_optimal_seconds=None,
                  seconds_at_peak=1.0, peak_flops=197e12, compile_seconds=1.0, hbm_traffic=1.638e12,
                  collective_bytes={"all-gather": 6e10, "reduce-scatter": 4e10, "all-reduce": 0.0, "all-to-all": 0.0,
                                    "collective-permute": 0.0})  # fmt: skip
    return Plan(**{**fields, **kw})


def test_report_prints_the_time_estimate():
    plan = _plan()
    # v5e: 819 GB/s HBM, 200 GB/s ICI one way. HBM 1.638 TB -> 2 s; ICI 100 GB -> 0.5 s; compute 1 s.
    assert plan.hbm_seconds == pytest.approx(2.0) and plan.ici_seconds == pytest.approx(0.5)
    assert plan.estimate_seconds == pytest.approx(2.5)
    report = format_report(plan)
    block = report.split("time estimate per chip and step", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [
        " (an estimate, not a measurement; collectives assumed exposed)",
        "  compute      1 s (matmul FLOPs at peak)",
        "  HBM          2 s (1638 GB read and written at 819 GB/s)",
        "  ICI          0.5 s (100 GB sent at 200 GB/s)",
        "  estimate     2.5 s = max(compute, HBM) + ICI",
        "  collectives  all-gather 60 GB, reduce-scatter 40 GB",
    ]
    assert "  s/step at peak       1 s" in report  # the existing lines stay
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["estimate_seconds"] == pytest.approx(2.5) and data["ici_bytes"] == 1e11
    assert data["collective_bytes"]["all-gather"] == 6e10
    # Compute-bound: the estimate is the FLOPs floor plus the exposed collectives.
    assert _plan(hbm_traffic=0.819e12).estimate_seconds == pytest.approx(1.5)
    # A plan the compiler refused has no estimate, and no block.
    refused = _plan(flops=None, seconds_at_peak=None, hbm_traffic=None, collective_bytes=None)
    assert refused.estimate_seconds is None and "time estimate" not in format_report(refused)


def test_every_generation_has_its_bandwidths():
    bandwidths = {name: (g.hbm_bandwidth, g.ici_bandwidth) for name, g in GENERATIONS.items()}
    assert bandwidths == {"v4": (1200e9, 300e9), "v5e": (819e9, 200e9), "v5p": (2765e9, 600e9),
                          "v6e": (1638e9, 400e9)}  # fmt: skip


def _plan_table():
    spec = importlib.util.spec_from_file_location("bench_plan_table", ROOT / "bench" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_table_shows_the_estimate_and_old_rows_without_it():
    new = json.loads(json.dumps(_plan().to_dict()))
    old = {k: v for k, v in new.items() if k not in ("estimate_seconds", "ici_bytes", "hbm_traffic",
                                                       "collective_bytes", "hbm_seconds", "ici_seconds")}  # fmt: skip
    old = {**old, "target": {**old["target"], "name": "v5e-4"}}
    table = _plan_table().markdown({
        "v5e-8:1024:bf16": {"row": "v5e-8:1024:bf16", "rc": 0, "wall_s": 1.0, "plan": new},
        "v5e-4:1024:bf16": {"row": "v5e-4:1024:bf16", "rc": 0, "wall_s": 1.0, "plan": old},
    })  # fmt: skip
    head, _, *rows = table.splitlines()
    assert "| s/step estimate | ICI GB / chip / step |" in head
    cells = {row.split(" | ")[0]: row.split(" | ") for row in rows}
    assert cells["| v5e-8"][-3:] == ["2.50", "100.00", "1 |"]
    assert cells["| v5e-4"][-3:] == ["-", "-", "1 |"]
    assert all(row.count("|") == head.count("|") for row in rows)
