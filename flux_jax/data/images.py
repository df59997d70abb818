"""Robust image and caption decoding, and the report of every input that was converted or refused.

A LoRA dataset scraped together by hand contains every kind of broken file. Each case here is either
*converted* (the example is used; the conversion is counted) or *refused* (the example is skipped; the reason is
counted), and the file names go into a `DataReport`. With `strict`, any entry in the report is an error instead.

Refused: zero-byte files, files that are not images, truncated or corrupt image data, decompression bombs (the
pixel count is checked from the header, before a single pixel is decoded), images smaller than every bucket,
missing / empty / non-UTF-8 captions (missing and empty ones can instead be used with the empty caption).
Converted: grayscale (incl. 1-bit), CMYK (through the embedded ICC profile when there is one), transparency
(composited over white: the colour under a fully transparent pixel is arbitrary, often black or garbage),
palette images, and 16-bit images (scaled by 255/65535; Pillow's own ``convert("L")`` clips them instead).
EXIF orientation is always applied; that is correct decoding, not a conversion.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from flux_jax.errors import DataError, FluxJaxError

# Reasons an example is skipped.
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
UNREADABLE = "unreadable"
IMAGE_MISSING = "image_missing"
CAPTION_MISSING = "caption_missing"
CAPTION_EMPTY = "caption_empty"
CAPTION_NOT_UTF8 = "caption_not_utf8"
BAD_METADATA = "bad_metadata"

# Conversions applied to an example that is used.
GRAYSCALE = "grayscale"
CMYK = "cmyk"
ALPHA = "alpha"
PALETTE = "palette"
SIXTEEN_BIT = "16bit"
OTHER_MODE = "color_space"
EMPTY_CAPTION_USED = "empty_caption_used"

_WHITE = (255, 255, 255, 255)
# Errors Pillow raises for damaged data, depending on the format plugin and where the damage is.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


class BadExample(FluxJaxError):
    """One example cannot be used; ``reason`` is one of the skip reasons above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class DataReport:
    """Counts and file names per reason, for skipped and for converted examples."""

    total: int = 0
    used: int = 0
    skipped: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    converted: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, name: str, detail: str = "") -> None:
        self.skipped.setdefault(reason, []).append((name, detail))

    def convert(self, reason: str, name: str) -> None:
        self.converted.setdefault(reason, []).append(name)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def has_problems(self) -> bool:
        return bool(self.skipped or self.converted)

    def summary(self, max_names: int = 5) -> str:
        lines = [f"{self.total} inputs: {self.used} used, {self.num_skipped} skipped"]
        for title, table in (("skipped", self.skipped), ("converted", self.converted)):
            for reason in sorted(table):
                items = table[reason]
                names = [item if isinstance(item, str) else _named(*item) for item in items[:max_names]]
                more = f", ... ({len(items) - max_names} more)" if len(items) > max_names else ""
                lines.append(f"  {title} {reason}: {len(items)} ({', '.join(names)}{more})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "used": self.used,
            "skipped": {r: [{"file": n, "detail": d} for n, d in v] for r, v in sorted(self.skipped.items())},
            "converted": {r: list(v) for r, v in sorted(self.converted.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataReport:
        return cls(
            total=int(d["total"]),
            used=int(d["used"]),
            skipped={r: [(e["file"], e["detail"]) for e in v] for r, v in d["skipped"].items()},
            converted={r: list(v) for r, v in d["converted"].items()},
        )

    def raise_if_strict(self, source: str) -> None:
        if self.has_problems:
            raise DataError(f"{source}: bad or non-RGB inputs under strict mode:\n{self.summary(max_names=20)}")


def _named(name: str, detail: str) -> str:
    return f"{name} [{detail}]" if detail else name


# --------------------------------------------------------------------------------------------------
# Images


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    """8-bit RGB, EXIF orientation applied."""
    conversions: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def decode_image(data: bytes | np.ndarray, *, max_pixels: int) -> DecodedImage:
    """Encoded image bytes (or a decoded uint8/uint16 array, as some TFDS datasets hold) -> 8-bit RGB.

    Raises `BadExample` for anything that cannot be used. Never reads more than the header of an image whose
    pixel count exceeds ``max_pixels``.
    """
    if isinstance(data, np.ndarray):
        return _from_array(data, max_pixels)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process told Pillow to pad truncated files with grey; that would hide them.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; flux_jax needs truncated images to fail")
    if len(data) == 0:
        raise BadExample(EMPTY_FILE, "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadExample(DECOMPRESSION_BOMB, str(e)) from None
    except UnidentifiedImageError:
        raise BadExample(NOT_AN_IMAGE, f"no image format recognised ({len(data)} bytes)") from None
    except _DECODE_ERRORS as e:
        raise BadExample(TRUNCATED if "runcat" in str(e) else NOT_AN_IMAGE, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadExample(NOT_AN_IMAGE, f"{img.format} header says {w}x{h}")
    if w * h > max_pixels:
        raise BadExample(DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > max_image_pixels {max_pixels}")
    sixteen_bit = _is_16bit(img)
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise BadExample(DECOMPRESSION_BOMB, str(e)) from None
    except _DECODE_ERRORS as e:
        raise BadExample(TRUNCATED, f"corrupt or truncated {img.format} data: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS:
        pass  # a malformed EXIF block: keep the stored orientation rather than drop the image
    conversions: list[str] = [SIXTEEN_BIT] if sixteen_bit else []
    return DecodedImage(_to_rgb(img, conversions), tuple(dict.fromkeys(conversions)))


def _is_16bit(img: Image.Image) -> bool:
    """16 bits per sample, read from the decoder's raw mode before loading (Pillow hides it afterwards for
    RGB, which it reduces to 8 bits by keeping the high byte: a correct scaling)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return True
    return any(";16" in str(tile.args) for tile in getattr(img, "tile", ()) or ())


def _composite(img: Image.Image, conversions: list[str]) -> Image.Image:
    rgba = img.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] == 255:
        return rgba.convert("RGB")  # fully opaque: nothing to composite, nothing to report
    conversions.append(ALPHA)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _to_rgb(img: Image.Image, conversions: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "RGBa"):
        return _composite(img, conversions)
    if mode in ("1", "L"):
        conversions.append(GRAYSCALE)
        return img.convert("L").convert("RGB")
    if mode in ("LA", "La"):
        conversions.append(GRAYSCALE)
        return _composite(img, conversions)
    if mode in ("P", "PA"):
        conversions.append(PALETTE)
        if mode == "PA" or "transparency" in img.info:
            return _composite(img, conversions)
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        conversions.append(GRAYSCALE)
        values = np.asarray(img, dtype=np.float64)
        if mode == "F":
            # Float images are conventionally in [0, 1]; anything larger is taken as 8-bit-scaled.
            values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        else:
            conversions.append(SIXTEEN_BIT)
            values = values * (255.0 / 65535.0)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "CMYK":
        conversions.append(CMYK)
        return _cmyk_to_rgb(img)
    conversions.append(OTHER_MODE)  # YCbCr, LAB, HSV: Pillow converts these exactly
    return img.convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """Through the embedded ICC profile when there is one (print CMYK is device-dependent), else Pillow's
    profile-free formula R = (255 - C) * (255 - K) / 255."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: fall back to the formula below
    return img.convert("RGB")


def _from_array(array: np.ndarray, max_pixels: int) -> DecodedImage:
    """A decoded [H, W] or [H, W, C] array (C in 1, 3, 4), uint8 or uint16."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise BadExample(NOT_AN_IMAGE, f"array of shape {a.shape} is not an image")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise BadExample(DECOMPRESSION_BOMB, f"{a.shape[1]}x{a.shape[0]} pixels > max_image_pixels {max_pixels}")
    conversions: list[str] = []
    if a.dtype == np.uint16:
        conversions.append(SIXTEEN_BIT)
        a = np.clip(np.rint(a.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise BadExample(NOT_AN_IMAGE, f"array dtype {a.dtype} is not uint8 or uint16")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1] if a.ndim == 3 else 2]
    img = _to_rgb(Image.fromarray(a, mode=mode), conversions)
    return DecodedImage(img, tuple(dict.fromkeys(conversions)))


# --------------------------------------------------------------------------------------------------
# Captions


def decode_caption(raw: bytes | str | None) -> str:
    """Caption file bytes (or an already-decoded string; None when there is no caption) -> the caption text.

    UTF-8 with an optional byte-order mark; surrounding whitespace is stripped. Raises `BadExample` for a
    missing, empty or non-UTF-8 caption (with the offset of the first bad byte).
    """
    if raw is None:
        raise BadExample(CAPTION_MISSING, "no caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadExample(CAPTION_NOT_UTF8, f"invalid UTF-8 byte {raw[e.start]:#04x} at offset {e.start}") from None
    elif any("\udc80" <= c <= "\udcff" for c in raw):
        # Metadata files are decoded with surrogateescape, so their undecodable bytes arrive as lone surrogates.
        raise BadExample(CAPTION_NOT_UTF8, "invalid UTF-8 bytes in the metadata caption")
    text = raw.strip()
    if not text:
        raise BadExample(CAPTION_EMPTY, "caption is empty")
    return text
