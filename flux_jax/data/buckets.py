"""Aspect-ratio buckets: static training shapes, the bucket of each image, and the crop/resize into it.

For a target side S the buckets are the (width, height) pairs with both sides multiples of ``step`` (64 px),
width * height <= S * S, one side as long as the other side allows, and an aspect ratio within
``max_aspect``. An image goes to the bucket of each target whose aspect ratio is nearest to its own (in log
space, so 2:1 and 1:2 are equally far from 1:1), and is then scaled to cover that bucket and cropped (centre or
random). It is used at a target only if that scale does not exceed ``max_upscale``; an image too small for
every target is refused (`images.TOO_SMALL`). Each bucket compiles the train step once: the set is small and
known before training starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from flux_jax.data.images import TOO_SMALL, BadExample
from flux_jax.model.latents import PIXELS_PER_TOKEN


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def tokens(self) -> tuple[int, int]:
        """The packed latent grid (height, width) in tokens."""
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def make_buckets(side: int, *, step: int = 64, max_aspect: float = 4.0) -> tuple[Bucket, ...]:
    """Buckets of area at most side^2, sorted by aspect ratio (kohya's construction): for every width that is a
    multiple of ``step``, the tallest height that keeps the area, plus each such bucket turned portrait."""
    if step % PIXELS_PER_TOKEN or step < PIXELS_PER_TOKEN:
        raise ValueError(f"bucket step {step} must be a positive multiple of {PIXELS_PER_TOKEN}")
    if side < step:
        raise ValueError(f"target side {side} is smaller than the bucket step {step}")
    area = side * side
    found: set[Bucket] = set()
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step
        if max(width / height, height / width) <= max_aspect + 1e-9:
            found.update((Bucket(width, height), Bucket(height, width)))
    return tuple(sorted(found, key=lambda b: (b.aspect, b.width)))


def aspect_distance(width: int, height: int, bucket: Bucket) -> float:
    return abs(math.log(width / height) - math.log(bucket.aspect))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest in log space; ties go to the larger bucket, then the wider."""
    return min(buckets, key=lambda b: (aspect_distance(width, height, b), -b.width * b.height, -b.width))


def cover_scale(width: int, height: int, bucket: Bucket) -> float:
    """The resize factor that makes the image cover the bucket exactly along one axis."""
    return max(bucket.width / width, bucket.height / height)


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """Every target side's buckets and the rule that places an image."""

    sides: tuple[int, ...]
    step: int = 64
    max_aspect: float = 4.0
    max_upscale: float = 1.0

    def __post_init__(self) -> None:
        if not self.sides:
            raise ValueError("at least one target side is needed")
        object.__setattr__(self, "sides", tuple(sorted(set(int(s) for s in self.sides))))

    @classmethod
    def from_config(cls, data) -> BucketSpec:  # a run_config.DataConfig
        return cls(
            sides=tuple(data.resolutions) or (data.resolution,),
            step=data.bucket_step,
            max_aspect=data.max_aspect,
            max_upscale=data.max_upscale,
        )

    def buckets_for(self, side: int) -> tuple[Bucket, ...]:
        return make_buckets(side, step=self.step, max_aspect=self.max_aspect)

    @property
    def all_buckets(self) -> tuple[Bucket, ...]:
        """Every bucket of every side, in a fixed order (a bucket's index here is its id in the cache)."""
        return tuple(sorted({b for side in self.sides for b in self.buckets_for(side)}))

    def assign(self, width: int, height: int) -> list[tuple[int, Bucket]]:
        """(side, bucket) for each target side the image can fill; raises `BadExample` (too small) if none."""
        placed = []
        for side in self.sides:
            bucket = nearest_bucket(width, height, self.buckets_for(side))
            if cover_scale(width, height, bucket) <= self.max_upscale + 1e-9:
                placed.append((side, bucket))
        if not placed:
            side = self.sides[0]
            bucket = nearest_bucket(width, height, self.buckets_for(side))
            raise BadExample(
                TOO_SMALL,
                f"{width}x{height} would need {cover_scale(width, height, bucket):.2f}x upscaling for its smallest "
                f"bucket {bucket} (max_upscale {self.max_upscale})",
            )
        return placed


def crop_box(
    width: int, height: int, bucket: Bucket, *, random: bool = False, rng: np.random.Generator | None = None
) -> tuple[float, float, float, float]:
    """The source region (left, top, right, bottom) that scales onto the bucket after a cover resize."""
    scale = cover_scale(width, height, bucket)
    cw, ch = bucket.width / scale, bucket.height / scale
    if random:
        if rng is None:
            raise ValueError("a random crop needs an rng")
        left, top = rng.uniform(0.0, width - cw), rng.uniform(0.0, height - ch)
    else:
        left, top = (width - cw) / 2.0, (height - ch) / 2.0
    return (left, top, left + cw, top + ch)


def render(image: Image.Image, bucket: Bucket, box: Sequence[float], *, flip: bool = False) -> np.ndarray:
    """Resize the ``box`` region of an RGB image onto the bucket (Lanczos), optionally mirror it, and scale to
    the VAE's input range: float32 [height, width, 3] in [-1, 1]."""
    out = image.resize((bucket.width, bucket.height), Image.Resampling.LANCZOS, box=tuple(box))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.float32) / 127.5 - 1.0
