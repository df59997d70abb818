"""The dtype vocabulary of configs and command lines, and how a frozen base stores each parameter.

Every user-facing dtype name (``model.base_dtype``, ``lora.dtype``, ``encoders.dtype``, ``--dtype`` of convert,
export and merge) means the entry of ``DTYPES``; each user of a subset lists its allowed names (e.g. the LoRA tools
take no fp8) and resolves them through :func:`parse_dtype`. numpy dtypes work as JAX dtypes, so model and data
code use the same table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from flux_jax.errors import FluxJaxError

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)

DTYPES: Mapping[str, np.dtype] = {
    "fp32": np.dtype(np.float32),
    "bf16": BF16,
    "fp16": np.dtype(np.float16),
    "fp8": FP8,
}
# What LoRA files and the data cache store: fp8 has too little precision for adapters or embeddings.
FLOAT_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")


def parse_dtype(name: str, choices: Iterable[str] = DTYPES) -> np.dtype:
    """The dtype called ``name``; an error naming the choices when it is not one of them."""
    choices = tuple(choices)
    if name not in choices:
        raise FluxJaxError(f"unknown dtype {name!r}; choose one of {', '.join(choices)}")
    return DTYPES[name]


def dtype_name(dtype, choices: Iterable[str] = DTYPES) -> str:
    """The table name of ``dtype`` (``np.float32`` -> "fp32")."""
    choices = tuple(choices)
    for name in choices:
        if np.dtype(dtype) == DTYPES[name]:
            return name
    raise FluxJaxError(f"unsupported dtype {np.dtype(dtype)}; choose one of {', '.join(choices)}")


def storage_dtype(leaf_path: tuple, base_dtype) -> np.dtype:
    """The stored dtype of one base parameter: fp8 applies to matmul kernels only; biases and norm scales stay
    bf16 (they are tiny, and the fp8 formats Flux files use keep them wide too)."""
    if np.dtype(base_dtype) == FP8 and leaf_path[-1] != "kernel":
        return BF16
    return np.dtype(base_dtype)


def compute_dtype_for(storage: np.dtype) -> np.dtype:
    """The default activation dtype for a storage dtype: itself, except bf16 for fp8 (no fp8 arithmetic)."""
    return BF16 if np.dtype(storage) == FP8 else np.dtype(storage)
