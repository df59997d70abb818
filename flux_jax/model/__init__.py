"""The Flux.1 transformer in Flax NNX."""

from flux_jax.model.config import PRESETS, FluxConfig, preset
from flux_jax.model.flux import REMAT_POLICIES, Flux, configure

__all__ = ["PRESETS", "REMAT_POLICIES", "Flux", "FluxConfig", "configure", "preset"]
