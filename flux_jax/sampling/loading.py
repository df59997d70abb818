"""A base to sample from: a FLUX.1 pipeline directory, or a transformer checkpoint plus an encoders directory.

STUB (contract): implementation lands next.
"""

from __future__ import annotations

import dataclasses
import os

from jax.sharding import Mesh

from flux_jax.axes import DEFAULT_RULES, Rules
from flux_jax.data.encoding import EncoderPaths
from flux_jax.encoders.vae import AutoEncoder
from flux_jax.model.flux import Flux


@dataclasses.dataclass(frozen=True)
class SamplingBase:
    transformer: str
    """The transformer checkpoint (any layout ``load_flux`` reads)."""
    encoders: EncoderPaths
    """VAE, T5, CLIP and tokenizers."""


def resolve_base(base: str | os.PathLike, encoders: str | os.PathLike | None = None) -> SamplingBase:
    """``base`` a pipeline directory (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)
    or a transformer checkpoint with ``encoders`` a pipeline directory; a CheckpointError naming the missing piece
    otherwise. Reads no weights."""
    raise NotImplementedError


def load_transformer(
    path: str, *, dtype: str, compute_dtype: str, mesh: Mesh, rules: Rules = DEFAULT_RULES, attention: str = "xla"
) -> Flux:
    """The base transformer, sharded on ``mesh`` (stored fp32 / bf16 / fp8)."""
    raise NotImplementedError


def load_vae_for(paths: EncoderPaths, *, dtype: str, mesh: Mesh) -> AutoEncoder:
    """The VAE (decoder used), replicated on ``mesh``."""
    raise NotImplementedError
