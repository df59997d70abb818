"""torch's CPU ``randn`` in numpy, bit for bit: the initial noise diffusers, ComfyUI and BFL draw for a seed.

STUB: the contract below is what the sampler calls; the implementation lands with its tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flux_jax.sampling.schedules import Match


def torch_randn(shape: Sequence[int], seed: int) -> np.ndarray:
    """float32, equal to ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` (AVX2 kernel)."""
    raise NotImplementedError


def torch_randn_bf16(shape: Sequence[int], seed: int) -> np.ndarray:
    """float32 holding bfloat16 values, equal to ``torch.randn(shape, dtype=torch.bfloat16, generator=...)``."""
    raise NotImplementedError


def initial_noise(match: Match, shape: Sequence[int], seed: int, dtype: str) -> np.ndarray:
    """float32 [B, C, h, w] (torch's NCHW): the noise ``match``'s tool starts from for ``seed`` with activations in
    ``dtype``: diffusers draws in the pipeline dtype, BFL always bf16, ComfyUI float32."""
    raise NotImplementedError
