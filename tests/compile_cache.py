"""A session-wide persistent XLA compile cache for test modules that build the same step many times."""

from __future__ import annotations

import contextlib
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
