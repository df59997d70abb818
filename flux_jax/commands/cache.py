"""`flux-jax cache --config FILE [key=value ...]`: images and captions -> cached latents and text embeddings.

    flux-jax cache --config flux_jax/assets/demo.yaml data.path=flux_jax/assets/demo_photos   # tiny encoders
    flux-jax cache --config run.yaml data.path=photos encoders.root=/models/FLUX.1-dev --strict

Encodes every example once (VAE latents, T5 states, CLIP pooled vectors), batched per aspect-ratio bucket and
sharded on the mesh, into ``data.cache_dir``. Re-running resumes an interrupted cache; on a complete one it
checks every file against the sizes and CRC-32s in cache.json and is a no-op when they match, and otherwise
(a file deleted, truncated or changed) encodes again only the records that no longer read back intact. Bad
inputs are converted or skipped and listed in ``<cache_dir>/report.json``; ``--strict`` makes any of them an
error before anything is written. `flux-jax train` runs the same build itself when it finds no complete cache;
this command builds it ahead (e.g. on other machines, or to read the report before training). With
``data.datasets`` it builds (or checks) each dataset's cache in turn.
"""

from __future__ import annotations

import argparse
import os

HELP = "encode images and captions once into a latent / text-embedding cache for training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (its data: and encoders: sections)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.path=photos")
    parser.add_argument("--strict", action="store_true", help="any bad or converted input is an error")
    parser.add_argument("--force", action="store_true", help="discard an existing (complete or partial) cache first")
    parser.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from flux_jax.train import distributed

    distributed.initialize(args.distributed)
    # TensorFlow (imported by TFDS to write records) logs its CPU feature banner otherwise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from flux_jax.data.cache import build_cache
    from flux_jax.data.mixing import dataset_views
    from flux_jax.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    for view in dataset_views(cfg):  # each of data.datasets has its own cache
        summary = build_cache(view, strict=args.strict or None, force=args.force, progress=not args.no_progress)
        print(summary.describe())
    return 0
