"""Images and captions to training batches: sources, bad-data handling, buckets, the latent cache, the pipeline.

- `sources`: a kohya-style image folder (or metadata.jsonl/csv), or any TFDS dataset.
- `images`: robust decoding; every bad input is converted or skipped and reported (`DataReport`).
- `buckets`: aspect-ratio buckets (static shapes) and the crop/resize into them.
- `tfds_builders`: folder -> array_record TFDS dataset; the cache's own TFDS dataset.
- `encoding`, `demo`: the frozen VAE / T5 / CLIP on the mesh; tiny generated demo encoders.
- `cache`, `cache_reader`: `flux-jax cache` (resumable, atomic) and `LatentCacheReader`.
- `pipeline`: `make_train_iterator`, grain over the cache, deterministic and resumable across hosts.

The names below are imported on first use, so ``import flux_jax.data.encoding`` (the encoders alone, e.g. on a
benchmark machine without grain or TensorFlow) does not pull in the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Bucket": "buckets",
    "BucketSpec": "buckets",
    "make_buckets": "buckets",
    "nearest_bucket": "buckets",
    "CacheSummary": "cache",
    "build_cache": "cache",
    "resolve_cache_dir": "cache",
    "CachedExample": "cache_reader",
    "LatentCacheReader": "cache_reader",
    "BadExample": "images",
    "DataError": "images",
    "DataReport": "images",
    "decode_caption": "images",
    "decode_image": "images",
    "TrainIterator": "pipeline",
    "make_train_iterator": "pipeline",
    "FolderSource": "sources",
    "RawExample": "sources",
    "TfdsSource": "sources",
    "open_source": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
