"""Prompts -> ``TextConditioning`` with the JAX T5 and CLIP encoders (the tokenization each ``match`` uses).

T5 length: diffusers and BFL pad every prompt to 512 tokens for dev and 256 for schnell (``max_sequence_length``);
ComfyUI pads only to 77 tokens, or to the longest prompt when one is longer (its T5XXLTokenizer has
``min_length=77`` and no padding to a maximum). CLIP: 77 tokens, pooled output, in every tool. Both encoders run
without an attention mask, as Flux was trained. A LoRA's text-encoder parts (``loras``) are merged into the
encoders' weights when they are read (`flux_jax.lora_io.text_encoders`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flux_jax.data.encoding import EncoderPaths, place, read_clip, read_t5
from flux_jax.encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer, tokenize_clip, tokenize_t5
from flux_jax.lora_io.text_encoders import TextEncoderLoras
from flux_jax.sampling.sampler import SamplingError, TextConditioning
from flux_jax.sampling.schedules import Match
from flux_jax.sharding import replicate

T5_LENGTH_DEV = 512
T5_LENGTH_SCHNELL = 256
COMFYUI_T5_MIN_LENGTH = 77


def t5_length(tokenizer, prompts: Sequence[str], *, match: Match, schnell: bool) -> int:
    """The T5 sequence length ``match``'s tool encodes ``prompts`` at."""
    if match != "comfyui":
        return T5_LENGTH_SCHNELL if schnell else T5_LENGTH_DEV
    longest = max(len(ids) for ids in tokenizer(list(prompts))["input_ids"])
    return max(COMFYUI_T5_MIN_LENGTH, longest)


def _encode(t5_def, clip_def, t5_state, clip_state, t5_ids, clip_ids):
    hidden = nnx.merge(t5_def, t5_state)(t5_ids)
    _, pooled = nnx.merge(clip_def, clip_state)(clip_ids)
    return hidden, pooled


class PromptEncoder:
    """T5 + CLIP and their tokenizers, placed on ``mesh``; free it (``del``) once the prompts are encoded."""

    def __init__(self, t5, clip, t5_tokenizer, clip_tokenizer, *, mesh: Mesh):
        self.mesh = mesh
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self._t5, self._clip = place(t5, mesh), place(clip, mesh)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._fn = jax.jit(functools.partial(_encode, self._t5[0], self._clip[0]), out_shardings=self._replicated)

    @classmethod
    def load(
        cls, paths: EncoderPaths, *, mesh: Mesh, dtype: str = "bf16", loras: TextEncoderLoras | None = None
    ) -> PromptEncoder:
        """The encoders ``paths`` names, in ``dtype``, with ``loras`` (``{"clip": {...}, "t5": {...}}``, at the
        strength it holds: combine scales with `flux_jax.lora_io.combine.combine_text_encoder_loras`) merged in."""
        loras = loras or {}
        return cls(
            read_t5(paths.t5, dtype, lora=loras.get("t5")),
            read_clip(paths.clip, dtype, lora=loras.get("clip")),
            load_t5_tokenizer(paths.t5_tokenizer),
            load_clip_tokenizer(paths.clip_tokenizer),
            mesh=mesh,
        )

    def encode(self, prompts: Sequence[str], *, match: Match = "diffusers", schnell: bool = False) -> TextConditioning:
        """T5 padded to 512 (256 for schnell; ComfyUI: 77, or the longest prompt), CLIP pooled at 77 tokens.

        Encode a negative prompt together with the prompts (one list) when ComfyUI's lengths must agree."""
        prompts = list(prompts)
        if not prompts:
            raise SamplingError("no prompts to encode")
        length = t5_length(self.t5_tokenizer, prompts, match=match, schnell=schnell)
        t5_ids = tokenize_t5(self.t5_tokenizer, prompts, length).input_ids
        clip_ids = tokenize_clip(self.clip_tokenizer, prompts).input_ids
        ids = replicate(t5_ids, self.mesh), replicate(clip_ids, self.mesh)
        hidden, pooled = self._fn(self._t5[1], self._clip[1], *ids)
        return TextConditioning(hidden, pooled)

    def encode_with_negative(
        self, prompts: Sequence[str], negative: str | None, *, match: Match = "diffusers", schnell: bool = False
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """The prompts and (when given) the negative prompt at one T5 length, as true CFG needs."""
        if negative is None:
            return self.encode(prompts, match=match, schnell=schnell), None
        both = self.encode([*prompts, negative], match=match, schnell=schnell)
        n = len(prompts)
        return TextConditioning(both.t5[:n], both.clip[:n]), TextConditioning(both.t5[n:], both.clip[n:])
