"""Exact conversions between a LoRA on a fused BFL Linear and LoRAs on row pieces of it.

BFL fuses q, k, v (and the single blocks' MLP input) into one Linear; diffusers has one Linear per piece, and
XLabs' single-block LoRA covers only the q/k/v rows. Both directions here are exact (no SVD, no rounding):

* fuse: pieces that share their `down` (what our diffusers export and diffusers' kohya converter write) become
  one LoRA of the same rank with the `up` rows stacked; pieces with their own `down` become one LoRA of the summed
  rank with a block-diagonal `up` (zeros elsewhere) -- kohya's split_qkv layout. Rows no piece covers get zeros.
* split: a block-diagonal `up` (disjoint non-zero columns per piece) is cut back into compact per-piece LoRAs, so a
  split_qkv LoRA keeps rank r per projection; any other `up` is row-split with `down` copied to every piece.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flux_jax.lora_io.weights import LoraWeights

Rows = tuple[int, int]  # (start, length)


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
    """The LoRA of rows [start, start + length) of a fused module; `rows` None means all rows."""

    rows: Rows | None
    weights: LoraWeights


def split_rows(sizes: tuple[int, ...]) -> list[Rows]:
    starts = np.cumsum((0, *sizes[:-1]))
    return [(int(s), int(n)) for s, n in zip(starts, sizes, strict=True)]


def fuse(parts: list[Part], out_rows: int, where: str) -> LoraWeights:
    """One LoRA on the whole module that adds exactly what the parts add to their rows."""
    if len(parts) == 1 and parts[0].rows in (None, (0, out_rows)):
        return parts[0].weights
    rows = [p.rows for p in parts]
    if any(r is None for r in rows):
        raise ValueError(f"{where}: a LoRA on the whole module cannot be combined with LoRAs on its pieces")
    taken = np.zeros(out_rows, bool)
    for (start, length), p in zip(rows, parts, strict=True):
        if p.weights.out_features != length or start + length > out_rows or taken[start : start + length].any():
            raise ValueError(f"{where}: LoRA pieces do not tile the module's {out_rows} output rows")
        taken[start : start + length] = True
    ws = [p.weights for p in parts]
    scales = [w.scale for w in ws]
    same_scale = all(s == scales[0] for s in scales)
    # Keep the common scale in alpha; different scales are folded into each piece's `up` (exact in the product).
    ref = scales[0] if same_scale else 1.0
    ups = [w.up if s == ref else w.up * np.float32(s / ref) for w, s in zip(ws, scales, strict=True)]
    shared = all(w.down.shape == ws[0].down.shape and np.array_equal(w.down, ws[0].down) for w in ws)
    if shared:
        up = np.zeros((out_rows, ws[0].rank), np.float32)
        for (start, length), u in zip(rows, ups, strict=True):
            up[start : start + length] = u
        same_alpha = same_scale and all(w.alpha == ws[0].alpha for w in ws)
        return LoraWeights(ws[0].down, up, ws[0].alpha if same_alpha else ref * ws[0].rank)
    down = np.concatenate([w.down for w in ws], axis=0)
    up = np.zeros((out_rows, down.shape[0]), np.float32)
    col = 0
    for (start, length), u in zip(rows, ups, strict=True):
        up[start : start + length, col : col + u.shape[1]] = u
        col += u.shape[1]
    return LoraWeights(down, up, ref * down.shape[0])


def split(w: LoraWeights, rows: list[Rows]) -> list[LoraWeights | None]:
    """Per-piece LoRAs adding exactly `w`'s delta to each piece's rows; None for a piece it does not touch.

    Compact (rank = the piece's own non-zero columns) when the pieces use disjoint columns of `up`; otherwise every
    piece gets `down` and its rows of `up` (and pieces are never dropped, even all-zero ones).
    """
    ups = [w.up[start : start + length] for start, length in rows]
    used = [np.flatnonzero(np.any(u != 0, axis=0)) for u in ups]
    total = sum(len(c) for c in used)
    disjoint = total > 0 and len(np.unique(np.concatenate(used))) == total
    if disjoint:
        return [_compact(w, u, cols) if len(cols) else None for u, cols in zip(ups, used, strict=True)]
    return [LoraWeights(w.down, u, w.alpha) for u in ups]


def _compact(w: LoraWeights, up: np.ndarray, cols: np.ndarray) -> LoraWeights:
    if len(cols) == w.rank:
        return LoraWeights(w.down, up, w.alpha)
    return LoraWeights(w.down[cols], up[:, cols], w.scale * len(cols))


def swap_halves(up: np.ndarray) -> np.ndarray:
    """BFL final-layer (shift, scale) rows <-> diffusers (scale, shift); self-inverse."""
    half = up.shape[0] // 2
    return np.concatenate([up[half:], up[:half]], axis=0)
