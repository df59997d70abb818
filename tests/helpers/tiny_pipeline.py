"""A tiny FLUX.1 diffusers pipeline directory with random weights, built locally in a second or two.

``build_tiny_pipeline(root)`` writes what a FLUX.1 download holds, in the real layouts: ``vae/``,
``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5), ``tokenizer/`` and ``tokenizer_2/`` from the demo encoders
(`flux_jax.data.demo.build_demo_encoders`, whose text widths feed the ``tiny`` preset), and ``transformer/``, a
diffusers transformer directory of the ``tiny`` Flux preset. The transformer's weights are drawn with numpy from the
key table's shapes and written by the library's own writers (BFL single file -> diffusers directory), so no JAX
model is initialised eagerly (that alone takes tens of seconds on a CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from flux_jax.data.demo import DemoDims, build_demo_encoders
from flux_jax.model.config import CONFIG_METADATA_KEY, FluxConfig, config_metadata, preset
from flux_jax.weights import flux_keys
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.safetensors_file import save_file
from flux_jax.weights.writers import write_flux_diffusers

# What a FLUX.1 download's model_index.json and scheduler/ hold (diffusers reads them; flux-jax needs neither).
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
TINY = preset("tiny")
DIMS = DemoDims(t5_dim=TINY.context_in_dim, clip_dim=TINY.vec_in_dim)


def random_bfl_tensors(cfg: FluxConfig = TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights for every BFL key of ``cfg``: matrices ~ N(0, 1/fan_in) so activations stay O(1), biases
    ~ N(0, 0.02), RMSNorm scales near 1 (not exactly 1, so a swapped norm would show)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in flux_keys.bfl_shapes(cfg).items():
        if key.endswith(".scale"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif key.endswith(".bias"):
            value = 0.02 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        out[key] = value.astype(np.float32)
    return out


def write_tiny_transformer_file(path: str | Path, cfg: FluxConfig = TINY, seed: int = 0) -> Path:
    """A BFL single-file transformer (``flux1-dev.safetensors`` layout, fp32) with our config in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: config_metadata(cfg)}
    save_file(path, random_bfl_tensors(cfg, seed), metadata=metadata)
    return path


def build_tiny_pipeline(root: str | Path, *, seed: int = 0, with_transformer: bool = True) -> Path:
    """A FLUX.1 pipeline directory at ``root`` (encoders from ``seed``; transformer from ``seed`` too, written to
    ``transformer/`` unless ``with_transformer`` is False: an encoders-only directory for ``--encoders``)."""
    root = Path(root)
    build_demo_encoders(root, seed=seed, dims=DIMS)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    if with_transformer and not (root / "transformer").exists():
        single = root.parent / f".{root.name}-transformer.safetensors"
        write_tiny_transformer_file(single, seed=seed)
        with open_checkpoint(single) as checkpoint:
            write_flux_diffusers(checkpoint, root / "transformer")
        single.unlink()
    return root


def load_torch_pipeline(root: Path, scheduler=None, *, vae: bool = True):
    """diffusers' own ``FluxPipeline`` over a pipeline directory's components (fp32, eval mode): the PyTorch side of
    the parity tests. ``scheduler`` defaults to diffusers' default; ``vae=False`` leaves the VAE out."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return FluxPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL.from_pretrained(root / "vae").eval() if vae else None,
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
        # The tiny tokenizer has no model_max_length; FLUX.1's CLIP tokenizer says 77, which diffusers pads to.
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77),
        text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_2").eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
        transformer=FluxTransformer2DModel.from_pretrained(root / "transformer").eval(),
    )
