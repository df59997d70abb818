"""Tiny random-weight VAE / T5 / CLIP and tokenizers, written as a real FLUX.1 download would lay them out.

`build_demo_encoders` writes ``vae/``, ``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5), ``tokenizer/`` and
``tokenizer_2/`` with diffusers/transformers ``config.json`` files and safetensors weights in the checkpoints'
own key layouts, so the demo runs through exactly the loading code a real run uses (and transformers /
diffusers can load the files too). Everything is a pure function of the seed and the dimensions: nothing is
downloaded and the repository stays small. The text widths default to the ``tiny`` Flux preset's
``context_in_dim`` / ``vec_in_dim`` so the cached embeddings feed that model directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from flux_jax.atomic import atomic_dir
from flux_jax.encoders.clip import CLIP_KEY_TABLE, CLIPTextConfig, CLIPTextModel
from flux_jax.encoders.keys import abstract_params, export_state, param_shapes
from flux_jax.encoders.t5 import T5_KEY_TABLE, T5Config, T5Encoder
from flux_jax.encoders.tokenizers import (
    DEFAULT_CORPUS,
    build_tiny_clip_tokenizer,
    build_tiny_t5_tokenizer,
    load_clip_tokenizer,
    load_t5_tokenizer,
)
from flux_jax.encoders.vae import AutoEncoder, VAEConfig, vae_key_table
from flux_jax.weights.safetensors_file import save_file

DEMO_VERSION = 1  # bump when the generated files change, so stale demo encoders are regenerated

# The words of the demo photos' captions (flux_jax/assets/demo_photos/*.txt) plus the tokenizer module's own corpus,
# so the tiny tokenizers keep those words whole; any other word is spelled out piece by piece.
DEMO_CORPUS: tuple[str, ...] = (
    *DEFAULT_CORPUS,
    "an astronaut in a white spacesuit smiling in front of an american flag",
    "a cup of coffee on a saucer seen from above",
    "a ginger tabby cat looking at the camera",
    "a rocket standing on the launch pad under a blue sky",
    "a black and white photo of a man with a camera on a tripod",
    "a red motorcycle parked on a road",
    "galaxies and stars of the hubble deep field",
    "a page of printed text photographed at an angle",
)


@dataclasses.dataclass(frozen=True)
class DemoDims:
    t5_dim: int = 48
    """T5 d_model = the Flux model's context_in_dim (tiny preset: 48)."""
    clip_dim: int = 32
    """CLIP hidden size = the Flux model's vec_in_dim (tiny preset: 32)."""


def _configs(dims: DemoDims, t5_vocab: int, clip_vocab: int) -> tuple[VAEConfig, T5Config, CLIPTextConfig]:
    heads = 4
    t5 = T5Config(
        vocab_size=t5_vocab,
        d_model=dims.t5_dim,
        d_kv=dims.t5_dim // heads,
        d_ff=2 * dims.t5_dim,
        num_layers=2,
        num_heads=heads,
    )
    clip = CLIPTextConfig(
        vocab_size=clip_vocab,
        hidden_size=dims.clip_dim,
        intermediate_size=2 * dims.clip_dim,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
    )
    return VAEConfig.tiny(), t5, clip


def build_demo_encoders(out_dir: str | Path, *, seed: int = 0, dims: DemoDims = DemoDims()) -> Path:
    """Write the demo encoders to ``out_dir`` (atomically); reuse them if the same seed and dims are there."""
    out = Path(out_dir)
    stamp = {"version": DEMO_VERSION, "seed": seed, **dataclasses.asdict(dims)}
    marker = out / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    with atomic_dir(out, force=True) as tmp:
        clip_tok = build_tiny_clip_tokenizer(tmp / "tokenizer", DEMO_CORPUS)
        t5_tok = build_tiny_t5_tokenizer(tmp / "tokenizer_2", DEMO_CORPUS)
        vae_cfg, t5_cfg, clip_cfg = _configs(dims, len(load_t5_tokenizer(t5_tok)), len(load_clip_tokenizer(clip_tok)))
        rng = np.random.default_rng(seed)
        vae = _random_params(lambda: AutoEncoder(vae_cfg, rngs=nnx.Rngs(0)), rng)
        t5 = _random_params(lambda: T5Encoder(t5_cfg, rngs=nnx.Rngs(0)), rng)
        clip = _random_params(lambda: CLIPTextModel(clip_cfg, rngs=nnx.Rngs(0)), rng)
        _write(
            tmp / "vae",
            "diffusion_pytorch_model.safetensors",
            export_state(vae_key_table("diffusers", vae_cfg.num_levels), vae),
            {"_class_name": "AutoencoderKL", **vae_cfg.to_diffusers()},
        )
        _write(
            tmp / "text_encoder_2",
            "model.safetensors",
            export_state(T5_KEY_TABLE, t5),
            {"architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": False, **t5_cfg.to_hf()},
        )
        _write(
            tmp / "text_encoder",
            "model.safetensors",
            export_state(CLIP_KEY_TABLE, clip),
            {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **clip_cfg.to_hf()},
        )
        (tmp / "demo.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return out


def _random_params(factory: Callable[[], nnx.Module], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 weights for every parameter of the model ``factory`` builds, drawn with numpy from the
    shapes alone (initialising the NNX modules eagerly would run one tiny XLA program per parameter, tens of
    seconds on a CPU). Kernels and embeddings ~ N(0, 1/fan_in) so activations stay O(1); norms start at the
    identity, biases at zero."""
    _, abstract = abstract_params(factory)
    out = {}
    for path, shape in param_shapes(abstract).items():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in ("kernel", "embedding"):
            fan_in = math.prod(shape.shape[:-1]) if leaf == "kernel" else shape.shape[-1]
            value = rng.standard_normal(shape.shape) / math.sqrt(fan_in)
        elif leaf == "scale":
            value = np.ones(shape.shape)
        else:
            value = np.zeros(shape.shape)
        out[path] = value.astype(np.float32)
    return out


def _write(folder: Path, weights: str, state: dict, config: dict) -> None:
    folder.mkdir(parents=True)
    save_file(folder / weights, state)
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
