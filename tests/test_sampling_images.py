"""flux_jax.sampling.images: PNGs with their settings as text chunks, atomic writes (local and gs://), grids,
side-by-side pictures with titles, loss curves drawn with PIL."""

from __future__ import annotations

import io
import json
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from flux_jax.sampling.images import (
    LINE_COLOR,
    grid,
    loss_curve,
    nice_ticks,
    png_bytes,
    read_png_text,
    side_by_side,
    write_png,
)
from tests.helpers.gcs_server import fake_gcs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_image(h: int = 48, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def solid(color: tuple[int, int, int], h: int = 8, w: int = 12) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, np.uint8), (h, w, 3)).copy()


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, payload) chunks of a PNG, checked against their CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload)
        out.append((kind, payload))
        pos += 12 + length
    return out


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


# ---------------------------------------------------------------------------------------------------- PNG bytes


def test_png_keeps_pixels_and_text_latin1_as_text_other_as_itxt():
    image = random_image()
    text = {"prompt": "a café at night", "seed": "42", "negative": "猫, ぼやけた", "loras": '[{"scale": 0.5}]'}
    data = png_bytes(image, text)
    np.testing.assert_array_equal(decode(data), image)
    kinds = {payload.split(b"\0", 1)[0].decode("latin-1"): kind for kind, payload in chunks(data)
             if kind in (b"tEXt", b"iTXt")}  # fmt: skip
    assert kinds == {"prompt": b"tEXt", "seed": b"tEXt", "negative": b"iTXt", "loras": b"tEXt"}
    tEXt = dict(p.split(b"\0", 1) for k, p in chunks(data) if k == b"tEXt")
    assert tEXt[b"prompt"] == "a café at night".encode("latin-1")  # Latin-1 as the PNG spec defines tEXt
    with Image.open(io.BytesIO(data)) as im:
        assert im.text == text


def test_png_bytes_are_deterministic():
    image = random_image(seed=3)
    assert png_bytes(image, {"a": "1"}) == png_bytes(image.copy(), {"a": "1"})
    assert png_bytes(image, {"a": "1"}) != png_bytes(image, {"a": "2"})


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), "must be uint8, got float32"),
        (np.zeros((4, 4), np.uint8), r"must be \[H, W, 3\] with H, W > 0, got shape \[4, 4\]"),
        (np.zeros((4, 4, 4), np.uint8), r"got shape \[4, 4, 4\]"),
        (np.zeros((0, 4, 3), np.uint8), r"got shape \[0, 4, 3\]"),
        ([[[0, 0, 0]]], "must be a numpy array, got list"),
    ],
)
def test_bad_images_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        png_bytes(image)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ({"": "x"}, "1-79 characters"),
        ({"k" * 80: "x"}, "1-79 characters"),
        ({" seed": "x"}, "surrounding spaces"),
        ({"種": "x"}, "must be Latin-1"),
        ({"seed": 42}, "must be a str, got int"),
        ({"seed": "4\x002"}, "contains a NUL"),
    ],
)
def test_bad_text_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        png_bytes(random_image(), text)


# ---------------------------------------------------------------------------------------------------- files


def siblings(path: pathlib.Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_write_png_and_read_png_text(tmp_path):
    path = tmp_path / "deep" / "er" / "000_seed42.png"  # parents are created
    image = random_image(seed=1)
    text = {"prompt": "über 猫", "seed": "42"}
    write_png(path, image, text)
    assert siblings(path) == ["000_seed42.png"]  # no temporary left behind
    assert read_png_text(path) == text
    assert read_png_text(str(path)) == text
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)


def test_write_png_replaces_a_file_only_when_complete(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    write_png(path, random_image(seed=1), {"v": "old"})
    old = path.read_bytes()
    with pytest.raises(ValueError, match="must be uint8"):  # refused before anything is written
        write_png(path, np.zeros((4, 4, 3), np.int64))
    assert path.read_bytes() == old and siblings(path) == ["a.png"]

    real = pathlib.Path.write_bytes

    def dies_half_way(self, data):
        real(self, data[: len(data) // 2])
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(pathlib.Path, "write_bytes", dies_half_way)
    with pytest.raises(OSError, match="simulated crash"):
        write_png(path, random_image(seed=2), {"v": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == old and siblings(path) == ["a.png"]  # the old file, whole; the temp removed
    write_png(path, random_image(seed=2), {"v": "new"})
    assert read_png_text(path) == {"v": "new"}


def test_read_png_text_of_a_file_without_text_and_of_a_jpeg(tmp_path):
    write_png(tmp_path / "plain.png", random_image())
    assert read_png_text(tmp_path / "plain.png") == {}
    Image.fromarray(random_image()).save(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match=r"x\.jpg: not a PNG file \(JPEG\)"):
        read_png_text(tmp_path / "x.jpg")


# Run with the fake GCS server's environment (the gs:// backend reads it when it starts).
GS_CHILD = """
import io, json, sys
import numpy as np
from etils import epath
from PIL import Image
from flux_jax.sampling.images import read_png_text, write_png

url = sys.argv[1]
image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
write_png(url + "/samples/10/000.png", image, {"prompt": "猫", "seed": "7"})
data = (epath.Path(url) / "samples/10/000.png").read_bytes()
pixels = np.asarray(Image.open(io.BytesIO(data)))
files = sorted(str(p.relative_to(epath.Path(url))) for p in (epath.Path(url) / "samples/10").iterdir())
print(json.dumps({"text": read_png_text(url + "/samples/10/000.png"), "same": bool((pixels == image).all()),
                  "files": files}))
"""


def test_write_png_to_a_bucket(tmp_path):
    """gs:// goes through the real gcsfs backend, against the in-memory GCS server of tests/helpers/fake_gcs.py."""
    bucket = "flux-jax-images"
    with fake_gcs(bucket) as url:
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "JAX_PLATFORMS": "cpu",
            "EPATH_USE_TF": "false",
            "STORAGE_EMULATOR_HOST": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GOOGLE_CLOUD_PROJECT": "test",
        }
        done = subprocess.run(
            [sys.executable, "-c", GS_CHILD, f"gs://{bucket}/run"], env=env, cwd=ROOT, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"text": {"prompt": "猫", "seed": "7"}, "same": True, "files": ["samples/10/000.png"]}


# ---------------------------------------------------------------------------------------------------- grid


def test_grid_is_row_major_with_black_padding():
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    tiles = [solid(c) for c in colors]  # 8 x 12
    out = grid(tiles, columns=3, pad=2)
    assert out.dtype == np.uint8 and out.shape == (2 * 8 + 2, 3 * 12 + 2 * 2, 3)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(out[r * 10 : r * 10 + 8, c * 14 : c * 14 + 12], tile)
    # Between tiles and the empty last cell: black.
    assert not out[8:10].any() and not out[:, 12:14].any() and not out[:, 26:28].any()
    assert not out[10:, 28:].any()


def test_grid_of_fewer_images_than_columns_and_without_padding():
    a, b = random_image(8, 6, seed=1), random_image(8, 6, seed=2)
    np.testing.assert_array_equal(grid([a, b], columns=5, pad=0), np.concatenate([a, b], axis=1))
    np.testing.assert_array_equal(grid([a], columns=1), a)
    np.testing.assert_array_equal(grid([a, b], columns=1, pad=0), np.concatenate([a, b], axis=0))


def test_grid_refuses_bad_input():
    with pytest.raises(ValueError, match="at least one image"):
        grid([], columns=2)
    with pytest.raises(ValueError, match=r"one size \(H x W\), got 8x12, 8x13"):
        grid([solid((1, 2, 3)), solid((1, 2, 3), w=13)], columns=2)
    with pytest.raises(ValueError, match="grid image 1 must be uint8"):
        grid([solid((1, 2, 3)), solid((1, 2, 3)).astype(np.float32)], columns=2)
    with pytest.raises(ValueError, match="columns must be a positive int, got 0"):
        grid([solid((1, 2, 3))], columns=0)
    with pytest.raises(ValueError, match="pad must be a non-negative int, got -1"):
        grid([solid((1, 2, 3))], columns=1, pad=-1)


# ---------------------------------------------------------------------------------------------------- side by side


def find(haystack: np.ndarray, needle: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``needle`` occurs exactly in ``haystack``."""
    h, w = needle.shape[:2]
    hits = []
    for y in range(haystack.shape[0] - h + 1):
        for x in range(haystack.shape[1] - w + 1):
            if np.array_equal(haystack[y : y + h, x : x + w], needle):
                hits.append((y, x))
    return hits


def ink(region: np.ndarray) -> np.ndarray:
    """Where the dark title text is."""
    return (region.astype(int).sum(-1) < 3 * 128).nonzero()


def test_side_by_side_places_columns_under_their_titles():
    rows = [[random_image(32, 24, seed=s), random_image(32, 24, seed=s + 10)] for s in range(3)]
    titles = ["base", "base + LoRA"]
    pad = 10  # wider than a space between words: the widest gap in the title ink separates the two titles
    out = side_by_side(rows, titles, pad=pad)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    spots = [[find(out, im) for im in row] for row in rows]
    assert all(len(s) == 1 for row in spots for s in row)  # each image exactly once
    (y00, x00), (y01, x01) = spots[0][0][0], spots[0][1][0]
    assert y00 == y01 > pad and x01 >= x00 + 24 + pad  # one row, two columns, a title band above
    for r in range(3):  # rows stacked down, columns aligned
        assert spots[r][0][0] == (y00 + r * (32 + pad), x00) and spots[r][1][0] == (y00 + r * (32 + pad), x01)
    ys, xs = ink(out[:y00])
    assert len(xs) > 0 and ys.min() >= pad and ys.max() < y00  # titles drawn in the band above the images
    columns = np.unique(xs)
    cut = columns[np.argmax(np.diff(columns))]
    left_ink, right_ink = columns[columns <= cut], columns[columns > cut]
    assert left_ink.max() < x01 and right_ink.min() > x00 + 12
    # Each title centred over its image; "base + LoRA" is wider than its 24 px image (the column widens for it).
    assert abs((left_ink.min() + left_ink.max()) / 2 - (x00 + 12)) <= 1.5
    assert abs((right_ink.min() + right_ink.max()) / 2 - (x01 + 12)) <= 1.5
    assert right_ink.max() - right_ink.min() > 24
    assert (out[:pad] == 255).all() and (out[-pad:] == 255).all()  # white margin


def test_side_by_side_font_size_scales_titles():
    rows = [[random_image(32, 24)]]
    small, large = side_by_side(rows, ["base"], font_size=11), side_by_side(rows, ["base"], font_size=30)
    assert large.shape[0] > small.shape[0] and large.shape[1] > small.shape[1]


def test_side_by_side_refuses_bad_input():
    a = random_image(8, 8)
    with pytest.raises(ValueError, match="row 1 has 1 images for 2 titles"):
        side_by_side([[a, a], [a]], ["x", "y"])
    with pytest.raises(ValueError, match="at least one title"):
        side_by_side([[a]], [])
    with pytest.raises(ValueError, match="at least one row"):
        side_by_side([], ["x"])
    with pytest.raises(ValueError, match="one size"):
        side_by_side([[a, random_image(8, 9)]], ["x", "y"])
    with pytest.raises(ValueError, match=r"side_by_side image 0 must be \[H, W, 3\]"):
        side_by_side([[a[..., 0]]], ["x"])


# ---------------------------------------------------------------------------------------------------- loss curve


def line_pixels(plot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (plot == np.asarray(LINE_COLOR, np.uint8)).all(-1).nonzero()


def test_loss_curve_draws_the_losses_against_the_steps():
    steps = list(range(0, 101, 5))
    losses = [1.0 - 0.8 * s / 100 for s in steps]  # straight down from 1.0 to 0.2
    plot = loss_curve(steps, losses, width=400, height=300)
    assert plot.shape == (300, 400, 3) and plot.dtype == np.uint8
    ys, xs = line_pixels(plot)
    assert len(xs) > 300
    # A straight line: the curve's height falls linearly with x, from the upper left to the lower right.
    slope, intercept = np.polyfit(xs, ys, 1)
    assert slope > 0.3
    residual = ys - (slope * xs + intercept)
    assert np.abs(residual).max() <= 3
    # The axes: a dark vertical line left of the curve and a dark horizontal line below it.
    dark = plot.astype(int).sum(-1) < 3 * 100
    left, bottom = xs.min(), ys.max()
    axis_col = next(x for x in range(left, -1, -1) if dark[ys.min() : bottom, x].mean() > 0.9)
    axis_row = next(y for y in range(bottom, 300) if dark[y, left : xs.max()].mean() > 0.9)
    assert left - axis_col <= 3 and axis_row - bottom <= 20
    # Tick labels and axis names: ink left of the y axis and below the x axis.
    assert dark[:, :axis_col].sum() > 50 and dark[axis_row + 2 :, :].sum() > 50


def test_loss_curve_with_nan_losses_one_point_and_unsorted_steps():
    full = loss_curve([0, 1, 2, 3], [1.0, 0.5, float("nan"), 0.25])
    assert line_pixels(full)[0].size > 0
    one = loss_curve([7], [0.3])
    assert 0 < line_pixels(one)[0].size < 100  # a dot
    np.testing.assert_array_equal(loss_curve([2, 0, 1], [0.1, 0.3, 0.2]), loss_curve([0, 1, 2], [0.3, 0.2, 0.1]))
    flat = loss_curve([0, 10], [0.5, 0.5])
    ys, _ = line_pixels(flat)
    assert ys.max() - ys.min() <= 2  # a constant loss is a horizontal line


def test_loss_curve_refuses_bad_input():
    with pytest.raises(ValueError, match="3 steps for 2 losses"):
        loss_curve([0, 1, 2], [1.0, 0.5])
    with pytest.raises(ValueError, match="at least one finite loss"):
        loss_curve([0, 1], [float("nan"), float("inf")])
    with pytest.raises(ValueError, match="at least one finite loss"):
        loss_curve([], [])
    with pytest.raises(ValueError, match="at least 160 x 120 pixels"):
        loss_curve([0, 1], [1.0, 0.5], width=100)


def test_nice_ticks():
    assert nice_ticks(0, 195, integer=True) == [0, 50, 100, 150]
    assert nice_ticks(2, 4, integer=True) == [2, 3, 4]  # steps are integers: never 2.5
    assert nice_ticks(0.1, 0.62) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert nice_ticks(-3, 7) == [-2, 0, 2, 4, 6]
    assert nice_ticks(5, 5) == [5]
    with pytest.raises(ValueError):
        nice_ticks(1, 0)
