"""`flux-jax plan --config FILE --topology NAME`: will this run fit that TPU slice? Compiled ahead of time, on a CPU.

Compiles the real training step for the slice with libtpu (the `tpu` extra), on abstract full-size inputs, and
prints per-chip HBM (arguments, outputs, temporaries, total) against the chip's capacity plus FLOP and time
estimates. With validation on (the config's `validation` section), the sampler is planned too: a validation base
other than the training base, the VAE decoder, the prompts, and the sampler's own peak between steps, and the
verdict is on the run's total with validation. Exit status: 0 when the run fits, 1 when it does not ("does not
fit"), 2 on bad input.

libtpu must be initialised with the environment of `flux_jax.planning.topology.AOT_ENV` before JAX starts; when
this process was not started with it, the command runs itself again in a child process that is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading

HELP = "compile the training step ahead of time for a TPU slice (on a CPU machine) and report whether it fits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/dev2pro_lora.yaml)")
    parser.add_argument("--topology", required=True, metavar="NAME",
                        help="TPU slice (v5e-8, v4-8, v5litepod-4) or topology (v5e:2x4, v4:2x2x1)")  # fmt: skip
    parser.add_argument("--mesh", metavar="FILE", help="mesh config applied before the overrides "
                        "(e.g. configs/mesh/v5e-8.yaml), as `tpu.py launch --mesh` does")  # fmt: skip
    parser.add_argument("--batch", type=int, metavar="N", help="global batch size (train.batch_size)")
    parser.add_argument("--resolution", type=int, metavar="PX", help="square image side in pixels (data.resolution)")
    parser.add_argument("--text-len", type=int, default=512, metavar="N", help="T5 tokens per caption (default 512)")
    parser.add_argument("--hbm-gib", type=float, metavar="GIB",
                        help="check against this much HBM per chip instead of the chip's")  # fmt: skip
    parser.add_argument("--remat-first-fit", action="store_true",
                        help="with model.remat auto: stop at the first remat policy that fits, as train does, instead "
                        "of compiling every policy for the report (faster)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the plan as JSON to PATH ('-' for stdout)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.base_dtype=fp8")


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["plan", "--config", args.config, "--topology", args.topology, "--text-len", str(args.text_len)]
    for flag, value in (("--mesh", args.mesh), ("--batch", args.batch), ("--resolution", args.resolution),
                        ("--hbm-gib", args.hbm_gib), ("--json", args.json)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    if args.remat_first_fit:
        argv.append("--remat-first-fit")
    verbose = ["-v"] if logging.getLogger().isEnabledFor(logging.DEBUG) else []
    return [*verbose, *argv, *args.overrides]


def _rerun(args: argparse.Namespace, env: dict[str, str]) -> int:
    """Run this command again in a fresh interpreter whose environment lets libtpu describe the target."""
    import flux_jax

    root = str(pathlib.Path(flux_jax.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    child_env = {**os.environ, **env, "PYTHONPATH": path}
    # Children of a flushed parent: keep the output order of parent and child lines.
    sys.stdout.flush()
    sys.stderr.flush()
    child = subprocess.Popen([sys.executable, "-m", "flux_jax.cli", *_child_argv(args)], env=child_env)
    # A SIGTERM to this process must not leave the (minutes-long) compile running on its own.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM)) if main else None
    try:
        return child.wait()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.kill()
            child.wait()


def run(args: argparse.Namespace) -> int:
    from flux_jax.errors import FluxJaxError
    from flux_jax.planning.topology import aot_environment, environment_ready, parse_target

    target = parse_target(args.topology)
    if not environment_ready(target):
        return _rerun(args, aot_environment(target))

    from flux_jax.planning.fit import format_report, plan
    from flux_jax.run_config import load_config
    from flux_jax.tpu_launch import mesh_overrides

    overrides = mesh_overrides(args.mesh) if args.mesh else []
    overrides += list(args.overrides)
    if args.batch is not None:
        overrides.append(f"train.batch_size={args.batch}")
    if args.resolution is not None:
        overrides.append(f"data.resolution={args.resolution}")
    if args.text_len < 1:
        raise FluxJaxError(f"--text-len must be >= 1, got {args.text_len}")
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        raise FluxJaxError(f"--hbm-gib must be > 0, got {args.hbm_gib}")
    cfg = load_config(args.config, overrides)
    hbm = None if args.hbm_gib is None else int(args.hbm_gib * 2**30)
    result = plan(cfg, target, text_len=args.text_len, hbm_bytes=hbm, remat_first_fit=args.remat_first_fit)
    if args.json == "-":
        print(json.dumps(result.to_dict()))
    else:
        print(format_report(result))
        if args.json:
            from flux_jax.atomic import atomic_file

            with atomic_file(pathlib.Path(args.json)) as tmp:
                tmp.write_text(json.dumps(result.to_dict(), indent=1))
    return 0 if result.fits else 1
