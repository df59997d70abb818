"""Pictures on disk: PNGs that carry their settings, grids, side-by-side comparisons and loss curves.

STUB (contract): implementation lands with its tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def png_bytes(image: np.ndarray, text: Mapping[str, str] = {}) -> bytes:  # noqa: B006 - read only
    """uint8 [H, W, 3] -> PNG bytes with ``text`` as PNG text chunks (tEXt, iTXt for non-Latin-1)."""
    raise NotImplementedError


def write_png(path: str | os.PathLike, image: np.ndarray, text: Mapping[str, str] = {}) -> None:  # noqa: B006
    """Atomically (temp file, then rename); ``path`` may be a gs:// URL."""
    raise NotImplementedError


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG."""
    raise NotImplementedError


def grid(images: Sequence[np.ndarray], *, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 images of one size tiled row-major into ``columns`` columns with ``pad`` pixels of black between."""
    raise NotImplementedError


def side_by_side(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], *, pad: int = 4) -> np.ndarray:
    """One row per prompt, one column per title (e.g. "base", "base + LoRA"), titles drawn above the columns."""
    raise NotImplementedError


def loss_curve(steps: Sequence[int], losses: Sequence[float], *, width: int = 640, height: int = 360) -> np.ndarray:
    """uint8 [height, width, 3] plot of the loss against the step (axes, ticks and labels; drawn with PIL)."""
    raise NotImplementedError
