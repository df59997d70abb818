"""Bad data: one test per case of the data issue, each converted correctly or refused with its reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_jax.data import images as im
from flux_jax.data.buckets import BucketSpec
from flux_jax.data.cache import scan
from flux_jax.data.sources import FolderSource
from flux_jax.run_config import DataConfig

BIG = 10**9  # max_pixels that no test image reaches


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png(width: int, height: int, raw: bytes, *, bit_depth: int, color_type: int) -> bytes:
    """A hand-written PNG, for what Pillow cannot write (16-bit RGB) or must never decode (bomb headers)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rows16(array: np.ndarray) -> bytes:
    """PNG scanlines (filter byte 0) of a big-endian 16-bit array [H, W] or [H, W, C]."""
    return b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)


def photo(w: int = 32, h: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def refused(data: bytes, reason: str, max_pixels: int = BIG) -> im.BadExample:
    with pytest.raises(im.BadExample) as info:
        im.decode_image(data, max_pixels=max_pixels)
    assert info.value.reason == reason, info.value
    return info.value


# --------------------------------------------------------------------------------------------------
# Refused


def test_zero_byte_file_is_refused() -> None:
    refused(b"", im.EMPTY_FILE)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused(fmt: str) -> None:
    data = encode(Image.fromarray(photo(64, 64)), fmt)
    err = refused(data[: len(data) // 2], im.TRUNCATED)
    assert fmt in err.detail or "truncated" in err.detail


def test_non_image_file_is_refused() -> None:
    refused(b"<html><body>404 not found</body></html>", im.NOT_AN_IMAGE)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # 12000 x 12000 RGB claimed by a ~100-byte file whose pixel data is garbage: decoding it would fail as
    # truncated, so the reason proves it was refused from the header alone, before any decoding.
    header_only = png(12000, 12000, b"\x00" * 10, bit_depth=8, color_type=2)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow's own warning threshold is 89.5M pixels
        err = refused(header_only, im.DECOMPRESSION_BOMB, max_pixels=100_000_000)
    assert "144000000 pixels" in err.detail
    # Past twice Pillow's limit Pillow itself refuses at open; still reported as a bomb, not a crash.
    refused(png(100_000, 100_000, b"\x00", bit_depth=8, color_type=2), im.DECOMPRESSION_BOMB)
    # The limit is the configured one.
    refused(encode(Image.fromarray(photo(100, 100))), im.DECOMPRESSION_BOMB, max_pixels=9_999)


def test_image_smaller_than_every_bucket_is_refused() -> None:
    spec = BucketSpec(sides=(512, 1024), step=64, max_upscale=1.0)
    with pytest.raises(im.BadExample) as info:
        spec.assign(300, 200)
    assert info.value.reason == im.TOO_SMALL and "300x200" in info.value.detail
    # Allowing enough upscaling accepts it.
    assert BucketSpec(sides=(512,), max_upscale=3.0).assign(300, 200)


def test_missing_caption_is_refused() -> None:
    with pytest.raises(im.BadExample) as info:
        im.decode_caption(None)
    assert info.value.reason == im.CAPTION_MISSING


@pytest.mark.parametrize("raw", [b"", b"   \n\t ", "  "])
def test_empty_caption_is_refused(raw: bytes | str) -> None:
    with pytest.raises(im.BadExample) as info:
        im.decode_caption(raw)
    assert info.value.reason == im.CAPTION_EMPTY


def test_non_utf8_caption_is_refused() -> None:
    with pytest.raises(im.BadExample) as info:
        im.decode_caption("caf\u00e9 au lait".encode("latin-1"))
    assert info.value.reason == im.CAPTION_NOT_UTF8 and "0xe9" in info.value.detail and "offset 3" in info.value.detail
    # Metadata files are decoded with surrogateescape; their bad bytes arrive as lone surrogates.
    with pytest.raises(im.BadExample) as info:
        im.decode_caption(b"caf\xe9".decode("utf-8", "surrogateescape"))
    assert info.value.reason == im.CAPTION_NOT_UTF8


def test_good_caption_keeps_unicode_and_drops_bom_and_padding() -> None:
    assert im.decode_caption("\ufeff  caf\u00e9 \u2615 \n".encode()) == "caf\u00e9 \u2615"


# --------------------------------------------------------------------------------------------------
# Converted


def decoded(data: bytes) -> tuple[np.ndarray, tuple[str, ...]]:
    out = im.decode_image(data, max_pixels=BIG)
    assert out.image.mode == "RGB"
    return np.asarray(out.image), out.conversions


def test_rgb_image_is_used_unchanged() -> None:
    pixels = photo()
    got, conversions = decoded(encode(Image.fromarray(pixels)))
    np.testing.assert_array_equal(got, pixels)
    assert conversions == ()


def test_grayscale_is_converted_by_replicating_the_channel() -> None:
    gray = photo()[..., 0]
    got, conversions = decoded(encode(Image.fromarray(gray, "L")))
    np.testing.assert_array_equal(got, np.repeat(gray[..., None], 3, axis=-1))
    assert conversions == (im.GRAYSCALE,)
    bilevel = Image.fromarray(gray > 127).convert("1")
    got, conversions = decoded(encode(bilevel))
    assert set(np.unique(got)) <= {0, 255} and conversions == (im.GRAYSCALE,)


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_is_converted_to_rgb(fmt: str) -> None:
    # Pure cyan -> (0, 255, 255); 50% black -> mid grey; white -> white.
    cmyk = np.zeros((16, 48, 4), np.uint8)
    cmyk[:, :16] = (255, 0, 0, 0)
    cmyk[:, 16:32] = (0, 0, 0, 128)
    data = encode(Image.fromarray(cmyk, "CMYK"), fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    got, conversions = decoded(data)
    tol = 0 if fmt == "TIFF" else 3  # JPEG is lossy
    np.testing.assert_allclose(got[8, 8], (0, 255, 255), atol=tol)
    np.testing.assert_allclose(got[8, 24], (127, 127, 127), atol=tol)
    np.testing.assert_allclose(got[8, 40], (255, 255, 255), atol=tol)
    assert conversions == (im.CMYK,)


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)  # fully transparent, garbage colour underneath
    rgba[:, 1] = (255, 0, 0, 128)  # half-transparent red
    rgba[:, 2] = (10, 20, 30, 255)  # opaque
    got, conversions = decoded(encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(got[0, 0], (255, 255, 255))
    np.testing.assert_allclose(got[0, 1], (255, 127, 127), atol=1)
    np.testing.assert_array_equal(got[0, 2], (10, 20, 30))
    assert conversions == (im.ALPHA,)
    # A fully opaque alpha channel changes nothing and is not reported.
    rgba[..., 3] = 255
    got, conversions = decoded(encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(got, rgba[..., :3])
    assert conversions == ()


def test_palette_image_is_converted_to_its_colours() -> None:
    pixels = np.array([[0, 1], [2, 1]], np.uint8)
    pal = Image.fromarray(pixels, "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    got, conversions = decoded(encode(pal))
    np.testing.assert_array_equal(got, [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (0, 255, 0)]])
    assert conversions == (im.PALETTE,)
    pal.info["transparency"] = 0  # index 0 (red) transparent -> white
    got, conversions = decoded(encode(pal, transparency=0))
    np.testing.assert_array_equal(got[0, 0], (255, 255, 255))
    assert conversions == (im.PALETTE, im.ALPHA)


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], np.uint16)  # -> 0, 1, 128, 255 (Pillow's convert("L") gives 255s)
    got, conversions = decoded(png(4, 1, rows16(values), bit_depth=16, color_type=0))
    np.testing.assert_array_equal(got[0, :, 0], [0, 1, 128, 255])
    assert im.SIXTEEN_BIT in conversions and im.GRAYSCALE in conversions


def test_16bit_rgb_is_reduced_to_8_bits() -> None:
    values = np.array([[[0, 32896, 65535], [257, 514, 771]]], np.uint16)
    got, conversions = decoded(png(2, 1, rows16(values), bit_depth=16, color_type=2))
    np.testing.assert_array_equal(got[0], [[0, 128, 255], [1, 2, 3]])
    assert conversions == (im.SIXTEEN_BIT,)


def test_exif_orientation_is_applied() -> None:
    pixels = photo(w=6, h=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    got, conversions = decoded(encode(Image.fromarray(pixels), exif=exif.tobytes()))
    assert got.shape == (6, 4, 3)
    np.testing.assert_array_equal(got, np.rot90(pixels, k=-1))
    assert conversions == ()


def test_decoded_arrays_from_tfds_are_handled() -> None:
    gray16 = np.full((8, 8), 65535, np.uint16)
    out = im.decode_image(gray16, max_pixels=BIG)
    assert np.asarray(out.image).min() == 255 and im.SIXTEEN_BIT in out.conversions
    with pytest.raises(im.BadExample) as info:
        im.decode_image(np.zeros((8, 8, 2), np.uint8), max_pixels=BIG)
    assert info.value.reason == im.NOT_AN_IMAGE


# --------------------------------------------------------------------------------------------------
# The whole report


def write_bad_folder(root: Path) -> dict[str, str]:
    """A folder with every case; returns file -> expected reason (None for a clean image)."""
    root.mkdir(parents=True, exist_ok=True)
    big = Image.fromarray(photo(96, 64))

    def put(name: str, data: bytes, caption: bytes | None = b"a photo") -> None:
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)

    put("good.png", encode(big))
    put("empty.jpg", b"")
    put("truncated.jpg", encode(big, "JPEG")[:300])
    put("notes.jpg", b"just some text, saved with the wrong extension")
    put("gray.png", encode(big.convert("L")))
    put("cmyk.jpg", encode(big.convert("CMYK"), "JPEG"))
    put("alpha.png", encode(Image.fromarray(np.dstack([photo(96, 64), np.full((64, 96), 7, np.uint8)]), "RGBA")))
    put("palette.png", encode(big.convert("P")))
    put("deep.png", png(96, 64, rows16(np.full((64, 96), 40000, np.uint16)), bit_depth=16, color_type=0))
    put("tiny.png", encode(Image.fromarray(photo(40, 30))))
    put("bomb.png", png(20000, 20000, b"\x00", bit_depth=8, color_type=2))
    put("nocaption.png", encode(big), caption=None)
    put("blank.png", encode(big), caption=b"  \n")
    put("latin1.png", encode(big), caption="\u00e9t\u00e9".encode("latin-1"))
    return {
        "empty.jpg": im.EMPTY_FILE,
        "truncated.jpg": im.TRUNCATED,
        "notes.jpg": im.NOT_AN_IMAGE,
        "tiny.png": im.TOO_SMALL,
        "bomb.png": im.DECOMPRESSION_BOMB,
        "nocaption.png": im.CAPTION_MISSING,
        "blank.png": im.CAPTION_EMPTY,
        "latin1.png": im.CAPTION_NOT_UTF8,
    }


def test_scan_reports_every_case_with_file_names(tmp_path: Path) -> None:
    expected = write_bad_folder(tmp_path / "photos")
    data = DataConfig(path=str(tmp_path / "photos"), resolution=64, max_image_pixels=50_000_000)
    items, report = scan(FolderSource(data.path), data, BucketSpec.from_config(data))
    skipped = {name: reason for reason, entries in report.skipped.items() for name, _ in entries}
    assert skipped == expected
    assert report.converted == {
        im.GRAYSCALE: ["deep.png", "gray.png"],
        im.CMYK: ["cmyk.jpg"],
        im.ALPHA: ["alpha.png"],
        im.PALETTE: ["palette.png"],
        im.SIXTEEN_BIT: ["deep.png"],
    }
    used = {"good.png", "gray.png", "cmyk.jpg", "alpha.png", "palette.png", "deep.png"}
    assert report.total == 14 and report.used == len(used) and report.num_skipped == len(expected)
    assert {it.key for it in items} == used
    text = report.summary()
    assert "skipped truncated: 1 (truncated.jpg" in text and "converted cmyk: 1 (cmyk.jpg)" in text
    with pytest.raises(im.DataError, match="strict"):
        report.raise_if_strict("photos")
    assert im.DataReport.from_dict(report.to_dict()) == report


def test_missing_and_empty_captions_can_be_trained_empty(tmp_path: Path) -> None:
    write_bad_folder(tmp_path / "photos")
    data = DataConfig(path=str(tmp_path / "photos"), resolution=64, missing_caption="empty")
    items, report = scan(FolderSource(data.path), data, BucketSpec.from_config(data))
    captions = {it.key: it.caption for it in items}
    assert captions["nocaption.png"] == "" and captions["blank.png"] == ""
    assert report.converted[im.EMPTY_CAPTION_USED] == ["blank.png", "nocaption.png"]
    assert "latin1.png" not in captions  # non-UTF-8 is never guessed at
