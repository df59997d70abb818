"""`flux-jax train --config FILE [key=value ...]`: train a LoRA; resumes from output_dir automatically.

Images without a complete latent cache are cached first, as `flux-jax cache` would (an interrupted cache is
continued); a complete cache built from other data or settings, or a damaged one, is refused, never replaced.
"""

from __future__ import annotations

import argparse

HELP = (
    "train a Flux LoRA (guidance 1.0 on Dev2Pro by default; train.mode: full trains the whole transformer); caches "
    "uncached images first; resumes from output_dir"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host run: call jax.distributed.initialize() first (or set FLUX_JAX_DISTRIBUTED=1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to files)")


def run(args: argparse.Namespace) -> int:
    # Distributed start-up must precede every other JAX call, config loading included (it touches no devices,
    # but keep the order obvious).
    from flux_jax.train import distributed

    distributed.initialize(args.distributed)

    import logging
    import os

    # TensorFlow (imported by TFDS, which reads the latent cache and writes it when train caches first) logs its CPU
    # feature banner otherwise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from flux_jax.run_config import load_config
    from flux_jax.train.loop import train

    if not args.verbose:
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, progress=not args.no_progress)
    if result.checkpoint is None:
        print(f"no checkpoint was written in {result.run_dir}")
        return 1
    if result.preempted:
        what = "stopped early (interrupted) at" if result.stop_signal == "SIGINT" else "stopped early (preempted) at"
    else:
        what = "finished at"
    print(f"{what} step {result.step}; LoRA checkpoint: {result.checkpoint}")
    return 0
