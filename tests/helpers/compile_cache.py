"""A session-wide persistent XLA compile cache for test modules that build the same step many times."""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

_KEYS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@contextlib.contextmanager
def persistent_compile_cache(directory: pathlib.Path) -> Iterator[None]:
    """Cache every compiled program under `directory`, then restore jax's settings."""
    saved = {k: getattr(jax.config, k) for k in _KEYS}
    jax.config.update(_KEYS[0], str(directory))
    jax.config.update(_KEYS[1], 0.0)
    jax.config.update(_KEYS[2], 0)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def child_env(cache_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    """The environment of a `flux-jax` child process that compiles what this session's in-process runs compile.

    Same 8 fake CPU devices and matmul precision (so the same programs), the repo importable, and the persistent
    compile cache `cache_dir` shared by the children (only the first one compiles); `extra` is added on top.
    """
    return dict(
        os.environ,
        PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision or "default"),
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        **extra,
    )
