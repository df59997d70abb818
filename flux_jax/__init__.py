"""flux-jax: train Flux.1 LoRAs on Flux-Dev2Pro at guidance 1.0 with JAX, from one CPU to a TPU pod.

The library's front door: ``Flux``, ``FluxConfig``, ``PRESETS``, ``preset``, ``configure`` and ``load_flux``. They are
resolved on first use, so importing one light module (``flux_jax.hardware``, ``flux_jax.run_config``, the TPU
launcher) does not start JAX. Every other name is imported from the module that defines it.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"
__all__ = ["PRESETS", "Flux", "FluxConfig", "configure", "load_flux", "preset"]


def load_flux(
    path: str | os.PathLike, *, lora: str | os.PathLike | None = None, lora_scale: float = 1.0, **kwargs: Any
):
    """A Flux transformer from any supported checkpoint, optionally with a LoRA file attached as adapters.

    path and the keyword arguments: see ``flux_jax.weights.load.load_flux`` (layout detected; dtype, mesh, rules,
    attention, remat).
    lora / lora_scale: a LoRA file in any supported format (kohya, kohya split_qkv, diffusers/PEFT, ComfyUI,
      XLabs), attached as adapters (not merged) at strength lora_scale and placed on the same mesh. Keys that match
      no Flux layer are an error listing them.
    """
    from flux_jax.axes import DEFAULT_RULES
    from flux_jax.lora_io.import_ import apply_lora_file
    from flux_jax.weights.load import load_flux as load_base

    model = load_base(path, **kwargs)
    if lora is not None:
        apply_lora_file(
            model, lora, scale=lora_scale, mesh=kwargs.get("mesh"), rules=kwargs.get("rules", DEFAULT_RULES)
        )
    return model


def __getattr__(name: str) -> Any:
    if name in ("PRESETS", "FluxConfig", "preset"):
        from flux_jax.model import config

        return getattr(config, name)
    if name in ("Flux", "configure"):
        from flux_jax.model import flux

        return getattr(flux, name)
    raise AttributeError(f"module 'flux_jax' has no attribute {name!r}")
