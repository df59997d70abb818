"""Pictures on disk: PNGs that carry their settings, grids, side-by-side comparisons and loss curves.

Everything here is numpy uint8 [H, W, 3] in, numpy or PNG bytes out, drawn with PIL (no plotting library: the
pictures are simple and PIL is already a dependency). A PNG carries its settings as text chunks, readable by any
PNG tool (``exiftool``, PIL's ``Image.open(path).text``, browsers' image-info panels): Latin-1 text as tEXt, and
anything else (a prompt in Japanese, say) as UTF-8 iTXt, since tEXt is Latin-1 by definition. Encoding is
deterministic (PIL writes no timestamp), so the same pixels and text give the same bytes.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from flux_jax.atomic import atomic_file
from flux_jax.storage import is_remote, run_path

# side_by_side: titles on white; loss_curve: dark axes and text, one blue line.
_WHITE = (255, 255, 255)
_INK = (32, 32, 32)
_GRID_INK = (225, 225, 225)
LINE_COLOR = (31, 119, 180)
"""The loss curve's colour (tests find the curve by it)."""


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """``image`` if it is a uint8 [H, W, 3] array with H, W > 0; a ValueError saying what it is otherwise."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{what} must be [H, W, 3] with H, W > 0, got shape {list(image.shape)}")
    return image


def _check_key(key: str) -> None:
    # PNG keywords: 1-79 Latin-1 characters, no NUL (the separator) and no leading/trailing space.
    if not isinstance(key, str) or not 1 <= len(key) <= 79 or key != key.strip() or "\0" in key:
        raise ValueError(f"PNG text key {key!r} must be 1-79 characters without NUL or surrounding spaces")
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"PNG text key {key!r} must be Latin-1 (only values may be any Unicode)") from None


def png_bytes(image: np.ndarray, text: Mapping[str, str] = {}) -> bytes:  # noqa: B006 - read only
    """uint8 [H, W, 3] -> PNG bytes with ``text`` as PNG text chunks (tEXt, iTXt for non-Latin-1)."""
    check_image(image)
    info = PngInfo()
    for key, value in text.items():
        _check_key(key)
        if not isinstance(value, str):
            raise ValueError(f"PNG text {key!r} must be a str, got {type(value).__name__}")
        if "\0" in value:
            raise ValueError(f"PNG text {key!r} contains a NUL character")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, value)
        else:
            info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray, text: Mapping[str, str] = {}) -> None:  # noqa: B006
    """Atomically (temp file, then rename); ``path`` may be a gs:// URL."""
    data = png_bytes(image, text)  # encode first: a bad image or text must not create anything
    if is_remote(path):
        # An object upload is already all or nothing; a rename in a bucket would be a second full copy.
        target = run_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG (tEXt, zTXt and iTXt, as str); ``path`` may be a gs:// URL."""
    data = run_path(path).read_bytes() if is_remote(path) else pathlib.Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"{path}: not a PNG file ({im.format})")
        return {str(k): str(v) for k, v in im.text.items()}


def _same_size(images: Sequence[np.ndarray], what: str) -> tuple[int, int]:
    for i, image in enumerate(images):
        check_image(image, f"{what} {i}")
    sizes = sorted({im.shape[:2] for im in images})
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise ValueError(f"{what}s must all have one size (H x W), got {listed}")
    return sizes[0]


def grid(images: Sequence[np.ndarray], *, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 images of one size tiled row-major into ``columns`` columns with ``pad`` pixels of black between.

    Fewer images than ``columns`` give a single row of that many; the cells after the last image of the last row
    stay black. No border outside the tiles.
    """
    if len(images) == 0:
        raise ValueError("grid needs at least one image")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"grid columns must be a positive int, got {columns!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"grid pad must be a non-negative int, got {pad!r}")
    h, w = _same_size(images, "grid image")
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    out = np.zeros((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = image
    return out


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's default font at ``size`` px (its built-in bitmap font, of fixed size, where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except ImportError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, face) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    return right - left, bottom - top


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, face, anchor: str) -> None:
    """Draw ``text`` with its ink box's ``anchor`` point at ``xy``: horizontal l/m/r, vertical t/m/b (PIL's own
    anchors are for FreeType fonts only; this works with the bitmap fallback too)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    fx = {"l": 0.0, "m": 0.5, "r": 1.0}[anchor[0]]
    fy = {"t": 0.0, "m": 0.5, "b": 1.0}[anchor[1]]
    x = xy[0] - left - fx * (right - left)
    y = xy[1] - top - fy * (bottom - top)
    draw.text((round(x), round(y)), text, fill=_INK, font=face)


def side_by_side(
    rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], *, pad: int = 4, font_size: int | None = None
) -> np.ndarray:
    """One row per prompt, one column per title (e.g. "base", "base + LoRA"), titles drawn above the columns.

    Images of one size on white, ``pad`` pixels around and between them; a column is as wide as its image or its
    title, whichever is wider (a tiny model's 32 px images still get readable titles), the image centred in it.
    ``font_size`` defaults to 1/20 of the image height, at least 11 px.
    """
    if not titles:
        raise ValueError("side_by_side needs at least one title (one per column)")
    if len(rows) == 0:
        raise ValueError("side_by_side needs at least one row")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"side_by_side pad must be a non-negative int, got {pad!r}")
    for r, row in enumerate(rows):
        if len(row) != len(titles):
            raise ValueError(f"side_by_side row {r} has {len(row)} images for {len(titles)} titles")
    h, w = _same_size([im for row in rows for im in row], "side_by_side image")
    face = font(font_size or max(11, h // 20))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [_text_size(measure, str(t), face) for t in titles]
    # The title band fits the tallest glyphs of any text ("Ag"), so bands of different titles line up.
    band = max([_text_size(measure, "Ag", face)[1], *(s[1] for s in sizes)]) + pad
    widths = [max(w, tw) for tw, _ in sizes]
    lefts = [pad + sum(widths[:c]) + c * pad for c in range(len(titles))]
    canvas = Image.new("RGB", (lefts[-1] + widths[-1] + pad, pad + band + len(rows) * (h + pad)), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        tw = sizes[c][0]
        _text(draw, (lefts[c] + (widths[c] - tw) // 2, pad), str(title), face, "lt")
    for r, row in enumerate(rows):
        top = pad + band + r * (h + pad)
        for c, image in enumerate(row):
            canvas.paste(Image.fromarray(np.ascontiguousarray(image), "RGB"), (lefts[c] + (widths[c] - w) // 2, top))
    return np.asarray(canvas, dtype=np.uint8).copy()


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]; ``integer``: at
    least 1 apart (training steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"tick range must be finite with lo <= hi, got [{lo}, {hi}]")
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    if integer:
        step = max(step, 1.0)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    # round() strips float noise such as 0.30000000000000004 from the labels.
    return [round(k * step, 12) for k in range(first, last + 1)]


def _label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 3
    return f"{value:.{min(decimals, 6)}f}"


def loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    *,
    width: int = 640,
    height: int = 360,
    title: str = "training loss",
) -> np.ndarray:
    """uint8 [height, width, 3] plot of the loss against the step (axes, ticks and labels; drawn with PIL).

    A white canvas with the axes, about five round ticks per axis with their values and light grid lines, the
    axis names ("step", "loss"), ``title`` on top and the curve in `LINE_COLOR` (one point: a dot). Non-finite
    losses (a diverged step) are left out of the line; at least one must be finite.
    """
    steps_a = np.asarray(steps, dtype=np.float64).reshape(-1)
    losses_a = np.asarray(losses, dtype=np.float64).reshape(-1)
    if steps_a.size != losses_a.size:
        raise ValueError(f"loss_curve got {steps_a.size} steps for {losses_a.size} losses")
    if not np.isfinite(steps_a).all():
        raise ValueError("loss_curve steps must be finite")
    finite = np.isfinite(losses_a)
    if not finite.any():
        raise ValueError("loss_curve needs at least one finite loss")
    if width < 160 or height < 120:
        raise ValueError(f"loss_curve needs at least 160 x 120 pixels, got {width} x {height}")
    order = np.argsort(steps_a, kind="stable")
    xs, ys = steps_a[order][finite[order]], losses_a[order][finite[order]]

    face = font(max(11, height // 30))
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = float(ys.min()), float(ys.max())
    if x_hi == x_lo:  # one step: centre it in a range of +-1
        x_lo, x_hi = x_lo - 1, x_hi + 1
    span = y_hi - y_lo or abs(y_hi) or 1.0
    y_lo, y_hi = y_lo - 0.05 * span, y_hi + 0.05 * span  # keep the extremes off the frame
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, integer=True) if x_lo <= t <= x_hi]
    y_ticks = [t for t in nice_ticks(y_lo, y_hi) if y_lo <= t <= y_hi]
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else abs(y_ticks[0]) or 1.0
    y_labels = [_label(t, y_step) for t in y_ticks]

    text_h = _text_size(draw, "Ag", face)[1]
    label_w = max(_text_size(draw, s, face)[0] for s in y_labels)
    left = 8 + text_h + 6 + label_w + 6  # axis name, tick labels, tick marks
    right, top, bottom = width - 16, 10 + text_h + 10, height - (6 + text_h + 8 + text_h + 8)
    if right - left < 40 or bottom - top < 40:
        raise ValueError(f"loss_curve: {width} x {height} pixels leave no room for the plot")

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    for t in x_ticks:
        x = round(px(t))
        draw.line([(x, top), (x, bottom)], fill=_GRID_INK)
        draw.line([(x, bottom), (x, bottom + 4)], fill=_INK)
        _text(draw, (x, bottom + 6), _label(t, x_step), face, "mt")
    for t, s in zip(y_ticks, y_labels, strict=True):
        y = round(py(t))
        draw.line([(left, y), (right, y)], fill=_GRID_INK)
        draw.line([(left - 4, y), (left, y)], fill=_INK)
        _text(draw, (left - 6, y), s, face, "rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_INK, width=1)
    _text(draw, ((left + right) // 2, height - 6), "step", face, "mb")
    _text(draw, ((left + right) // 2, 8), title, face, "mt")
    name = Image.new("RGB", _text_size(draw, "loss", face), _WHITE)  # the y axis name, drawn rotated
    _text(ImageDraw.Draw(name), (0, 0), "loss", face, "lt")
    name = name.rotate(90, expand=True)
    canvas.paste(name, (8, (top + bottom - name.height) // 2))

    points = [(px(x), py(y)) for x, y in zip(xs, ys, strict=True)]
    if len(points) == 1:
        (x, y) = points[0]
        draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=LINE_COLOR)
    else:
        draw.line(points, fill=LINE_COLOR, width=2, joint="curve")
    return np.asarray(canvas, dtype=np.uint8).copy()
