"""Prompts -> ``TextConditioning`` with the JAX T5 and CLIP encoders (the tokenization each ``match`` uses).

STUB (contract): implementation lands next.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh

from flux_jax.data.encoding import EncoderPaths
from flux_jax.sampling.sampler import TextConditioning
from flux_jax.sampling.schedules import Match


class PromptEncoder:
    """T5 + CLIP and their tokenizers, placed on ``mesh``; free it (``del``) once the prompts are encoded."""

    @classmethod
    def load(cls, paths: EncoderPaths, *, mesh: Mesh, dtype: str = "bf16") -> PromptEncoder:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str], *, match: Match = "diffusers", schnell: bool = False) -> TextConditioning:
        """T5 padded to 512 (256 for schnell; ComfyUI: 77, or the longest prompt), CLIP pooled at 77 tokens."""
        raise NotImplementedError
