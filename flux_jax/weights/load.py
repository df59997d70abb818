"""`load_flux`: any supported checkpoint -> a Flux NNX model whose parameters are born sharded.

The model is first built abstractly (`nnx.eval_shape`: shapes only, no memory), each parameter's target sharding
is derived from its logical axes, and then every device shard is read straight from the checkpoint with
`jax.make_array_from_callback`: from the memory-mapped safetensors file(s) for PyTorch layouts, from the zarr
arrays (tensorstore) for a Flax checkpoint. No host ever holds more than one shard of a tensor at a time, and on a
pod each host reads only the slices its own devices hold (the callback runs for addressable devices only).

Storage dtype (`dtype=`): fp32, bf16, fp16, or float8_e4m3fn. fp8 keeps only the matmul kernels in fp8 (an fp8
source's bits unchanged; wider sources are rounded with saturation at +-448); biases and norm scales are bf16.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flux_jax.axes import DEFAULT_RULES, Rules
from flux_jax.dtypes import compute_dtype_for, storage_dtype
from flux_jax.errors import CheckpointError
from flux_jax.model.attention import select_attention
from flux_jax.model.config import FluxConfig
from flux_jax.model.flux import Flux
from flux_jax.sharding import state_shardings
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.flax_layout import abstract_model, flax_sources
from flux_jax.weights.fp8 import cast
from flux_jax.weights.handle import FluxCheckpoint
from flux_jax.weights.sources import Source, normalize_index


def _cast(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A fresh C-contiguous copy in `dtype` (see `flux_jax.weights.fp8.cast`: exact from fp8, saturating to fp8).

    Always a copy: on CPU, JAX may alias a suitably aligned NumPy buffer, and the block may be a view of a
    memory map that is closed once loading finishes.
    """
    return cast(block, dtype)


def load_state_into(
    model_abstract: Flux, sources: dict[tuple, Source], *, dtype, mesh: Mesh | None, rules: Rules, where: str
) -> Flux:
    """Fill an abstract model from per-leaf sources, each array created directly in its target sharding."""
    graphdef, abstract_state = nnx.split(model_abstract)
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = state_shardings(abstract_state, mesh, rules)
    flat_abs = dict(abstract_state.flat_state())
    flat_sh = dict(shardings.flat_state())
    leaves = {}
    for path, var in flat_abs.items():
        src = sources.get(path)
        if src is None:
            raise CheckpointError(f"{where}: no tensor for model parameter {'/'.join(map(str, path))}")
        shape = tuple(var.get_value().shape)
        if tuple(src.shape) != shape:
            raise CheckpointError(
                f"{where}: parameter {'/'.join(map(str, path))} has shape {src.shape}, model expects {shape}"
            )
        target = storage_dtype(path, dtype)
        sharding = flat_sh[path].get_value() if isinstance(flat_sh[path], nnx.Variable) else flat_sh[path]
        if not isinstance(sharding, NamedSharding):
            sharding = NamedSharding(mesh, PartitionSpec())

        def read(index, src=src, shape=shape, target=target):
            return _cast(src.read(normalize_index(index, shape)), target)

        leaves[path] = var.replace(jax.make_array_from_callback(shape, sharding, read))
    state = nnx.State.from_flat_path(leaves)
    return nnx.merge(graphdef, state)


def load_flux(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    compute_dtype=None,
    config: FluxConfig | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    attention: str = "xla",
    remat: str = "none",
) -> Flux:
    """Load a Flux transformer (the base weights only; ``flux_jax.load_flux`` also attaches a LoRA file).

    path: a diffusers transformer directory (config.json + sharded or single safetensors), a diffusers single
      file, a BFL single file (incl. ComfyUI's `model.diffusion_model.` prefix; fp32 / bf16 / fp16 / fp8 /
      scaled fp8), or a Flax checkpoint directory (`flux-jax convert`); the layout is detected.
    dtype: parameter storage dtype (fp32, bf16, fp16, or float8_e4m3fn for a frozen base's kernels).
    compute_dtype: activation dtype; defaults to dtype (bf16 when dtype is fp8).
    mesh / rules: where parameters go; each device shard is read straight from the file. Default: one device.
    attention: the kernel (``flux_jax.model.attention``); "auto" picks the one for the mesh's devices.
    """
    if compute_dtype is None:
        compute_dtype = compute_dtype_for(dtype)
    with open_checkpoint(path, config=config) as ckpt:
        model = load_from_checkpoint(
            ckpt, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, rules=rules, attention=attention, remat=remat
        )
    return model


def load_from_checkpoint(ckpt: FluxCheckpoint, *, dtype, compute_dtype, mesh, rules, attention="xla", remat="none"):
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    attention, _ = select_attention(attention, device=device, head_dim=ckpt.config.head_dim, dtype=compute_dtype)
    abstract = abstract_model(ckpt.config, param_dtype=dtype, dtype=compute_dtype, attention=attention, remat=remat)
    sources = ckpt.flax_leaves if ckpt.flax_leaves is not None else flax_sources(ckpt.config, ckpt.tensors)
    return load_state_into(abstract, sources, dtype=dtype, mesh=mesh, rules=rules, where=str(ckpt.path))
