"""Shared builders for the LoRA export/import tests (no tests here): JAX twins of diffusers references, random
LoRAs, diffusers' own LoRA loading, and ComfyUI's documented LoRA key rules."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flux_jax.axes import DEFAULT_RULES
from flux_jax.lora_io.adapters import lora_weights_from_model
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.model.config import FluxConfig
from flux_jax.model.lora import apply_lora, lora_modules
from flux_jax.weights import flux_keys
from flux_jax.weights.checkpoint import bfl_from_diffusers
from flux_jax.weights.flax_layout import abstract_model, flax_sources
from flux_jax.weights.load import load_state_into
from flux_jax.weights.sources import ArraySource, read_all
from tests.helpers.torch_reference import diffusers_flux, diffusers_forward, forward_inputs, tiny_config

# Every Linear the key table knows, the final layer included (the presets stop at the embedders).
ALL_LINEARS = ["all_blocks_and_embedders", r"final_layer\.(linear|adaLN_modulation\.1)"]

# The real Flux width (diffusers' kohya converter hard-codes 3072 / 12288 splits) with one block of each kind.
FULL_WIDTH = FluxConfig(in_channels=64, vec_in_dim=32, context_in_dim=48, depth=1, depth_single_blocks=1)


def diffusers_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def bfl_from_diffusers_state(cfg: FluxConfig, torch_model) -> dict:
    """Lazy BFL-keyed sources over the torch model's tensors (the library's own diffusers -> BFL mapping)."""
    return bfl_from_diffusers(cfg, {k: ArraySource(v) for k, v in diffusers_state(torch_model).items()})


def jax_twin(cfg: FluxConfig, torch_model):
    """The Flax Flux with the torch model's weights, through the library's own diffusers -> BFL -> Flax mapping."""
    bfl = bfl_from_diffusers_state(cfg, torch_model)
    return load_state_into(
        abstract_model(cfg), flax_sources(cfg, bfl), dtype=jnp.float32, mesh=None, rules=DEFAULT_RULES, where="test"
    )


def scaled_diffusers_flux(cfg: FluxConfig, seed: int = 0):
    """A random diffusers Flux whose Linear weights have std 0.5/sqrt(fan_in), so activations stay O(1) at full width.

    Built fast enough for a 3072-wide model on two cores: the module is created on the meta device, and every
    parameter is a window (at a random offset) of one shared pool of normal samples. A Linear weight is the
    transposed view of a contiguous [in, out] array, which is also the layout the Flax kernel wants.
    """
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    size = max(int(np.prod(s)) for s in shapes.values())
    pool = torch.randn(2 * size, generator=torch.Generator().manual_seed(seed)).numpy()
    state = {}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        window = pool[(off := int(rng.integers(0, size))) : off + n]
        if len(shape) == 2:
            kernel = np.multiply(window, np.float32(0.5 / shape[1] ** 0.5)).reshape(shape[1], shape[0])
            state[name] = torch.from_numpy(kernel).t()
        else:  # biases and RMSNorm scales: around 0 and around 1
            state[name] = torch.from_numpy(window * np.float32(0.1) + np.float32("norm" in name))
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def randomize_lora(model, *, rank: int, alpha: float, targets, blocks=None, seed: int = 0, up_std: float = 0.05):
    """Attach adapters and give both A and B random values (B = 0 would make any export look right)."""
    apply_lora(model, rank=rank, alpha=alpha, targets=targets, blocks=blocks, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, linear in lora_modules(model):
        lora = linear.lora
        fan_in = lora.lora_a.shape[-2]
        lora.lora_a[...] = jnp.asarray(rng.standard_normal(lora.lora_a.shape).astype(np.float32) / fan_in**0.5)
        lora.lora_b[...] = jnp.asarray(rng.standard_normal(lora.lora_b.shape).astype(np.float32) * up_std)
    return model


def pipeline(transformer):
    """A FluxPipeline around the transformer alone: enough for `load_lora_weights`, no hub access."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip


@contextlib.contextmanager
def quiet_diffusers():
    # The text-encoder half of load_lora_weights warns that there is no text encoder; that is expected here.
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def diffusers_lora_forward(pipe, path, inputs) -> np.ndarray:
    """Output of the pipeline's transformer with the LoRA file loaded by diffusers' own `load_lora_weights`."""
    with quiet_diffusers():
        pipe.load_lora_weights(str(path), adapter_name="under_test")
    try:
        return diffusers_forward(pipe.transformer, inputs)
    finally:
        pipe.unload_lora_weights()  # back to the plain modules (and state-dict keys) of the base model


# -- ComfyUI's rules ---------------------------------------------------------------------------------------------


def comfy_key_map(bfl_weight_keys) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_unet` for a BFL-keyed model: every `X.weight` is addressable as
    `lora_unet_<X with . -> _>` (kohya) and as `diffusion_model.X` (generic map)."""
    out = {}
    for key in bfl_weight_keys:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            out["lora_unet_" + module.replace(".", "_")] = key
            out["diffusion_model." + module] = key
    return out


_COMFY_NAMES = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))


def comfy_patch(bfl: dict[str, np.ndarray], lora: dict[str, np.ndarray], strength: float = 1.0) -> dict:
    """Apply a LoRA state dict to BFL weights as ComfyUI does: for each key-map entry, up/down (or B/A) and the
    optional alpha give W += strength * alpha / down.shape[0] * up @ down (alpha absent: scale 1). Asserts every
    LoRA key was consumed and every delta has the weight's shape."""
    key_map = comfy_key_map(bfl)
    out = dict(bfl)
    loaded = set()
    for name, target in key_map.items():
        for up_sfx, down_sfx in _COMFY_NAMES:
            if name + up_sfx in lora:
                up, down = lora[name + up_sfx].astype(np.float32), lora[name + down_sfx].astype(np.float32)
                alpha = lora.get(name + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                delta = strength * scale * (up @ down)
                assert delta.shape == bfl[target].shape, (name, delta.shape, bfl[target].shape)
                out[target] = out[target] + delta
                loaded |= {name + up_sfx, name + down_sfx, name + ".alpha"}
    not_loaded = sorted(set(lora) - loaded)
    assert not not_loaded, f"ComfyUI would report 'lora key not loaded' for {not_loaded}"
    return out


def bfl_state(cfg: FluxConfig, torch_model) -> dict[str, np.ndarray]:
    return {k: read_all(v) for k, v in bfl_from_diffusers_state(cfg, torch_model).items()}


def load_bfl_into_diffusers(cfg: FluxConfig, torch_model, bfl: dict[str, np.ndarray]) -> None:
    """Write BFL-keyed weights into a diffusers model through the key table's row pieces."""
    state = {}
    for piece in flux_keys.diffusers_pieces(cfg):
        full = bfl[piece.bfl_key]
        if piece.swap_halves:
            half = full.shape[0] // 2
            full = np.concatenate([full[half:], full[:half]])
        state[piece.key] = torch.from_numpy(np.ascontiguousarray(full[piece.start : piece.start + piece.length]))
    torch_model.load_state_dict(state, strict=True)


def merged_forward(cfg: FluxConfig, torch_model, weights: dict[str, LoraWeights], inputs) -> np.ndarray:
    """The reference's output with `weights` merged into a copy of its BFL weights (W += alpha / r * up @ down):
    what our reading of a LoRA file means, measured with PyTorch's own forward."""
    bfl = bfl_state(cfg, torch_model)
    for path, w in weights.items():
        bfl[f"{path}.weight"] = bfl[f"{path}.weight"] + w.delta()
    merged = copy.deepcopy(torch_model)
    load_bfl_into_diffusers(cfg, merged, bfl)
    return diffusers_forward(merged, inputs)


@nnx.jit
def _forward(model, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    return model(img, img_ids, txt, txt_ids, timesteps, y, guidance)


def jit_forward(model, inputs) -> np.ndarray:
    """`jax_forward`, compiled once per model structure (adapters of the same ranks and alphas reuse it)."""
    names = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")
    return np.asarray(_forward(model, *(jnp.asarray(inputs[n]) for n in names)))


# The tiny case's LoRA: alpha != rank, random non-zero B, on every Linear; blocks 1 (double 1) and 3 (single 1)
# stay masked out, so exports must leave them out.
TINY_RANK, TINY_ALPHA, TINY_BLOCKS = 4, 3.0, (0, 2, 4)


@functools.cache
def _tiny_case() -> dict:
    cfg = tiny_config()
    ref = diffusers_flux(cfg, seed=3)
    model = jax_twin(cfg, ref)
    randomize_lora(model, rank=TINY_RANK, alpha=TINY_ALPHA, targets=ALL_LINEARS, blocks=list(TINY_BLOCKS), seed=5)
    inputs = forward_inputs(cfg, batch=2, h=3, w=4, txt_len=5, seed=9)
    want = jit_forward(model, inputs)
    base = diffusers_forward(ref, inputs)
    # The LoRA must move the output far beyond the 1e-4 tolerance, or the parity checks prove nothing.
    assert np.abs(want - base).max() > 1e-2
    return dict(
        cfg=cfg, ref=ref, model=model, weights=lora_weights_from_model(model), inputs=inputs, want=want, base=base
    )


def tiny_case() -> dict:
    """One tiny reference (diffusers model, its JAX twin with a random LoRA, inputs, both outputs) shared by the LoRA
    test modules of a pytest process: built and compiled once. Tests must leave the models as they found them."""
    return dict(_tiny_case())
