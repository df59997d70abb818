"""Throughput of the cache step (`flux-jax cache`): images encoded per second.

    python bench/cache.py                      # tiny demo encoders on the CPU: the whole cache build, end to end
    python bench/cache.py --full --size 1024   # FLUX.1 VAE + T5-XXL + CLIP-L (random weights) on the accelerator

Tiny mode builds a cache of ``--images`` synthetic photos with the generated demo encoders and reports both the
end-to-end rate (decode, resize, encode, write; compile excluded by a warm-up build) and the encode-only rate.
Full mode measures the encoders alone at real size (VAE at ``--size``, T5 at 512 tokens, bf16) on one global
batch shape, after a warm-up call; no checkpoint download is needed, and nothing but JAX, Flax, transformers
and ml_dtypes is imported (no TensorFlow, TFDS or grain), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up: compile
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_images * repeats / (time.perf_counter() - start)


def tiny(args: argparse.Namespace) -> None:
    from PIL import Image

    from flux_jax.data.cache import build_cache
    from flux_jax.data.demo import build_demo_encoders
    from flux_jax.data.encoding import FluxEncoders, resolve_encoder_paths
    from flux_jax.run_config import from_dict
    from flux_jax.sharding import make_mesh

    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    rng = np.random.default_rng(0)
    photos = work / "photos"
    photos.mkdir()
    for i in range(args.images):
        # Smooth random images (JPEG-compressible like photos), all in the square bucket.
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((args.size, args.size), Image.Resampling.BICUBIC)
        image.save(photos / f"{i:04d}.jpg", quality=90)
        (photos / f"{i:04d}.txt").write_text("a photo of a cat")

    def cfg(name: str):
        return from_dict(
            {
                "model": {"preset": "tiny"},
                "data": {"path": str(photos), "cache_dir": str(work / name), "resolution": args.size},
                "encoders": {"root": str(root), "dtype": "fp32", "t5_max_length": 64, "batch_size": args.batch},
            }
        )

    root = build_demo_encoders(work / "encoders")
    paths, _ = resolve_encoder_paths(cfg("warm"), work / "unused")
    mesh = make_mesh(-1, 1, 1)
    encoders = FluxEncoders.load(paths, mesh=mesh, dtype="fp32", t5_max_length=64)
    build_cache(cfg("warm"), progress=False, encoders=encoders)  # compiles
    start = time.perf_counter()
    summary = build_cache(cfg("timed"), progress=False, encoders=encoders)
    end_to_end = summary.records / (time.perf_counter() - start)
    batch = -(-args.batch // encoders.batch_multiple()) * encoders.batch_multiple()
    images = rng.uniform(-1, 1, (batch, args.size, args.size, 3)).astype(np.float32)
    encode = rate(lambda: encoders.encode(images, ["a photo of a cat"] * batch, batch), batch, args.repeats)
    print(f"device: {jax_device()}, {len(mesh.devices.flat)} devices, tiny demo encoders fp32, {args.size}px")
    print(
        f"cache end to end: {end_to_end:.2f} images/s ({summary.records} images, encode loop {summary.seconds:.1f} s)"
    )
    print(f"encode only:      {encode:.2f} images/s (global batch {batch})")


def full(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flux_jax.data.demo import DEMO_CORPUS
    from flux_jax.data.encoding import FluxEncoders
    from flux_jax.encoders.clip import CLIPTextConfig, CLIPTextModel
    from flux_jax.encoders.t5 import T5Config, T5Encoder
    from flux_jax.encoders.tokenizers import (
        build_tiny_clip_tokenizer,
        build_tiny_t5_tokenizer,
        load_clip_tokenizer,
        load_t5_tokenizer,
    )
    from flux_jax.encoders.vae import AutoEncoder, VAEConfig
    from flux_jax.sharding import make_mesh

    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    t5_cfg = T5Config.xxl() if args.t5_layers is None else T5Config(num_layers=args.t5_layers)
    mesh = make_mesh(-1, 1, 1)
    with jax.default_device(jax.local_devices()[0]):
        # Random weights, built in place: the rate does not depend on their values.
        vae = AutoEncoder(VAEConfig.flux(), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        t5 = T5Encoder(t5_cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(1))
        clip = CLIPTextModel(CLIPTextConfig.clip_l(), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(2))
    # Token ids only need to be valid for the real vocabularies; the tiny tokenizers' are.
    tok_dir = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    t5_tok = load_t5_tokenizer(build_tiny_t5_tokenizer(tok_dir / "t5", DEMO_CORPUS))
    clip_tok = load_clip_tokenizer(build_tiny_clip_tokenizer(tok_dir / "clip", DEMO_CORPUS))
    encoders = FluxEncoders(vae, t5, clip, t5_tok, clip_tok, mesh=mesh, t5_max_length=512)
    batch = -(-args.batch // encoders.batch_multiple()) * encoders.batch_multiple()
    images = np.random.default_rng(0).uniform(-1, 1, (batch, args.size, args.size, 3)).astype(np.float32)
    captions = [DEMO_CORPUS[i % len(DEMO_CORPUS)] for i in range(batch)]
    images_per_s = rate(lambda: encoders.encode(images, captions, batch), batch, args.repeats)
    text_per_s = rate(lambda: encoders.encode_text(captions, batch), batch, args.repeats)
    print(f"device: {jax_device()}, {len(mesh.devices.flat)} devices, {args.dtype}, T5 {t5_cfg.num_layers} layers")
    print(f"encode VAE {args.size}px + T5 512 tokens + CLIP: {images_per_s:.2f} images/s (batch {batch})")
    print(f"text only (T5 + CLIP): {text_per_s:.2f} captions/s")


def jax_device() -> str:
    import jax

    return f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="real-size encoders (random weights), on the accelerator")
    parser.add_argument("--size", type=int, default=None, help="image side in px (tiny: 128, full: 1024)")
    parser.add_argument("--images", type=int, default=32, help="tiny: images in the timed cache build")
    parser.add_argument("--batch", type=int, default=8, help="global encode batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed encode calls after the warm-up")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="full: encoder dtype")
    parser.add_argument("--t5-layers", type=int, default=None, help="full: fewer T5 layers (smoke runs on a CPU)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.full:
        args.size = args.size or 1024
        full(args)
    else:
        args.size = args.size or 128
        tiny(args)


if __name__ == "__main__":
    main()
