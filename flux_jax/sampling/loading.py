"""A base to sample from: a FLUX.1 pipeline directory, or a transformer checkpoint plus an encoders directory.

A FLUX.1 diffusers download (``black-forest-labs/FLUX.1-dev``) holds everything: ``transformer/`` and the
encoders' folders (``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``). A
transformer alone (a BFL or ComfyUI single file, fp8 included, a diffusers transformer folder, a Flax checkpoint)
takes its encoders from such a directory, as ``encoders.root`` does for ``flux-jax cache``. Either may be a Hugging
Face Hub name (``black-forest-labs/FLUX.1-dev``, ``ashen0209/Flux-Dev2Pro``; `flux_jax.hub`): only the files the
base needs are fetched, and a repository that cannot serve as the base is refused before any download.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from flux_jax import hub
from flux_jax.axes import DEFAULT_RULES, Rules
from flux_jax.data.encoding import ROOT_LAYOUT, EncoderPaths, place, read_vae
from flux_jax.dtypes import parse_dtype
from flux_jax.encoders.vae import AutoEncoder
from flux_jax.errors import CheckpointError
from flux_jax.model.flux import Flux
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.load import load_flux

BASE_DTYPES = ("fp32", "bf16", "fp8")


@dataclasses.dataclass(frozen=True)
class SamplingBase:
    transformer: str
    """The transformer checkpoint (any layout ``load_flux`` reads)."""
    encoders: EncoderPaths
    """VAE, T5, CLIP and tokenizers."""


def encoder_paths(root: str | os.PathLike) -> EncoderPaths:
    """The encoders of a pipeline directory (or Hub name); a CheckpointError naming every missing folder."""
    root = Path(hub.resolve_encoders(root))
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such encoders directory (a FLUX.1 pipeline directory)")
    missing = [sub for sub in ROOT_LAYOUT.values() if not (root / sub).exists()]
    if missing:
        raise CheckpointError(f"{root}: not a FLUX.1 pipeline directory: no {', '.join(f'{m}/' for m in missing)}")
    return EncoderPaths(**{name: root / sub for name, sub in ROOT_LAYOUT.items()})


def resolve_base(base: str | os.PathLike, encoders: str | os.PathLike | None = None) -> SamplingBase:
    """``base`` a pipeline directory (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)
    or a transformer checkpoint with ``encoders`` a pipeline directory; a CheckpointError naming the missing piece
    otherwise. Reads no weights. A Hub name is fetched first: a pipeline when ``encoders`` is None, else only a
    transformer (and ``encoders``' encoders)."""
    if encoders is not None:
        path = Path(hub.resolve_transformer(base))
    else:
        try:
            path = Path(hub.resolve_pipeline(base))
        except hub.NotAPipelineError as e:
            if not e.holds_transformer:
                raise
            raise CheckpointError(
                f"{base}: a transformer checkpoint without its encoders; pass a FLUX.1 pipeline repository or "
                "directory as the base, or the encoders' one too (--encoders)"
            ) from None
    if not path.exists():
        raise CheckpointError(f"{path}: no such base (a FLUX.1 pipeline directory or a transformer checkpoint)")
    if path.is_dir() and (path / "transformer").is_dir():
        return SamplingBase(str(path / "transformer"), encoder_paths(encoders or path))
    if path.is_dir():  # a transformer directory (diffusers or Flax) must read as one: headers only
        try:
            open_checkpoint(path).close()
        except CheckpointError as e:
            why = str(e).removeprefix(f"{path}: ")
            raise CheckpointError(
                f"{path}: neither a FLUX.1 pipeline directory (no transformer/) nor a transformer checkpoint ({why})"
            ) from None
    if encoders is None:
        raise CheckpointError(
            f"{path}: a transformer checkpoint without its encoders; pass a FLUX.1 pipeline directory as the base, "
            "or the encoders' pipeline directory too (--encoders)"
        )
    return SamplingBase(str(path), encoder_paths(encoders))


def load_transformer(
    path: str, *, dtype: str, compute_dtype: str, mesh: Mesh, rules: Rules = DEFAULT_RULES, attention: str = "auto"
) -> Flux:
    """The base transformer, sharded on ``mesh`` (stored fp32 / bf16 / fp8), with the attention kernel for the
    mesh's devices by default (``flux_jax.model.attention``)."""
    return load_flux(
        path,
        dtype=parse_dtype(dtype, BASE_DTYPES),
        compute_dtype=parse_dtype(compute_dtype, ("fp32", "bf16")),
        mesh=mesh,
        rules=rules,
        attention=attention,
    )


def load_vae_for(paths: EncoderPaths, *, dtype: str, mesh: Mesh) -> AutoEncoder:
    """The VAE (decoder used), replicated on ``mesh``."""
    return nnx.merge(*place(read_vae(paths.vae, dtype), mesh))


__all__ = ["BASE_DTYPES", "SamplingBase", "encoder_paths", "load_transformer", "load_vae_for", "resolve_base"]
