"""Benchmark the sampler: seconds per image of ``FluxSampler`` (denoising loop + VAE decode) and its compile time.

Builds random Flux.1-dev-shaped weights directly on the device(s) (no checkpoint; the base is created sharded by
one jitted function, as ``flux_jax.train.build`` does for a random base) and a random FLUX.1 VAE, feeds random T5 /
CLIP states (the text encoders are not part of the loop), and times ``FluxSampler.latents`` (the whole denoising
loop, one compiled function) and ``FluxSampler.decode`` separately. Defaults: 1024 px, 28 steps, bf16, batch 1,
guidance-distilled (Flux.1-dev at guidance 3.5); ``--cfg 3.5`` runs true CFG (both branches in one call).
Useful FLOPs per image count the transformer's matmuls and attention forward (the formula of
``shared/bench/torch_peer_lora_step.py``, forward only), so the numbers compare with ``bench/torch_peer_sample.py``
(diffusers' FluxPipeline transformer loop) on the same machine.

  python bench/sample.py                                        # H100 / TPU: 1024 px, 28 steps, bf16
  python bench/sample.py --batch 4 --cfg 3.5 --width 768         # more settings
  python bench/sample.py --preset tiny                          # CPU smoke run: tiny model, 64 px, 2 steps

One JSON line per batch size, then ``RESULTS [...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from flux_jax.axes import DEFAULT_RULES  # noqa: E402
from flux_jax.dtypes import DTYPES, compute_dtype_for  # noqa: E402
from flux_jax.encoders.vae import AutoEncoder, VAEConfig  # noqa: E402
from flux_jax.flow import packed_seq_len  # noqa: E402
from flux_jax.hardware import peak_flops  # noqa: E402
from flux_jax.model.attention import select_attention  # noqa: E402
from flux_jax.model.config import FluxConfig, preset  # noqa: E402
from flux_jax.sampling.sampler import FluxSampler, SampleSettings, TextConditioning  # noqa: E402
from flux_jax.sharding import make_mesh, state_shardings, use_mesh  # noqa: E402
from flux_jax.train.build import random_flux  # noqa: E402

# What a preset runs unless told otherwise: full size at FLUX.1-dev's recipe, or a seconds-long CPU smoke run.
PRESET_DEFAULTS = {
    "dev": dict(width=1024, height=1024, steps=28, txt_len=512, vae="flux"),
    "schnell": dict(width=1024, height=1024, steps=4, txt_len=256, vae="flux"),
    "tiny": dict(width=64, height=64, steps=2, txt_len=16, vae="tiny"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="dev", choices=sorted(PRESET_DEFAULTS),
                   help="architecture (dev = Flux.1-dev shapes; tiny = a CPU smoke run at tiny sizes)")  # fmt: skip
    p.add_argument("--depth", type=int, default=None, help="double blocks (default: the preset's)")
    p.add_argument("--single-depth", type=int, default=None, help="single blocks (default: the preset's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: 1024; tiny: 64)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: 1024; tiny: 64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 28; schnell 4; tiny 2)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="images per call (one JSON line each)")
    p.add_argument("--cfg", type=float, default=1.0, help="true-CFG scale; > 1 adds the negative branch")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance embedding value (Flux.1-dev: 3.5)")
    p.add_argument("--txt-len", type=int, default=None, help="T5 tokens (default: dev 512, schnell 256, tiny 16)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp8"],
                   help="base storage dtype (fp8: kernels stored fp8, computed in bf16)")  # fmt: skip
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "cudnn", "splash"],
        help="model.attention (auto: splash on TPU, cuDNN on NVIDIA GPUs, XLA on CPU)",
    )
    p.add_argument("--vae", default=None, choices=["flux", "tiny"], help="VAE shape (default: flux; tiny for tiny)")
    p.add_argument("--no-decode", action="store_true", help="time the denoising loop only")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (after one untimed warm call)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by device)")
    p.add_argument("--fsdp", type=int, default=-1, help="mesh.fsdp (default: all devices); mesh.data = 1")
    args = p.parse_args(argv)
    for key, value in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def forward_flops(arch: FluxConfig, img_tokens: int, txt_tokens: int) -> float:
    """Matmul + attention FLOPs of one transformer forward per row (the torch peer's formula, forward only)."""
    length, hidden, blocks = img_tokens + txt_tokens, arch.hidden_size, arch.depth + arch.depth_single_blocks
    return 2 * 12 * hidden * hidden * length * blocks + 4 * length * length * hidden * blocks


# Below this many parameters the weights are drawn on the host with numpy: compiling a random init (a threefry
# program per parameter) takes longer than drawing a small model, and the tiny smoke run should take seconds.
HOST_INIT_PARAMS = 200_000_000


def host_random(abstract: nnx.State, seed: int) -> nnx.State:
    """numpy random values of ``abstract``'s shapes, in its dtypes: kernels ~ N(0, 1/fan_in) so activations stay
    O(1) (fan_in: the input dim of a [(L,) in, out] Linear, kh x kw x in of an HWIO conv), norm scales one, the
    rest zero."""
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        leaf = var.get_value()
        shape = leaf.shape
        if path[-1] == "kernel":
            fan_in = math.prod(shape[:-1]) if len(shape) == 4 else shape[-2]
            value = rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(fan_in))
        else:
            value = np.full(shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)
        flat.append((path, var.replace(jnp.asarray(value).astype(leaf.dtype))))
    return nnx.from_flat_state(flat)


def random_base(arch: FluxConfig, *, dtype: str, attention: str, mesh, rules) -> nnx.Module:
    """A random Flux placed sharded on ``mesh``; a big one is created so by one jitted function (never whole on one
    device), a small one drawn on the host."""
    compute = "bf16" if dtype == "fp8" else dtype

    def make() -> nnx.Module:
        return random_flux(arch, base_dtype=dtype, compute_dtype=compute, seed=0, attention=attention, remat="none")

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh, rules)
    if sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) < HOST_INIT_PARAMS:
        state = jax.device_put(host_random(abstract, seed=0), shardings)
    else:
        state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def random_vae(config: VAEConfig, *, dtype: str, mesh) -> AutoEncoder:
    """A random VAE (FLUX.1's has 84M parameters: drawn on the host), replicated on ``mesh``."""

    def make() -> AutoEncoder:
        return AutoEncoder(config, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], rngs=nnx.Rngs(0))

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.device_put(host_random(abstract, seed=1), NamedSharding(mesh, PartitionSpec())))


def text(arch: FluxConfig, *, batch: int, txt_len: int, dtype, seed: int) -> TextConditioning:
    rng = np.random.default_rng(seed)
    t5 = rng.standard_normal((batch, txt_len, arch.context_in_dim), np.float32)
    clip = rng.standard_normal((batch, arch.vec_in_dim), np.float32)
    return TextConditioning(t5=jnp.asarray(t5, dtype), clip=jnp.asarray(clip, dtype))


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def time_batch(args, arch, sampler: FluxSampler, batch: int, peak: float | None, mesh) -> dict:
    """First call (trace + compile + run), then ``repeats`` timed calls of the loop and of the decode."""
    compute = compute_dtype_for(DTYPES[args.dtype])
    settings = SampleSettings(width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                              cfg=args.cfg, seed=0)  # fmt: skip
    prompts = text(arch, batch=batch, txt_len=args.txt_len, dtype=compute, seed=1)
    negative = text(arch, batch=1, txt_len=args.txt_len, dtype=compute, seed=2) if args.cfg > 1 else None
    traces = sampler.traces
    latents, first = _timed(lambda: sampler.latents(prompts, settings, negative=negative))
    loop = []
    for _ in range(args.repeats):
        latents, dt = _timed(lambda: sampler.latents(prompts, settings, negative=negative))
        loop.append(dt)
    denoise = float(np.median(loop))
    decode_first = decode = 0.0
    if not args.no_decode:
        _, decode_first = _timed(lambda: sampler.decode(latents, settings))
        decode = float(np.median([_timed(lambda: sampler.decode(latents, settings))[1] for _ in range(args.repeats)]))
    rows = batch * (2 if args.cfg > 1 else 1)
    useful = args.steps * rows * forward_flops(arch, packed_seq_len(args.height, args.width), args.txt_len)
    return dict(
        s_per_image=round((denoise + decode) / batch, 4),
        denoise_s_per_image=round(denoise / batch, 4),
        decode_s_per_image=round(decode / batch, 4) if not args.no_decode else None,
        s_per_step=round(denoise / args.steps, 4),
        # The first call traces, compiles and runs once; the compile time is what it took beyond a warm call.
        compile_s=round(max(first - denoise, 0.0), 2),
        decode_compile_s=round(max(decode_first - decode, 0.0), 2) if not args.no_decode else None,
        traces=sampler.traces - traces,
        useful_tflop_per_image=round(useful / batch / 1e12, 3),
        mfu=round(useful / denoise / (peak * mesh.size), 4) if peak else None,
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    base_cfg = preset(args.preset)
    arch = dataclasses.replace(
        base_cfg,
        depth=base_cfg.depth if args.depth is None else args.depth,
        depth_single_blocks=base_cfg.depth_single_blocks if args.single_depth is None else args.single_depth,
    )
    mesh = make_mesh(1, args.fsdp, 1)
    rules = DEFAULT_RULES
    device = jax.devices()[0]
    peak = peak_flops(device, args.peak_tflops)
    compute = "bf16" if args.dtype == "fp8" else args.dtype
    attention, _ = select_attention(args.attention, device=device, head_dim=arch.head_dim, dtype=DTYPES[compute])
    t0 = time.perf_counter()
    with use_mesh(mesh, rules):
        model = random_base(arch, dtype=args.dtype, attention=attention, mesh=mesh, rules=rules)
        vae = random_vae(VAEConfig.flux() if args.vae == "flux" else VAEConfig.tiny(), dtype=compute, mesh=mesh)
        jax.block_until_ready((nnx.state(model), nnx.state(vae)))
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    print(f"device {device.device_kind} x{mesh.size}; {arch.depth}+{arch.depth_single_blocks} blocks, "
          f"hidden {arch.hidden_size}; base {n_base / 1e9:.3f}B params ({args.dtype}); {args.width}x{args.height}, "
          f"{args.steps} steps, cfg {args.cfg:g}; built in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    sampler = FluxSampler.from_model(model, vae, mesh=mesh, rules=rules, dtype=compute)
    results = []
    for batch in args.batch:
        common = dict(preset=args.preset, width=args.width, height=args.height, steps=args.steps, batch=batch,
                      cfg=args.cfg, dtype=args.dtype, attention=attention, device=device.device_kind,
                      devices=mesh.size)  # fmt: skip
        try:
            with use_mesh(mesh, rules):
                r = dict(common, **time_batch(args, arch, sampler, batch, peak, mesh))
        except jax.errors.JaxRuntimeError as e:  # out of memory (at compile or run time): report, go on
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            r = dict(common, error="OOM", detail=str(e).strip().splitlines()[0][:300])
        print(json.dumps(r), flush=True)
        results.append(r)
    print("RESULTS " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()
