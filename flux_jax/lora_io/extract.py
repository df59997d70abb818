"""LoRA extraction: the truncated SVD of (tuned - base) on every Linear of the Flux transformer.

Both checkpoints are opened lazily (`open_checkpoint`: any layout, fp8 dequantized on read) and walked module by
module in key-table order, so host memory holds one module's tensors of each model at a time, plus the factors
kept so far. The linears are `LINEAR_ENTRIES`, the set every flux-jax LoRA can adapt, in flux-jax's own layout:
a fused BFL Linear (qkv, single blocks' linear1) is one matrix and gets one SVD. The diffusers export row-splits
that one LoRA into q / k / v (/ mlp) pieces sharing its `down` (`pieces.split`), which is exact, so all three
formats hold the same delta; an SVD per diffusers piece would fit each piece a little better at the same rank, but
the pieces would no longer share `down` and the fused LoRA would come back at 3-4x the rank on import.

For the kept rank k of delta = U S V^T: down = sqrt(S_k) V_k^T [k, in], up = U_k sqrt(S_k) [out, k], alpha = k, so
alpha / rank = 1 and every loader (kohya / ComfyUI scale alpha / r; diffusers with the scale folded in) adds
exactly up @ down = U_k S_k V_k^T at strength 1. The SVD runs in float32 with `jax.numpy.linalg.svd` on JAX's
default device (the accelerator when there is one). Its Frobenius error is the tail sqrt(sum of discarded s^2).

Biases, norm scales and any other non-matrix parameter that changed cannot be expressed by a LoRA: their share
of the whole delta (squared Frobenius norm) is reported, not refused. Linears whose delta is exactly zero are
skipped and reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.errors import CheckpointError, FluxJaxError
from flux_jax.lora_io.weights import LoraWeights, listing
from flux_jax.model.config import FluxConfig
from flux_jax.weights import flux_keys
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.handle import FluxCheckpoint
from flux_jax.weights.sources import read_all


def check_request(rank: int | None, energy: float | None) -> None:
    """A fixed rank >= 1, an energy fraction in (0, 1], or both (the energy's rank capped by `rank`)."""
    if rank is None and energy is None:
        raise FluxJaxError("give --rank R, --energy F, or both")
    if rank is not None and rank < 1:
        raise FluxJaxError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not (0 < energy <= 1):  # also refuses NaN
        raise FluxJaxError(f"--energy must be in (0, 1], got {energy}")


def choose_rank(s: np.ndarray, rank: int | None, energy: float | None) -> int:
    """The rank kept for singular values `s` (descending): `rank` (at most len(s)), or with `energy` the smallest
    k whose sum(s[:k]^2) / sum(s^2) >= energy, capped by `rank` when both are given. At least 1."""
    n = len(s)
    k = n if rank is None else min(rank, n)
    if energy is not None:
        kept = np.cumsum(np.asarray(s, np.float64) ** 2)
        # float64 sums of float32 values: kept[-1] is the total, so energy 1.0 needs every non-zero value.
        k_energy = int(np.searchsorted(kept, energy * kept[-1], side="left")) + 1
        k = min(k, k_energy, n)
    return max(k, 1)


def retained(s: np.ndarray, k: int) -> tuple[float, float]:
    """(retained energy sum(s[:k]^2) / sum(s^2), tail sqrt(sum(s[k:]^2))) in float64."""
    sq = np.asarray(s, np.float64) ** 2
    total = float(sq.sum())
    return (float(sq[:k].sum()) / total if total else 1.0), math.sqrt(float(sq[k:].sum()))


@jax.jit
def _svd(delta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.linalg.svd(delta, full_matrices=False)


def svd(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U [out, n], s [n], V^T [n, in]) of a float32 matrix, computed on JAX's default device."""
    u, s, vt = _svd(jnp.asarray(delta, jnp.float32))
    return np.asarray(u), np.asarray(s), np.asarray(vt)


def factor(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int) -> LoraWeights:
    """The rank-k LoRA with up @ down = U_k diag(s_k) V_k^T at scale alpha / rank = 1."""
    root = np.sqrt(s[:k]).astype(np.float32)
    return LoraWeights(down=root[:, None] * vt[:k], up=u[:, :k] * root[None, :], alpha=float(k))


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One Linear: its delta's Frobenius norm and, when it changed, the kept rank, retained energy and the tail."""

    path: str
    shape: tuple[int, int]
    norm: float
    rank: int | None = None  # None: unchanged (delta exactly zero), skipped
    energy: float = 1.0
    error: float = 0.0  # Frobenius norm of the discarded part: sqrt(sum of discarded s^2)


@dataclasses.dataclass(frozen=True)
class Extraction:
    config: FluxConfig
    weights: dict[str, LoraWeights]  # BFL module path -> LoRA, changed linears only
    layers: list[LayerReport]  # every Linear, in key-table order
    other: dict[str, float]  # changed non-LoRA tensors (biases, norm scales): key -> Frobenius norm of the delta

    @property
    def changed(self) -> list[LayerReport]:
        return [r for r in self.layers if r.rank is not None]

    @property
    def unchanged(self) -> list[LayerReport]:
        return [r for r in self.layers if r.rank is None]

    def energies(self) -> tuple[float, float, float]:
        """(kept, linear, other): squared Frobenius norms of the kept part, of the linears' delta, of the rest."""
        kept = sum(r.norm**2 - r.error**2 for r in self.changed)
        return kept, sum(r.norm**2 for r in self.layers), sum(v**2 for v in self.other.values())


def _as_f32(ckpt: FluxCheckpoint, key: str) -> np.ndarray:
    return np.asarray(read_all(ckpt.tensors[key]), dtype=np.float32)


def _check_same_architecture(base: FluxCheckpoint, tuned: FluxCheckpoint) -> None:
    want = flux_keys.bfl_shapes(base.config)
    have = flux_keys.bfl_shapes(tuned.config)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) only in the base: {listing(missing, 5)}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) only in the tuned model: {listing(extra, 5)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of other shapes (tuned vs base): {listing(wrong, 5)}")
    if problems:
        raise CheckpointError(f"{tuned.path} is not the architecture of {base.path}: " + "; ".join(problems))


def extract_lora(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    rank: int | None,
    energy: float | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Extraction:
    """The LoRA of (tuned - base) on every changed Linear (see the module docstring).

    rank / energy: see `choose_rank` (`check_request` refuses bad values). progress: wraps the iteration over the
    modules (e.g. a tqdm bar); it receives (path, entry) pairs with a len().
    """
    check_request(rank, energy)
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        _check_same_architecture(b, t)
        cfg = b.config
        modules = [
            (flux_keys.fill(e.bfl, i), e) for e in flux_keys.entries(cfg) for i in flux_keys.layer_indices(cfg, e)
        ]
        weights: dict[str, LoraWeights] = {}
        layers: list[LayerReport] = []
        other: dict[str, float] = {}
        for path, entry in progress(modules):
            for suffix, _ in entry.bfl_params():
                key = f"{path}.{suffix}"
                delta = _as_f32(t, key) - _as_f32(b, key)
                if not np.isfinite(delta).all():
                    raise CheckpointError(f"{key}: NaN or Inf in the base or the tuned weights ({base}, {tuned})")
                norm = float(np.linalg.norm(delta.astype(np.float64)))
                if entry.kind != "linear" or suffix != "weight":
                    if norm > 0:
                        other[key] = norm
                    continue
                shape = (int(delta.shape[0]), int(delta.shape[1]))
                if norm == 0:
                    layers.append(LayerReport(path, shape, 0.0))
                    continue
                u, s, vt = svd(delta)
                del delta
                k = choose_rank(s, rank, energy)
                kept, tail = retained(s, k)
                weights[path] = factor(u, s, vt, k)
                layers.append(LayerReport(path, shape, norm, k, kept, tail))
    if not weights:
        raise FluxJaxError(f"{tuned} and {base} have the same weights on every Linear: there is no LoRA to extract")
    return Extraction(cfg, weights, layers, other)


def report(ex: Extraction) -> tuple[list[str], list[str]]:
    """(lines, warnings) describing an extraction: one line per Linear, then a summary."""
    width = max(len(r.path) for r in ex.layers)
    lines = []
    for r in ex.layers:
        shape = f"[{r.shape[0]}, {r.shape[1]}]"
        if r.rank is None:
            lines.append(f"{r.path:<{width}} {shape:>14}  unchanged (skipped)")
        else:
            rel = r.error / r.norm
            lines.append(
                f"{r.path:<{width}} {shape:>14}  rank {r.rank:>4}  energy {r.energy:.6f}  "
                f"error {r.error:.3e} ({rel:.2%} of the delta)"
            )
    changed = ex.changed
    ranks = [r.rank for r in changed]
    kept, linear, other = ex.energies()
    params = sum(w.down.size + w.up.size for w in ex.weights.values())
    lines.append(
        f"extracted {len(changed)} of {len(ex.layers)} linear layers ({len(ex.unchanged)} unchanged, skipped); "
        f"rank {min(ranks)}-{max(ranks)} (mean {np.mean(ranks):.1f}); {params} LoRA parameters"
    )
    lines.append(
        f"retained energy {kept / linear:.6f} of the linears' delta, {kept / (linear + other):.6f} of the whole "
        f"delta; Frobenius error {math.sqrt(max(linear - kept, 0.0)):.3e} on the linears"
    )
    warnings = []
    if ex.other:
        warnings.append(
            f"{len(ex.other)} bias / norm tensor(s) changed and cannot be expressed by a LoRA "
            f"({other / (linear + other):.4%} of the delta's energy): {listing(sorted(ex.other), 5)}"
        )
    return lines, warnings
