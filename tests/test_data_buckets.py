"""Aspect-ratio buckets: construction, nearest-aspect placement, no upscaling, crops and flips."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flux_jax.data.buckets import (
    Bucket,
    BucketSpec,
    aspect_distance,
    cover_scale,
    crop_box,
    make_buckets,
    nearest_bucket,
    render,
)
from flux_jax.data.images import TOO_SMALL, BadExample
from flux_jax.run_config import DataConfig


@pytest.mark.parametrize("side", [192, 512, 768, 1024])
def test_buckets_are_multiples_of_64_within_area_and_aspect(side: int) -> None:
    buckets = make_buckets(side, step=64, max_aspect=4.0)
    assert Bucket(side // 64 * 64, side // 64 * 64) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert b.width * b.height <= side * side
        assert max(b.aspect, 1 / b.aspect) <= 4.0
        assert Bucket(b.height, b.width) in buckets  # portrait and landscape alike
        assert b.tokens == (b.height // 16, b.width // 16)
    # One side of each bucket is as long as the other side allows (no needlessly small buckets).
    for b in buckets:
        assert (b.height + 64) * b.width > side * side or (b.width + 64) * b.height > side * side


def test_known_bucket_table_at_1024() -> None:
    buckets = make_buckets(1024, step=64, max_aspect=2.0)
    assert [str(b) for b in buckets] == [
        "704x1408", "768x1344", "768x1280", "832x1216", "896x1152", "960x1088", "1024x1024",
        "1088x960", "1152x896", "1216x832", "1280x768", "1344x768", "1408x704",
    ]  # fmt: skip


def test_every_image_lands_in_the_bucket_with_nearest_aspect() -> None:
    spec = BucketSpec(sides=(512, 768, 1024), max_upscale=1.0)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(64, 4096, size=2))
        try:
            placed = spec.assign(w, h)
        except BadExample as e:
            assert e.reason == TOO_SMALL
            assert cover_scale(w, h, nearest_bucket(w, h, spec.buckets_for(512))) > 1.0
            continue
        for side, bucket in placed:
            candidates = spec.buckets_for(side)
            best = min(aspect_distance(w, h, b) for b in candidates)
            assert aspect_distance(w, h, bucket) == pytest.approx(best, abs=1e-12)
            assert bucket in candidates


def test_several_target_areas_and_no_upscaling() -> None:
    spec = BucketSpec(sides=(512, 768, 1024))
    assert [side for side, _ in spec.assign(4000, 3000)] == [512, 768, 1024]
    assert [side for side, _ in spec.assign(700, 700)] == [512]  # 768 would need upscaling
    for w, h in [(700, 700), (1000, 330), (330, 1000), (2000, 1000), (513, 513)]:
        for _, bucket in spec.assign(w, h):
            assert cover_scale(w, h, bucket) <= 1.0
    relaxed = BucketSpec(sides=(512, 768, 1024), max_upscale=1.5)
    assert [side for side, _ in relaxed.assign(700, 700)] == [512, 768, 1024]


def test_demo_buckets() -> None:
    buckets = make_buckets(192, step=64)
    assert nearest_bucket(500, 500, buckets) == Bucket(192, 192)
    assert nearest_bucket(1000, 500, buckets) == Bucket(256, 128)
    assert nearest_bucket(500, 1000, buckets) == Bucket(128, 256)
    assert nearest_bucket(288, 192, buckets) == Bucket(256, 128)  # 3:2 is nearer 2:1 than 1:1 in log space
    assert buckets == (Bucket(128, 256), Bucket(192, 192), Bucket(256, 128))


def test_spec_from_config_defaults_to_resolution() -> None:
    assert BucketSpec.from_config(DataConfig(resolution=512)).sides == (512,)
    assert BucketSpec.from_config(DataConfig(resolutions=(1024, 512, 768))).sides == (512, 768, 1024)


def test_center_crop_is_centred_and_covers_the_bucket() -> None:
    left, top, right, bottom = crop_box(300, 200, Bucket(128, 128))
    assert (right - left, bottom - top) == pytest.approx((200, 200))
    assert (left, top) == pytest.approx((50, 0))


def test_random_crop_is_inside_and_deterministic() -> None:
    boxes = [crop_box(300, 200, Bucket(128, 128), random=True, rng=np.random.default_rng(s)) for s in range(50)]
    for left, top, right, bottom in boxes:
        assert 0 <= left and right <= 300 + 1e-9 and top == pytest.approx(0) and bottom == pytest.approx(200)
    assert len({b[0] for b in boxes}) > 40
    again = crop_box(300, 200, Bucket(128, 128), random=True, rng=np.random.default_rng(7))
    assert again == boxes[7]


def test_render_resizes_into_the_bucket_and_flips() -> None:
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[:, :150] = 255  # left half white
    image = Image.fromarray(pixels)
    bucket = Bucket(192, 128)
    out = render(image, bucket, crop_box(300, 200, bucket))
    assert out.shape == (128, 192, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out[:, 10].mean() == pytest.approx(1.0) and out[:, -10].mean() == pytest.approx(-1.0)
    flipped = render(image, bucket, crop_box(300, 200, bucket), flip=True)
    np.testing.assert_array_equal(flipped, out[:, ::-1])


def test_bucket_table_is_small_enough_to_compile_once_each() -> None:
    spec = BucketSpec(sides=(512, 768, 1024), max_aspect=2.0)
    assert len(spec.all_buckets) <= 40
    assert max(b.aspect for b in spec.all_buckets) == 2.0
