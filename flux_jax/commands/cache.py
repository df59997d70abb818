"""`flux-jax cache --config FILE [key=value ...]`: images and captions -> cached latents and text embeddings.

    flux-jax cache --config flux_jax/assets/demo.yaml data.path=flux_jax/assets/demo_photos   # tiny encoders
    flux-jax cache --config run.yaml data.path=photos encoders.root=/models/FLUX.1-dev --strict

Encodes every example once (VAE latents, T5 states, CLIP pooled vectors), batched per aspect-ratio bucket and
sharded on the mesh, into ``data.cache_dir``. Re-running resumes an interrupted cache; on a complete one it
checks every file against the sizes and CRC-32s in cache.json and is a no-op when they match, and otherwise
(a file deleted, truncated or changed) encodes again only the records that no longer read back intact. Bad
inputs are converted or skipped and listed in ``<cache_dir>/report.json``; ``--strict`` makes any of them an
error before anything is written.
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

    from flux_jax.data.cache import REPORT_JSON, build_cache
    from flux_jax.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    summary = build_cache(cfg, strict=args.strict or None, force=args.force, progress=not args.no_progress)
    print(summary.report.summary())
    if summary.up_to_date:
        print(f"cache {summary.cache_dir} is up to date ({summary.records} records)")
        return 0
    if summary.damaged:
        shown = ", ".join(summary.damaged[:3]) + (
            f" and {len(summary.damaged) - 3} more" if len(summary.damaged) > 3 else ""
        )
        print(
            f"repaired the damaged cache in {summary.cache_dir} ({shown}): {summary.encoded} of {summary.records} "
            "records encoded again" + (", the others kept" if summary.encoded < summary.records else "")
        )
    buckets = ", ".join(map(str, summary.buckets))
    print(
        f"cached {summary.records} records ({summary.encoded} encoded now in {summary.seconds:.1f} s, compilation "
        f"included) in buckets {buckets} to {summary.cache_dir}; report: {summary.cache_dir / REPORT_JSON}"
    )
    return 0
