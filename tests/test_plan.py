"""`flux-jax plan`: ahead-of-time fit planning for TPU slices.

The loop-aware FLOP counter is checked on CPU-compiled HLO against hand-counted matmuls. The planner itself
compiles the tiny model's real train step for a v5e-4 (libtpu, compile-only devices) through the CLI, which
re-runs itself in a subprocess with libtpu's environment; those tests are skipped where libtpu is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from flux_jax import cli
from flux_jax.model.config import PRESETS
from flux_jax.planning.fit import Memory, Plan, format_report
from flux_jax.planning.hlo_flops import count_flops
from flux_jax.planning.topology import TopologyError, aot_environment, environment_ready, parse_target
from flux_jax.planning.validation import ValidationMemory, ValidationSpec, validation_spec
from flux_jax.run_config import from_dict, parse_override
from flux_jax.train.memory import parse_oom
from flux_jax.train.metrics import useful_flops_per_sample
from flux_jax.train.state import StateBytes

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (tpu extra) not installed")

M, K, N, LAYERS = 64, 32, 48, 5


def _stack(x, w):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]


def _unrolled(x, w):
    for i in range(w.shape[0]):
        x = jnp.tanh(x @ w[i])
    return x


def _hlo(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(fn).lower(*args).compile()


# --------------------------------------------------------------------------------------------------
# Loop-aware FLOP counting


def test_count_flops_counts_every_scan_iteration():
    x, w = (M, K), (LAYERS, K, K)
    scanned = _hlo(_stack, x, w)
    count = count_flops(scanned.as_text())
    per_layer = 2 * M * K * K
    assert count.flops == LAYERS * per_layer
    # XLA's own analysis counts the loop body once; `flat_flops` reproduces that, and the unrolled program agrees.
    assert count.flat_flops == per_layer
    xla = scanned.cost_analysis()["flops"]  # matmuls of one iteration plus a little elementwise work (tanh)
    assert per_layer <= xla < 2 * per_layer
    assert count_flops(_hlo(_unrolled, x, w).as_text()).flops == LAYERS * per_layer
    assert [(loop.trips, loop.known) for loop in count.loops] == [(LAYERS, True)]


def test_count_flops_backward_and_nested_loops():
    # Gradient of a scanned stack: forward loop + backward loop (two matmuls per layer).
    grad = _hlo(jax.grad(lambda x, w: _stack(x, w).sum(), argnums=1), (M, K), (LAYERS, K, K))
    assert count_flops(grad.as_text()).flops == 3 * LAYERS * 2 * M * K * K

    # A scan inside a scan: the inner body runs outer x inner times.
    def nested(x, w):
        return jax.lax.scan(lambda c, _: (_stack(c, w), None), x, None, length=3)[0]

    assert count_flops(_hlo(nested, (M, K), (LAYERS, K, K)).as_text()).flops == 3 * LAYERS * 2 * M * K * K


def test_count_flops_batched_dot():
    compiled = _hlo(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b), (4, M, K), (4, K, N))
    assert count_flops(compiled.as_text()).flops == 4 * 2 * M * K * N


# Two patterns of TPU-compiled HLO (as libtpu emits them for the Flux step), in a hand-made module: a loop XLA
# unrolled by 2 (counter += 2 until < 6, so 3 trips), and attention's batched matmul written as a convolution
# whose batch (heads) dim is a spatial dim with lhs_dilate = window size (one valid window position per output).
TPU_PATTERNS_HLO = """HloModule patterns

%cond (param: (s32[], f32[4,8], f32[8,8])) -> pred[] {
  %param = (s32[], f32[4,8], f32[8,8]) parameter(0)
  %constant.6 = s32[]{:T(128)} constant(6)
  %gte.0 = s32[]{:T(128)} get-tuple-element(%param), index=0
  ROOT %lt = pred[]{:T(512)} compare(%gte.0, %constant.6), direction=LT
}

%body (param.1: (s32[], f32[4,8], f32[8,8])) -> (s32[], f32[4,8], f32[8,8]) {
  %param.1 = (s32[], f32[4,8], f32[8,8]) parameter(0)
  %gte.1 = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  %copy.1 = s32[]{:T(128)} copy(%gte.1)
  %constant.2 = s32[]{:T(128)} constant(2)
  %add.1 = s32[]{:T(128)} add(%copy.1, %constant.2)
  %gte.2 = f32[4,8]{1,0} get-tuple-element(%param.1), index=1
  %gte.3 = f32[8,8]{1,0} get-tuple-element(%param.1), index=2
  %dot.1 = f32[4,8]{1,0} dot(%gte.2, %gte.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple.1 = (s32[], f32[4,8], f32[8,8]) tuple(%add.1, %dot.1, %gte.3)
}

ENTRY %main (a: f32[4,8], b: f32[8,8], q: f32[16,3,8], k: f32[16,3,8]) -> f32[3,16,16] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %q = f32[16,3,8]{2,1,0} parameter(2)
  %k = f32[16,3,8]{2,1,0} parameter(3)
  %constant.0 = s32[]{:T(128)} constant(0)
  %copy.0 = s32[]{:T(128)} copy(%constant.0)
  %tuple.0 = (s32[], f32[4,8], f32[8,8]) tuple(%copy.0, %a, %b)
  %while.0 = (s32[], f32[4,8], f32[8,8]) while(%tuple.0), condition=%cond, body=%body
  ROOT %logits = f32[3,16,16]{1,2,0} convolution(%q, %k), window={size=3 stride=2 lhs_dilate=3}, dim_labels=b0f_o0i->0bf
}
"""


def test_count_flops_tpu_patterns():
    count = count_flops(TPU_PATTERNS_HLO)
    assert [(loop.trips, loop.known) for loop in count.loops] == [(3, True)]
    loop = 3 * 2 * 4 * 8 * 8
    attention = 3 * 2 * 16 * 16 * 8  # per head: [16, 8] x [8, 16]
    assert count.flops == loop + attention
    assert count.flat_flops == loop // 3 + attention


def test_parse_oom_reads_the_tpu_compiler_message():
    # Verbatim from libtpu 0.0.42 compiling a too-large program for v5e:2x2, and the older wording.
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (36.00G) "
           "exceeds available HBM (15.75G).")  # fmt: skip
    assert parse_oom(msg) == (36 * 2**30, int(15.75 * 2**30))
    old = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
    assert parse_oom(old) == (int(20.5 * 2**30), int(15.75 * 2**30))
    assert parse_oom("INTERNAL: something else") is None


# --------------------------------------------------------------------------------------------------
# Targets


def test_parse_target_slice_and_topology_names():
    t = parse_target("v5e-8")
    assert (t.name, t.topology, t.chips, t.hbm_bytes) == ("v5e-8", "v5e:2x4", 8, 16 * 2**30)
    assert parse_target("v5litepod-4").topology == "v5e:2x2"
    # v4 slice names count TensorCores: v4-8 is 4 megacore chips, planned as 4 devices of 32 GiB.
    v4 = parse_target("v4-8")
    assert (v4.chips, v4.topology, v4.topology_options) == (4, "v4:2x2x1", {"chip_config_name": "megacore"})
    assert parse_target("v4:2x2x1").name == "v4-8"
    assert parse_target("v5e:16x16").chips == 256
    for bad in ("v9-8", "v5e:2x2x2", "v5e-3", "tpu"):
        with pytest.raises(TopologyError):
            parse_target(bad)


def test_environment_ready_needs_every_variable():
    target = parse_target("v5e-4")
    env = aot_environment(target)
    assert env["JAX_PLATFORMS"] == "cpu" and env["TPU_ACCELERATOR_TYPE"] == "v5litepod-4"
    assert environment_ready(target, env)
    assert not environment_ready(target, {k: v for k, v in env.items() if k != "TPU_SKIP_MDS_QUERY"})


def test_bad_topology_is_a_one_line_error(capsys):
    assert cli.main(["plan", "--config", "configs/tiny.yaml", "--topology", "v9-8"]) == 2
    err = capsys.readouterr().err
    assert "unknown TPU generation" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# The planner end to end (libtpu)


def _plan(flags, capfd, tmp_path, overrides=()):
    out = tmp_path / "plan.json"
    # remat none: one compile (tiny.yaml's auto compiles every policy for the plan; test_remat_auto.py covers it).
    # The overrides come last: argparse takes one run of positional arguments, after the flags.
    rc = cli.main(["plan", "--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--text-len", "8",
                   "--json", str(out), *flags, "model.remat=none", *overrides])  # fmt: skip
    captured = capfd.readouterr()
    return rc, captured.out, json.loads(out.read_text()) if out.exists() else None


@needs_libtpu
@pytest.mark.slow
def test_plan_tiny_on_v5e_4_compiles_and_reports(capfd, tmp_path):
    # XLA attention: the FLOP bounds below are the blocks' own matmuls. Splash (what auto picks on TPU) pads the
    # tiny model's 24-token sequence to 128, and the plan counts the padded kernels' work, ~28x the attention's.
    rc, out, plan = _plan([], capfd, tmp_path, overrides=["model.attention=xla"])
    assert rc == 0, out
    assert "fits:" in out and "does not fit" not in out
    assert plan["target"] == {"name": "v5e-4", "topology": "v5e:2x2", "chips": 4, "hbm_gib": 16}
    assert plan["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # tiny.yaml: data -1 over the 4 chips
    mem = plan["memory"]
    assert 0 < mem["argument"] and 0 < mem["temp"] and mem["total"] < plan["capacity"] == 16 * 2**30
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    # Per chip: 2 samples through every one of the 2 + 3 scanned blocks, forward and backward. XLA's own count
    # sees each loop body once; ours covers at least the blocks' matmuls the trainer's MFU formula counts.
    useful = 2 * useful_flops_per_sample(PRESETS["tiny"], img_tokens=(64 // 16) ** 2, txt_tokens=8)
    assert useful <= plan["flops"] <= 1.5 * useful  # the rest: embedders, modulation, LoRA (remat is off)
    assert 0 < plan["xla_flops"] < plan["flops"]
    assert plan["seconds_at_peak"] == pytest.approx(plan["flops"] / 197e12)
    # The time estimate: data parallel over the 4 chips all-reduces the LoRA gradients and gathers no weights.
    ici = plan["collective_bytes"]
    assert ici["all-reduce"] > 0 and ici["all-gather"] == ici["reduce-scatter"] == 0
    assert plan["ici_seconds"] == pytest.approx(plan["ici_bytes"] / 200e9)
    assert plan["hbm_seconds"] == pytest.approx(plan["hbm_traffic"] / 819e9)
    compute, hbm = plan["seconds_at_peak"], plan["hbm_seconds"]
    assert plan["estimate_seconds"] == pytest.approx(max(compute, hbm) + plan["ici_seconds"])
    assert "time estimate per chip and step (an estimate, not a measurement; collectives assumed exposed)" in out
    assert plan["train_state"]["per_chip"] == plan["train_state"]["replicated"] > 0  # fsdp 1: nothing to split


@needs_libtpu
@pytest.mark.slow
def test_plan_that_does_not_fit_exits_nonzero(capfd, tmp_path):
    # 4096 px is 65536 image tokens: with XLA attention the tiny model's attention logits alone are ~137 GB per
    # chip, so the TPU compiler itself refuses the program (the path a too-large full-size run takes).
    rc, out, plan = _plan(["--resolution", "4096"], capfd, tmp_path, overrides=["model.attention=xla"])
    assert rc == 1, out
    assert "does not fit" in out and "ran out of HBM" in out
    assert plan["fits"] is False and plan["memory"]["from_compiler_error"] is True
    assert plan["memory"]["total"] > plan["capacity"]


def test_hbm_override_decides_the_verdict():
    # The verdict and the report from a Plan alone (no compile): --hbm-gib replaces the chip's capacity.
    target = parse_target("v5e-4")
    memory = Memory(argument=3 * 2**30, output=2**20, temp=5 * 2**30, alias=2**20, total=8 * 2**30)
    plan = Plan(target=target, model="dev", mesh={"data": 1, "fsdp": 4, "tensor": 1}, batch_size=4, grad_accum=1,
                resolution=1024, text_len=512, base_dtype="fp8", remat="full", attention="xla", memory=memory,
                capacity=target.hbm_bytes, flops=1e14, xla_flops=1e12, xla_optimal_seconds=None,
                seconds_at_peak=1e14 / 197e12, peak_flops=197e12, compile_seconds=1.0)  # fmt: skip
    assert plan.fits and format_report(plan).endswith("fits: 8.00 GiB of 16.00 GiB per chip on v5e-4")
    small = dataclasses.replace(plan, capacity=int(7.5 * 2**30))
    assert not small.fits and "does not fit: 8.00 GiB of 7.50 GiB per chip" in format_report(small)
    assert json.loads(json.dumps(small.to_dict()))["fits"] is False
    # The LoRA state line and its JSON (the numbers: LoRA rank 16 all_blocks, AdamW and EMA on Flux.1-dev, fsdp 8).
    split = dataclasses.replace(plan, train_state=StateBytes(per_chip=153_157_652, replicated=1_225_261_076))
    assert ("  LoRA state   146.1 MiB (LoRA + optimizer state + EMA, in the arguments; 1168.5 MiB if replicated)"
            in format_report(split).splitlines())  # fmt: skip
    assert json.loads(json.dumps(split.to_dict()))["train_state"] == {
        "per_chip": 153_157_652,
        "replicated": 1_225_261_076,
    }
    assert "LoRA state" not in format_report(plan)  # a Plan built without the count


# --------------------------------------------------------------------------------------------------
# Validation during training: what the sampler adds to the plan


def _run_config(*overrides: str):
    """The default run config with ``validation.*`` overrides."""
    tree = from_dict({}).to_dict()
    for item in overrides:
        tree = _set(tree, *parse_override(item))
    return from_dict(tree)


def _set(tree: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node[name]
    node[leaf] = value
    return tree


def test_validation_spec_reads_the_section(tmp_path):
    cfg = _run_config("validation.every=100", "validation.prompts=[a cat, a dog]", "validation.seeds=[1, 2, 3]",
                      "validation.cfg=3.5")  # fmt: skip
    spec, notes = validation_spec(cfg)
    assert notes == ()
    assert (spec.every, spec.prompts, spec.seeds, spec.cfg, spec.batch) == (100, 2, 3, 3.5, 4)
    assert (spec.width, spec.height, spec.steps, spec.base, spec.base_dtype) == (512, 512, 20, "", "fp8")
    assert spec.images == 6 and spec.model_rows == 8  # a batch of 4 images per call; true CFG: both branches
    one = _run_config("validation.every=1", "validation.prompts=[a]")
    assert validation_spec(one)[0].model_rows == 1  # fewer images than a batch, no CFG
    sized = _run_config("validation.every=5", "validation.prompts=[a]", "validation.width=768",
                        "validation.height=1024", "validation.base=/x/dev", "validation.base_dtype=bf16")  # fmt: skip
    spec = validation_spec(sized)[0]
    assert (spec.seeds, spec.width, spec.height, spec.base, spec.base_dtype) == (1, 768, 1024, "/x/dev", "bf16")
    assert spec.image_tokens == 48 * 64
    # A prompt file counts its non-blank lines; one not on this machine is planned as one prompt, with a note.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n  \na bird\n")
    assert validation_spec(_run_config("validation.every=1", f"validation.prompts_file={prompts}"))[0].prompts == 3
    spec, notes = validation_spec(_run_config("validation.every=1", "validation.prompts_file=gs://bucket/prompts.txt"))
    assert spec.prompts == 1 and "not a file on this machine" in notes[0]


def test_validation_off_plans_as_before():
    assert validation_spec(from_dict({})) == (None, ())
    assert validation_spec(_run_config("validation.every=0", "validation.prompts=[a]")) == (None, ())


GIB = 2**30


def _validation_memory(**kw) -> ValidationMemory:
    spec = ValidationSpec(every=50, prompts=2, seeds=2, width=1024, height=1024, cfg=3.5, base="dev", base_dtype="fp8")
    fields = dict(spec=spec, model="dev", rows=8, text_len=512, base=3 * GIB, vae=GIB // 8, prompts=GIB // 8,
                  sampling=2 * GIB, decoding=GIB, flops=2e15)  # fmt: skip
    return ValidationMemory(**{**fields, **kw})


def test_plan_total_is_resident_plus_the_larger_peak():
    # The sampler's peak happens between steps: the run needs the step's arguments + validation's resident
    # memory + max(step peak, sampler peak), not the sum of the two programs.
    target = parse_target("v5e-4")
    memory = Memory(argument=6 * GIB, output=GIB, temp=4 * GIB, alias=GIB, total=10 * GIB)
    plan = Plan(target=target, model="dev", mesh={"data": 1, "fsdp": 4, "tensor": 1}, batch_size=4, grad_accum=1,
                resolution=1024, text_len=512, base_dtype="fp8", remat="full", attention="xla", memory=memory,
                capacity=target.hbm_bytes, flops=1e14, xla_flops=1e12, xla_optimal_seconds=None,
                seconds_at_peak=1e14 / 197e12, peak_flops=197e12, compile_seconds=1.0)  # fmt: skip
    assert plan.total == 10 * GIB
    small = dataclasses.replace(plan, validation=_validation_memory())
    assert small.validation.resident == 3 * GIB + GIB // 4 and small.validation.peak == 2 * GIB
    assert small.total == 6 * GIB + (3 * GIB + GIB // 4) + 4 * GIB  # the step's own 4 GiB is the larger peak
    big = dataclasses.replace(plan, validation=_validation_memory(sampling=5 * GIB, decoding=7 * GIB))
    assert big.total == 6 * GIB + (3 * GIB + GIB // 4) + 7 * GIB  # the decode is
    assert big.fits is False and big.to_dict()["total"] == big.total
    report = format_report(small)
    assert "validation every 50 steps: 2 prompt(s) x 2 seed(s) at 1024x1024, 28 steps, true CFG 3.5" in report
    assert "  base         +3.00 GiB (dev as fp8, sharded like the training base)" in report
    assert "  VAE decoder  +0.12 GiB (replicated)" in report
    assert "  sampling     2.00 GiB" in report and "  decoding     1.00 GiB" in report
    assert "  with validation  13.25 GiB" in report and "s/validation at peak  10.2 s" in report
    assert report.endswith("fits: 13.25 GiB of 16.00 GiB per chip on v5e-4")
    same_base = dataclasses.replace(small, validation=_validation_memory(
        spec=dataclasses.replace(small.validation.spec, base=""), model="the training base", base=0))  # fmt: skip
    assert "+0.00 GiB (the training base (no second copy))" in format_report(same_base)
    refused = dataclasses.replace(plan, validation=_validation_memory(sampling=40 * GIB, from_compiler_error=True))
    assert not refused.fits and "the compiler's figure" in format_report(refused)
    data = json.loads(json.dumps(small.to_dict()))
    assert data["validation"]["spec"]["base_dtype"] == "fp8" and data["total"] == small.total


PLAN_WITH_VALIDATION = """
import json, sys
from flux_jax.planning.fit import plan
from flux_jax.planning.topology import parse_target
from flux_jax.planning.validation import ValidationSpec
from flux_jax.run_config import load_config

cfg = load_config("configs/tiny.yaml", ["mesh.data=1", "mesh.fsdp=4", "model.remat=none"])
spec = ValidationSpec(**json.loads(sys.argv[1]))
print(json.dumps(plan(cfg, parse_target("v5e:2x2"), text_len=8, validation=spec).to_dict()))
"""


@needs_libtpu
@pytest.mark.slow
def test_plan_with_validation_compiles_the_sampler_for_the_target():
    from flux_jax.dtypes import DTYPES, storage_dtype
    from flux_jax.encoders.vae import AutoEncoder, VAEConfig
    from flux_jax.train.build import BASE_PARAMS, random_flux

    # Four images (2 prompts x 2 seeds) with true CFG at 128 px on a second tiny base stored fp8, FSDP over 4 chips.
    spec = dict(every=10, prompts=2, seeds=2, width=128, height=128, steps=4, cfg=2.0, base="dev-elsewhere")
    env = {**os.environ, **aot_environment(parse_target("v5e:2x2"))}
    run = subprocess.run([sys.executable, "-c", PLAN_WITH_VALIDATION, json.dumps(spec)], env=env, text=True,
                         capture_output=True, check=True)  # fmt: skip
    plan = json.loads(run.stdout.strip().splitlines()[-1])
    v, mem = plan["validation"], plan["memory"]
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert v["rows"] == 8 and v["spec"]["base_dtype"] == "fp8"
    assert any("'dev-elsewhere' is not on this machine" in n for n in plan["notes"])

    # The second base: the tiny base's parameters in fp8 storage (kernels fp8, the rest bf16), a quarter or more
    # of them per chip (FSDP over 4; dims that 4 does not divide stay whole).
    def tiny_fp8():
        kw = dict(base_dtype="fp8", compute_dtype="fp32", attention="xla", remat="none")
        return random_flux(PRESETS["tiny"], seed=0, **kw)

    base = nnx.state(nnx.eval_shape(tiny_fp8), BASE_PARAMS)
    full = sum(x.size * storage_dtype(p, DTYPES["fp8"]).itemsize for p, x in nnx.to_flat_state(base))
    assert full / 4 <= v["base"] < full
    # The VAE decoder (the demo encoders' tiny VAE: tiny.yaml configures none), replicated, in the compute dtype.
    vae = nnx.eval_shape(lambda: AutoEncoder(VAEConfig.tiny(), rngs=nnx.Rngs(0)))
    assert v["vae"] == sum(x.size * 4 for x in jax.tree.leaves(nnx.state(vae.decoder)))
    # The 2 prompts' T5 states [8, 48] and CLIP vectors [32], and the negative prompt's beside each (true CFG
    # encodes it at each prompt's T5 length), fp32, replicated.
    assert v["prompts"] == (2 * 2) * (8 * 48 + 32) * 4
    assert v["sampling"] > 0 and v["decoding"] > 0 and v["flops"] > 0
    resident = v["base"] + v["vae"] + v["prompts"]
    peak = max(mem["total"] - mem["argument"], v["sampling"], v["decoding"])
    assert plan["total"] == mem["argument"] + resident + peak and plan["fits"] is True


# The splash kernels as libtpu emits them in the Flux step (operands: two block-mask tables, q, k, v, then for the
# backward kernels the softmax statistics and do), inside a 3-trip loop, plus one forward outside it.
SPLASH_HLO = """
HloModule splash

%body (p: (s32[], bf16[2,1536,128])) -> (s32[], bf16[2,1536,128]) {
  %p = (s32[], bf16[2,1536,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %q = bf16[2,1536,128]{2,1,0} get-tuple-element(%p), index=1
  %m = s8[1,3,3]{2,1,0} constant({...})
  %lse = f32[2,8,1536]{2,1,0} constant({...})
  %splash_mha_dkv_no_residuals.1 = (bf16[2,1536,128]{2,1,0}, bf16[2,1536,128]{2,1,0}) custom-call(%m, %m, %q, %q, %q, %lse, %q, %lse), custom_call_target="tpu_custom_call"
  %splash_mha_dq_no_residuals.1 = bf16[2,1536,128]{2,1,0} custom-call(%m, %m, %q, %q, %q, %lse, %q, %lse), custom_call_target="tpu_custom_call"
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[2,1536,128]) tuple(%next, %splash_mha_dq_no_residuals.1)
}

%cond (p: (s32[], bf16[2,1536,128])) -> pred[] {
  %p = (s32[], bf16[2,1536,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[2,1536,128]) -> (s32[], bf16[2,1536,128]) {
  %x = bf16[2,1536,128]{2,1,0} parameter(0)
  %m = s8[1,3,3]{2,1,0} constant({...})
  %splash_mha_fwd_residuals.1 = (bf16[2,1536,128]{2,1,0}, f32[2,1536,128]{2,1,0}) custom-call(%m, %m, %x, %x, %x), custom_call_target="tpu_custom_call"
  %zero = s32[] constant(0)
  %init = (s32[], bf16[2,1536,128]) tuple(%zero, %x)
  ROOT %w = (s32[], bf16[2,1536,128]) while(%init), condition=%cond, body=%body
}
"""  # noqa: E501  (HLO lines as libtpu prints them)


def test_count_flops_counts_the_splash_kernels():
    pair = 2.0 * 2 * 1536 * 1536 * 128  # one matmul over every (query, key) pair of 2 heads at head_dim 128
    count = count_flops(SPLASH_HLO)
    assert count.flops == 2 * pair + 3 * (3 * pair + 4 * pair)  # the forward once, dq + dkv three times
    assert count.flat_flops == 2 * pair + 3 * pair + 4 * pair
