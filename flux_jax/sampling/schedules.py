"""Sigma schedules and model timesteps of BFL, diffusers and ComfyUI (``match``), in numpy float32.

STUB: the contract below is what the sampler calls; the implementation lands with its tests.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Match = Literal["diffusers", "comfyui", "bfl"]
MATCHES: tuple[str, ...] = ("diffusers", "comfyui", "bfl")


def flux_mu(image_tokens: int) -> float:
    """mu of the resolution-dependent shift: linear in the packed token count, 0.5 at 256 and 1.15 at 4096."""
    raise NotImplementedError


def sigmas(match: Match, steps: int, image_tokens: int, *, shift: bool = True) -> np.ndarray:
    """float32 [steps + 1], from 1 down to a final 0, as ``match``'s tool computes it (shift=False: schnell)."""
    raise NotImplementedError


def model_timesteps(match: Match, sigmas: np.ndarray, dtype: str) -> np.ndarray:
    """float32 [steps]: the ``t`` to feed ``Flux`` (which embeds ``1000 * t`` in float32) so the embedded value is
    the one ``match``'s tool embeds with activations in ``dtype`` ("fp32" or "bf16")."""
    raise NotImplementedError
