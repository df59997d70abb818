"""Benchmark the LoRA training step: seconds/step, samples/s and MFU for a model shape and resolution.

Builds random Flux-Dev2Pro-shaped weights directly on the device(s) (no checkpoint; the base is created sharded by
one jitted function), attaches LoRA rank 16 to every block linear (the kohya default), and times the trainer's own
compiled step (``flux_jax.train.step``: flow matching at guidance 1.0, AdamW, donated state). FLOPs and MFU use the
formula of ``shared/bench/torch_peer_lora_step.py`` (useful FLOPs = 2 x forward matmuls + 3 x attention forward,
text 512 tokens), so the numbers compare with the PyTorch peer run on the same machine.

  python bench/train_step.py --resolution 512 1024 --remat none full --attention cudnn      # H100, full size
  python bench/train_step.py --depth 1 --single-depth 1 --resolution 256 --txt-len 64      # CPU smoke run

One JSON line per (resolution, remat), then ``RESULTS [...]``.

``--loop`` runs the trainer itself (``flux_jax.train.loop``: data iterator, step, metrics) instead of the bare step,
and reports the fraction of step time the loop spent waiting for its input (``data_wait_fraction`` in metrics.jsonl):

  python bench/train_step.py --loop tiny                                  # demo photos -> grain latent cache
  python bench/train_step.py --loop full --depth 1 --single-depth 1 --resolution 256   # full-width examples

``tiny`` caches the packaged demo photos with the demo encoders (the real ``flux-jax cache`` path) and trains the
demo config on that grain pipeline; ``full`` writes random examples at Flux.1-dev widths (T5 [txt-len, 4096] bf16:
4 MB per example at 512 tokens) as a cached-example dataset and trains the reduced-depth full-width model on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from flux_jax.axes import DEFAULT_RULES  # noqa: E402
from flux_jax.hardware import peak_flops  # noqa: E402
from flux_jax.model.config import preset  # noqa: E402
from flux_jax.model.flux import configure  # noqa: E402
from flux_jax.model.latents import image_ids  # noqa: E402
from flux_jax.run_config import LoraConfig, ModelConfig, OptimConfig  # noqa: E402
from flux_jax.sharding import make_mesh, use_mesh  # noqa: E402
from flux_jax.train import build  # noqa: E402
from flux_jax.train.memory import memory_summary  # noqa: E402
from flux_jax.train.metrics import useful_flops_per_sample  # noqa: E402
from flux_jax.train.objective import Objective  # noqa: E402
from flux_jax.train.optim import build_optimizer  # noqa: E402
from flux_jax.train.state import abstract_like, flat_params, init_train_state, split_trainable  # noqa: E402
from flux_jax.train.step import StepCompiler  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="dev", help="architecture preset (dev = Flux.1-dev / Dev2Pro shapes)")
    p.add_argument("--depth", type=int, default=None, help="double blocks (default: the preset's 19)")
    p.add_argument("--single-depth", type=int, default=None, help="single blocks (default: the preset's 38)")
    p.add_argument("--resolution", type=int, nargs="+", default=[512, 1024], help="square image sides in pixels")
    p.add_argument("--batch", type=int, default=1, help="global batch")
    p.add_argument("--txt-len", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    p.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full", "save_matmuls"])
    p.add_argument("--base-dtype", default="bf16", choices=["bf16", "fp8", "fp32"])
    p.add_argument("--compute-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "cudnn", "splash"],
        help="model.attention (auto: splash on TPU, cuDNN on NVIDIA GPUs, XLA on CPU)",
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by device)")
    p.add_argument("--fsdp", type=int, default=-1, help="mesh.fsdp (default: all devices); mesh.data = 1")
    p.add_argument("--loop", choices=["tiny", "full"], default=None,
                   help="time the whole training loop and its input pipeline instead of the bare step")  # fmt: skip
    return p.parse_args(argv)


def random_batch(cfg, *, batch: int, resolution: int, txt_len: int, sharding, seed: int = 0) -> dict[str, jax.Array]:
    """A [1, batch, ...] batch (one micro-batch) of random latents and text states, bf16 as the cache stores."""
    rng = np.random.default_rng(seed)
    grid = resolution // 16
    bf16 = jnp.bfloat16
    host = {
        "latents": rng.standard_normal((1, batch, grid * grid, cfg.in_channels), np.float32).astype(bf16),
        "t5": rng.standard_normal((1, batch, txt_len, cfg.context_in_dim), np.float32).astype(bf16),
        "clip": rng.standard_normal((1, batch, cfg.vec_in_dim), np.float32).astype(bf16),
        "img_ids": np.broadcast_to(image_ids(grid, grid), (1, batch, grid * grid, 3)).copy(),
    }
    return {k: jax.device_put(v, sharding) for k, v in host.items()}


def time_step(args, arch, compiler, frozen, lora_state, tx, mesh, rules, res: int, peak: float | None) -> dict:
    """Compile the step for ``res``, run warmup + timed steps from a fresh state; the measurements."""
    device = mesh.devices.flat[0]
    # A copy: the step donates the state, and the model keeps its own LoRA arrays for the next configuration.
    lora = {k: jnp.copy(v) for k, v in flat_params(lora_state).items()}
    state, shardings = init_train_state(lora, tx, seed=0, ema=False, mesh=mesh)
    batch = random_batch(arch, batch=args.batch, resolution=res, txt_len=args.txt_len,
                         sharding=compiler.batch_sharding)  # fmt: skip
    with use_mesh(mesh, rules):
        t0 = time.perf_counter()
        compiled = compiler.compile(abstract_like(state, shardings), compiler.abstract_batch(batch))
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            state, metrics = compiled(frozen, state, batch)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(frozen, state, batch)
        jax.block_until_ready((state, metrics))
        dt = (time.perf_counter() - t0) / args.steps
    useful = useful_flops_per_sample(arch, (res // 16) ** 2, args.txt_len) * args.batch
    mem = memory_summary(compiled) or {}
    stats = device.memory_stats() or {}  # peak_bytes_in_use is the process-lifetime peak
    return dict(
        s_per_step=round(dt, 4),
        samples_per_s=round(args.batch / dt, 3),
        useful_tflop=round(useful / 1e12, 3),
        mfu=round(useful / dt / (peak * mesh.size), 4) if peak else None,
        step_memory_gib=round(mem["total"], 2) if mem else None,
        peak_mem_gib=round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
        compile_s=round(compile_s, 1),
        loss=float(metrics["loss"]),
    )


def loop_run(args, arch) -> list[dict]:
    """Train ``args.steps + args.warmup`` steps with the real trainer; the medians of its logged metrics over the
    last ``args.steps`` (the first steps include compiles)."""
    import tempfile

    from flux_jax.commands.demo import demo_config
    from flux_jax.data.cache import build_cache
    from flux_jax.data.examples import Example, write_cached_examples
    from flux_jax.run_config import load_config
    from flux_jax.train.loop import setup

    steps = args.steps + args.warmup
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        common = [f"output_dir={tmp / 'run'}", f"train.steps={steps}", "log.every=1", f"checkpoint.every={steps}",
                  "validation.every=0"]  # fmt: skip
        if args.loop == "tiny":
            with demo_config(None, [*common, f"data.cache_dir={tmp / 'cache'}"]) as cfg:
                build_cache(cfg, progress=False)
                trainer, state = setup(cfg, progress=False)
                what = f"demo photos, grain latent cache, tiny model, batch {cfg.train.batch_size}"
        else:
            rng = np.random.default_rng(0)
            grid = args.resolution[0] // 16
            examples = [
                Example(
                    latents=rng.standard_normal((grid * grid, arch.in_channels), np.float32).astype(jnp.bfloat16),
                    t5=rng.standard_normal((args.txt_len, arch.context_in_dim), np.float32).astype(jnp.bfloat16),
                    clip=rng.standard_normal((arch.vec_in_dim,), np.float32).astype(jnp.bfloat16),
                    height=grid,
                    width=grid,
                )
                for _ in range(max(8, args.batch * 4))
            ]
            write_cached_examples(tmp / "data", examples)
            overrides = [*common, f"data.path={tmp / 'data'}", "data.synthetic=false",
                         f"data.resolution={args.resolution[0]}",
                         f"train.batch_size={args.batch}", f"model.base_dtype={args.base_dtype}",
                         f"model.compute_dtype={args.compute_dtype}", f"model.attention={args.attention}",
                         f"model.remat={args.remat[0]}", f"lora.rank={args.rank}", f"lora.alpha={float(args.rank)}",
                         "mesh.data=1", f"mesh.fsdp={args.fsdp}", "model.preset=dev"]  # fmt: skip
            cfg = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", overrides)
            trainer, state = setup(cfg, progress=False, architecture=arch)
            what = (f"random full-width examples ({args.txt_len} T5 tokens), cached-example reader, "
                    f"{arch.depth}+{arch.depth_single_blocks} blocks, batch {args.batch}")  # fmt: skip
        result = trainer.run(state)
        records = [
            json.loads(line) for line in (pathlib.Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
    timed = [r for r in records if r.get("step", 0) > args.warmup and "step_time" in r]
    med = {k: float(np.median([r[k] for r in timed])) for k in ("step_time", "data_wait", "data_wait_fraction")}
    r = dict(loop=args.loop, what=what, steps=len(timed), s_per_step=round(med["step_time"], 4),
             data_wait_s=round(med["data_wait"], 5), data_wait_fraction=round(med["data_wait_fraction"], 4),
             max_data_wait_fraction=round(max(r["data_wait_fraction"] for r in timed), 4))  # fmt: skip
    print(json.dumps(r), flush=True)
    results.append(r)
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    base_cfg = preset(args.preset)
    arch = dataclasses.replace(
        base_cfg,
        depth=base_cfg.depth if args.depth is None else args.depth,
        depth_single_blocks=base_cfg.depth_single_blocks if args.single_depth is None else args.single_depth,
    )
    if args.loop:
        results = loop_run(args, arch)
        print("RESULTS " + json.dumps(results))
        return results
    mesh = make_mesh(1, args.fsdp, 1)
    rules = DEFAULT_RULES
    device = jax.devices()[0]
    peak = peak_flops(device, args.peak_tflops)
    model_cfg = ModelConfig(base="", base_dtype=args.base_dtype, compute_dtype=args.compute_dtype,
                            attention=args.attention, remat="none")  # fmt: skip
    lora_cfg = LoraConfig(rank=args.rank, alpha=float(args.rank), targets="all_blocks")
    t0 = time.perf_counter()
    with use_mesh(mesh, rules):
        model, adapted = build.build_model(model_cfg, lora_cfg, mesh=mesh, rules=rules, architecture=arch)
        jax.block_until_ready(nnx.state(model))
    n_base = sum(x.size for x in jax.tree.leaves(split_trainable(model)[2]))
    n_lora = sum(x.size for x in jax.tree.leaves(split_trainable(model)[1]))
    print(f"device {device.device_kind} x{mesh.size}; {arch.depth}+{arch.depth_single_blocks} blocks, "
          f"hidden {arch.hidden_size}; base {n_base / 1e9:.3f}B params ({args.base_dtype}), LoRA {n_lora / 1e6:.2f}M "
          f"on {len(adapted)} linears; built in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    tx = build_optimizer(OptimConfig(lr=1e-4), 1000)
    objective = Objective()  # flux_shift timesteps, guidance 1.0: the Dev2Pro recipe
    results = []
    for remat in args.remat:
        configure(model, remat=remat)
        graphdef, lora_state, frozen = split_trainable(model)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state)
        _, shardings = init_train_state(flat_params(lora_state), tx, seed=0, ema=False, mesh=mesh)
        compiler = StepCompiler(graphdef=graphdef, template=template, frozen=frozen, state_shardings=shardings,
                                tx=tx, objective=objective, ema_decay=None, mesh=mesh)  # fmt: skip
        for res in args.resolution:
            common = dict(res=res, remat=remat, batch=args.batch, double=arch.depth, single=arch.depth_single_blocks,
                          base_dtype=args.base_dtype, attention=model.double_blocks.attention_impl,
                          device=device.device_kind)  # fmt: skip
            try:
                r = dict(common, **time_step(args, arch, compiler, frozen, lora_state, tx, mesh, rules, res, peak))
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
