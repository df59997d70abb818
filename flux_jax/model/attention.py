"""Scaled dot-product attention behind one function with selectable kernels.

- "xla": plain einsum + fp32 softmax; runs everywhere and is the reference the parity tests use.
- "cudnn": cuDNN flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention(implementation="cudnn")`).
- "splash": the Pallas splash-attention kernel on TPU (full, unmasked attention as Flux needs), run per shard of
  the current mesh (``jax.shard_map``): XLA cannot partition a Pallas custom call itself.
- "auto" (``model.attention``'s default): the platform's kernel, splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere,
  falling back to XLA with a warning where that kernel cannot run the shape or dtype (:func:`resolve_attention`).
  The builders (train, sampling, plan) resolve it once for the devices they compile for and build the model with
  the kernel chosen; a model built with "auto" resolves it when traced, for the current mesh's devices.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.errors import FluxJaxError
from flux_jax.sharding import active_mesh, active_spec

log = logging.getLogger(__name__)

AttentionImpl = Literal["xla", "cudnn", "splash"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn", "splash")
CHOICES: tuple[str, ...] = ("auto", *IMPLEMENTATIONS)

# The kernel "auto" picks per platform (``jax.Device.platform``; "cuda" as jax's backend names NVIDIA GPUs).
# Platforms not listed (rocm, METAL, ...) run XLA.
AUTO_KERNELS: dict[str, AttentionImpl] = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "cpu": "xla"}

# Splash's sequence blocks must be multiples of the TPU's 128 lanes (and divide the sequence); these are the
# candidates, largest first (see `splash_padding`).
SPLASH_BLOCKS: tuple[int, ...] = (512, 256, 128)

# q, k, v as splash sees them per shard: examples over the batch axes and heads over the tensor axis, like the
# rest of the model's activations, but the sequence and head_dim whole, since each shard attends over all tokens.
SPLASH_AXES: tuple[str | None, ...] = ("act_batch", None, "act_heads", None)


class AttentionError(FluxJaxError):
    """``model.attention`` names a kernel that cannot run this model on this platform."""


# --------------------------------------------------------------------------------------------------
# Choosing the kernel


def kernel_limitation(
    impl: str, *, platform: str, head_dim: int, dtype: Any, compute_capability: str | None = None
) -> str | None:
    """Why ``impl`` cannot run attention of ``head_dim`` in ``dtype`` on ``platform``, or None when it can.

    splash (jax 0.10.2): TPU only. Its blocks must be multiples of 128 that divide the sequence, which
    `splash_attention` arranges by padding; it takes any head_dim (it pads the lanes itself since jax PR 26676;
    AOT compiles for v5e and v6e from head_dim 1 to 512, fp32 and bf16, confirm it), so the check is the dtype:
    the two compute dtypes (``model.compute_dtype``), the only ones compiled here.
    cudnn: `jax.nn.dot_product_attention`'s cuDNN flash path takes fp16 / bf16 only, and a head_dim that is a
    multiple of 8 and at most 256 on Hopper (compute capability 9.0) or later, 128 before (or when unknown).
    """
    name = jnp.dtype(dtype).name
    if impl == "xla":
        return None
    if impl == "splash":
        if platform != "tpu":
            return f"the splash kernel runs on TPU only, not on {platform}"
        if name not in ("float32", "bfloat16"):
            return f"splash is used for float32 or bfloat16 only, not {name}"
        return None
    if impl == "cudnn":
        if platform not in ("gpu", "cuda"):
            return f"cuDNN attention runs on NVIDIA GPUs only, not on {platform}"
        if name not in ("bfloat16", "float16"):
            return f"cuDNN flash attention takes bfloat16 or float16, not {name} (set model.compute_dtype: bf16)"
        hopper = compute_capability is not None and _version(compute_capability) >= (9, 0)
        most = 256 if hopper else 128
        if head_dim % 8 or head_dim > most:
            return f"cuDNN flash attention needs head_dim a multiple of 8 and at most {most}, not {head_dim}"
        return None
    raise AttentionError(f"unknown attention implementation {impl!r}; choose one of {CHOICES}")


def resolve_attention(
    requested: str, *, platform: str, head_dim: int, dtype: Any, compute_capability: str | None = None
) -> tuple[AttentionImpl, str | None]:
    """The kernel to run for ``model.attention: requested``: (kernel, why "auto" fell back to xla, else None).

    "auto" takes the platform's kernel (``AUTO_KERNELS``) when it can run this head_dim and dtype, else "xla" with
    the reason; an explicit kernel that cannot run is an :class:`AttentionError`. Pure: the caller logs.
    """
    if requested not in CHOICES:
        raise AttentionError(f"unknown attention implementation {requested!r}; choose one of {CHOICES}")
    impl = AUTO_KERNELS.get(platform, "xla") if requested == "auto" else requested
    why = kernel_limitation(impl, platform=platform, head_dim=head_dim, dtype=dtype,
                            compute_capability=compute_capability)  # fmt: skip
    if why is None:
        return impl, None  # type: ignore[return-value]
    if requested == "auto":
        return "xla", f"attention auto: {impl} cannot run here ({why}); using xla"
    raise AttentionError(f"model.attention: {requested} cannot run here: {why}; use auto or xla")


def select_attention(requested: str, *, device: Any, head_dim: int, dtype: Any) -> tuple[AttentionImpl, str | None]:
    """:func:`resolve_attention` for the device a program is compiled for (a mesh's first device), logging a
    fallback once per process and combination."""
    impl, why = resolve_attention(requested, platform=device_platform(device), head_dim=head_dim, dtype=dtype,
                                  compute_capability=getattr(device, "compute_capability", None))  # fmt: skip
    if why is not None:
        _warn_once(why)
    return impl, why


def describe_attention(requested: str, impl: str) -> str:
    """How a plan or log names the choice: "auto -> splash", or just "xla" for an explicit kernel."""
    return f"{requested} -> {impl}" if requested != impl else impl


def device_platform(device: Any) -> str:
    """The platform name `resolve_attention` keys on: the device's, with AMD GPUs (also "gpu" to jax) as "rocm"."""
    platform = device.platform
    if platform == "gpu":
        version = getattr(getattr(device, "client", None), "platform_version", "") or ""
        if "rocm" in version.lower():
            return "rocm"
    return platform


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(text).split(".") if part.isdigit())


def _trace_device() -> Any:
    """The device a model built with "auto" is being compiled for: the current mesh's, else jax's default."""
    mesh = active_mesh()
    return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


# --------------------------------------------------------------------------------------------------
# Running it


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla") -> jax.Array:
    """q, k, v: [B, L, heads, head_dim] -> [B, L, heads * head_dim]. No mask (Flux attends to every token)."""
    b, length, heads, head_dim = q.shape
    if impl == "auto":
        impl, _ = select_attention("auto", device=_trace_device(), head_dim=head_dim, dtype=q.dtype)
    if impl == "xla":
        out = _xla_attention(q, k, v)
    elif impl == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    elif impl == "splash":
        out = splash_attention(q, k, v)
    else:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {CHOICES}")
    return out.reshape(b, length, heads * head_dim)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)


def splash_padding(length: int) -> tuple[int, int]:
    """(padded length, block size) of splash attention over ``length`` tokens.

    The sequence is padded to a multiple of 128 only (the least the kernel takes; the padding is masked by segment
    ids), and the block is the largest of 512 / 256 / 128 that divides the padded length. Flux's square shapes,
    512 text + 1024 image tokens (512 px) = 1536 and 512 + 4096 (1024 px) = 4608, are multiples of 512 and run
    unpadded in 512-blocks: few grid steps and full MXU tiles, while the q / k / v blocks and the f32 scratch stay
    far below the scoped VMEM of v5e / v6e. Of the aspect buckets (``data.buckets``), 11 of 17 at 512 px pad into
    1536 and 15 of 33 at 1024 px into 4608; the others take a smaller block (e.g. 1344..1408 tokens -> 1408 in
    128-blocks, 4256..4352 -> 4352 in 256-blocks) rather than padding up to a multiple of 512, which would add work
    quadratically (1408 -> 1536 is 1.19x the attention FLOPs) for a block size whose gain is unmeasured here.
    """
    padded = 128 * math.ceil(length / 128)
    return padded, next(block for block in SPLASH_BLOCKS if padded % block == 0)


@functools.cache
def _splash_kernel(q_len: int, kv_len: int, heads: int, block: int, interpret: bool):
    """One kernel per shape, built once, holding its block-mask tables as numpy arrays (each trace stages them as
    its own constants). They are made in a thread of its own, outside any trace and mesh: built inside the first
    trace they would be that trace's tracers, which the cache would leak into the next one, and under a mesh of
    compile-only devices (the planner's) they could not be made at all."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_build_splash_kernel, q_len, kv_len, heads, block, interpret).result()


def _build_splash_kernel(q_len: int, kv_len: int, heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(heads)])
    sizes = sk.BlockSizes(
        block_q=block, block_kv_compute=block, block_kv=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    return jax.tree.map(np.asarray, kernel)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Splash attention of q, k, v [B, L, heads, head_dim] -> [B, L, heads, head_dim].

    Under a mesh (``sharding.use_mesh``) the kernel runs once per shard in a ``jax.shard_map``: q, k, v split by
    ``SPLASH_AXES`` (batch over data x fsdp, heads over tensor, as the projections already leave them), so neither
    XLA nor the kernel moves them between chips. Without one it is a plain call. ``interpret``: Pallas's interpreter
    (runs on CPU; for tests).
    """
    local = functools.partial(_splash_local, interpret=interpret)
    placed = active_spec(SPLASH_AXES, q.shape)
    if placed is None:
        return local(q, k, v)
    mesh, spec = placed
    # check_vma off: the Pallas call does not declare how its outputs vary over the mesh axes.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """One shard: splash wants [heads, L, D] per example, L a multiple of its block size, and q pre-scaled."""
    _, length, heads, head_dim = q.shape
    padded, block = splash_padding(length)
    pad = padded - length

    def prep(x):
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x

    qh, kh, vh = prep(q * (1.0 / math.sqrt(head_dim))), prep(k), prep(v)
    if pad:
        # Padded keys must not receive attention: segment 1 (padding) never attends to segment 0 (the tokens).
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

        seg = jnp.concatenate([jnp.zeros((length,), jnp.int32), jnp.ones((pad,), jnp.int32)])
        segment_ids = sk.SegmentIds(q=seg, kv=seg)
    else:
        segment_ids = None
    kernel = _splash_kernel(padded, padded, heads, block, interpret)
    out = jax.vmap(lambda a, bb, c: kernel(a, bb, c, segment_ids=segment_ids))(qh, kh, vh)
    return jnp.transpose(out[:, :, :length], (0, 2, 1, 3))
