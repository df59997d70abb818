"""flux-jax: train Flux.1 LoRAs on Flux-Dev2Pro at guidance 1.0 with JAX, from one CPU to a TPU pod."""

from flux_jax.model.config import PRESETS, FluxConfig, preset
from flux_jax.model.flux import Flux, configure

__version__ = "0.1.0"


def load_flux(*args, **kwargs):
    """Load a Flux transformer from any supported checkpoint; see `flux_jax.weights.load.load_flux`."""
    from flux_jax.weights.load import load_flux as _load_flux

    return _load_flux(*args, **kwargs)


__all__ = ["PRESETS", "Flux", "FluxConfig", "configure", "load_flux", "preset"]
