"""A small folder of captioned random photos and the generated demo encoders: what the cache and trainer tests
that build a real latent cache (autocache, online encoders, gs:// caches) start from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def photo_workspace(base: Path, caption: Callable[[int], str] = lambda i: f"a photo of a cat {i}") -> dict[str, Path]:
    """``base``/photos with 6 random 80 x 72 PNGs and their caption files, and ``base``/encoders (the demo ones)."""
    from flux_jax.data.demo import build_demo_encoders

    photos = base / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(caption(i))
    return {"base": base, "photos": photos, "encoders": build_demo_encoders(base / "encoders")}


def workspace_overrides(ws: dict[str, Path], cache: str, out: str, *extra: str, steps: int, t5_len: int = 16):
    """configs/tiny.yaml overrides that cache ``ws``'s photos (64 px, flipped, fp32 demo encoders) into
    ``ws``/``cache`` and train ``steps`` steps into ``ws``/``out``; ``extra`` comes last."""
    return [
        "data.synthetic=false",
        f"data.path={ws['photos']}",
        f"data.cache_dir={ws['base'] / cache}",
        "data.resolution=64",
        "data.flip=true",
        f"encoders.root={ws['encoders']}",
        "encoders.dtype=fp32",
        f"encoders.t5_max_length={t5_len}",
        "encoders.batch_size=8",
        f"train.steps={steps}",
        "checkpoint.every=100",
        "checkpoint.async_save=false",
        "log.tensorboard=false",
        f"output_dir={ws['base'] / out}",
        *extra,
    ]
