"""Several datasets trained together (``data.datasets``) and the held-out split (``data.holdout``).

- Each dataset is a *view* of the run config (`dataset_views`): the ``data`` section with that dataset's path,
  source and caption settings, and its own cache dir. Everything that builds, checks or reads one cache
  (`cache.build_cache`, `build_missing_cache`, `check_built_from`, `LatentCacheReader`) runs per view unchanged, so
  a config without ``datasets`` is its own single view and nothing about its cache changes.
- Training (`MixedTrainIterator`) plans each dataset's batches as `pipeline.TrainIterator` does (an
  `EpochPlanner` per dataset, its repeats multiplied by the dataset's ``repeats``) and interleaves the datasets'
  batch streams by ``weight`` with grain's ``MapDataset.mix``: global batch ``k`` is batch ``i`` of dataset ``j``,
  ``(j, i)`` a pure function of ``k`` and the weights. So one batch is one dataset's and one bucket's (the step
  compiles per bucket shape, and every host takes rows of the same batch), the weights set the share of batches
  (hence of examples) exactly up to rounding, and the iterator state stays one integer (the next global batch),
  which resumes exactly on any host count. Mixing whole batches rather than examples is what keeps a batch one
  bucket when the datasets' bucket tables differ; across steps the datasets interleave.
- The held-out split: an example (all its records: sides, crops, flips) is held out when a hash of its key (the
  file or shard name recorded in cache.json) falls below ``holdout`` (of 2^64), or is among the ``holdout_count``
  smallest of its dataset; training gives its records zero repeats, and the validation loss reads exactly those
  records from the same caches (`held_out_source`): nothing is encoded twice, and an example keeps its side when
  others are added or removed (with ``holdout_count``, an added example of a smaller hash can displace one).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from flux_jax.data.cache import resolve_cache_dir
from flux_jax.data.examples import BatchShape, Example
from flux_jax.data.pipeline import BatchStream, EpochPlanner, batch_numbers, check_hosts, load_batch, open_cache
from flux_jax.errors import ConfigError, DataError
from flux_jax.run_config import RunConfig
from flux_jax.storage import is_remote

_HOLDOUT_SALT = b"flux_jax.holdout\0"


# --------------------------------------------------------------------------------------------------
# The datasets of a config


def dataset_views(cfg: RunConfig) -> list[RunConfig]:
    """One config per dataset: ``cfg`` itself without ``data.datasets``, else ``cfg`` with the ``data`` section
    narrowed to each dataset (its path, source, feature keys, caption file and cache dir). Two datasets whose caches
    would be one directory are a config error naming them."""
    d = cfg.data
    if not d.datasets:
        return [cfg]
    views = []
    for i, ds in enumerate(d.datasets):
        cache_dir = ds.cache_dir
        if cache_dir is None and d.cache_dir:
            cache_dir = f"{d.cache_dir.rstrip('/')}/{i}"
        remote = is_remote(cache_dir or "")
        # A bucket cache's local copy (data.cache_local_dir) gets one directory per dataset too.
        local_dir = f"{d.cache_local_dir.rstrip('/')}/{i}" if remote and d.cache_local_dir else None
        data = dataclasses.replace(
            d,
            path=ds.path,
            source=ds.source if ds.source is not None else d.source,
            split=ds.split if ds.split is not None else d.split,
            tfds_data_dir=ds.tfds_data_dir if ds.tfds_data_dir is not None else d.tfds_data_dir,
            image_key=ds.image_key if ds.image_key is not None else d.image_key,
            caption_key=ds.caption_key if ds.caption_key is not None else d.caption_key,
            caption_ext=ds.caption_ext if ds.caption_ext is not None else d.caption_ext,
            cache_dir=cache_dir,
            cache_local_dir=local_dir,
            datasets=(),
        )
        views.append(dataclasses.replace(cfg, data=data))
    seen: dict[str, int] = {}
    for i, view in enumerate(views):
        where = str(resolve_cache_dir(view))
        if where in seen:
            raise ConfigError(
                f"data.datasets[{seen[where]}] and data.datasets[{i}] would share the latent cache {where}; set "
                f"data.datasets[{i}].cache_dir (or data.cache_dir: each dataset then gets <cache_dir>/<index>)",
                key=f"data.datasets[{i}].cache_dir",
            )
        seen[where] = i
    return views


def uses_mixing(cfg: RunConfig) -> bool:
    """Whether training needs `MixedTrainIterator`: several datasets, or a held-out split to leave out. A plain
    one-dataset config keeps `pipeline.TrainIterator` (the very batches it always had)."""
    return bool(cfg.data.datasets) or cfg.data.has_holdout


# --------------------------------------------------------------------------------------------------
# The held-out split


def key_hash(key: str) -> int:
    """A 64-bit hash of an example's key, the same on every machine and run."""
    return int.from_bytes(hashlib.blake2b(_HOLDOUT_SALT + key.encode("utf-8"), digest_size=8).digest(), "little")


def record_keys(cache: Any) -> list[str]:
    """The example key of every record of a complete cache (cache.json's ``records.key``)."""
    keys = ((getattr(cache, "info", None) or {}).get("records") or {}).get("key")
    if keys is None:
        raise DataError(
            f"{cache.path}: this cache was written before cache.json listed each record's example, which "
            "data.holdout needs to tell held-out examples apart; rebuild it with `flux-jax cache --force`"
        )
    if len(keys) != len(cache.record_bucket):
        n = len(cache.record_bucket)
        raise DataError(f"{cache.path}: cache.json lists {len(keys)} record keys for {n} records")
    return [str(k) for k in keys]


def held_out(keys: Sequence[str], *, fraction: float = 0.0, count: int = 0) -> np.ndarray:
    """[records] bool: the records whose example is held out (see the module docstring)."""
    hashes = {k: key_hash(k) for k in dict.fromkeys(keys)}
    if count:
        chosen = set(sorted(hashes, key=lambda k: (hashes[k], k))[:count])
    else:
        limit = int(fraction * 2**64)
        chosen = {k for k, h in hashes.items() if h < limit}
    return np.asarray([k in chosen for k in keys], bool)


def holdout_mask(cfg: RunConfig, cache: Any) -> np.ndarray:
    """[records] bool of ``cache`` under ``cfg.data``'s holdout (all False without one)."""
    d = cfg.data
    if not d.has_holdout:
        return np.zeros(len(cache.record_bucket), bool)
    return held_out(record_keys(cache), fraction=d.holdout, count=d.holdout_count)


class RecordSubset:
    """Some records of one or more caches, as an ``ExampleSource`` (`examples.BatchIterator`, `check_fits`,
    the validation loss): index ``i`` is the ``i``-th listed ``(cache, record)``."""

    def __init__(self, parts: Sequence[tuple[Any, np.ndarray]], label: str):
        self.parts = [(cache, np.asarray(records, np.int64)) for cache, records in parts]
        self.label = label
        self._where = [(j, int(r)) for j, (_, records) in enumerate(self.parts) for r in records]
        self.online = any(getattr(cache, "online", False) for cache, _ in self.parts)

    def __len__(self) -> int:
        return len(self._where)

    def records(self) -> list[tuple[int, int]]:
        """(part, record) of every index."""
        return list(self._where)

    def batch_shape(self, index: int) -> BatchShape:
        j, r = self._where[index]
        return self.parts[j][0].batch_shape(r)

    def read(self, index: int) -> Example:
        j, r = self._where[index]
        return self.parts[j][0].read(r)

    def read_many(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self.parts[j][0].read_many([r])[0] for j, r in (self._where[int(i)] for i in indices)]

    def describe(self) -> str:
        inner = "; ".join(f"{len(records)} of {cache.describe()}" for cache, records in self.parts)
        return f"{self.label}: {len(self)} records ({inner})"


def held_out_source(cfg: RunConfig) -> RecordSubset:
    """The held-out records of every dataset's (complete) cache: what the validation loss reads."""
    parts = []
    for view in dataset_views(cfg):
        cache = open_cache(view)
        parts.append((cache, np.flatnonzero(holdout_mask(cfg, cache))))
    source = RecordSubset(parts, "held-out split (data.holdout)")
    if not len(source):
        raise DataError(f"data.holdout holds out no example of {source.describe()}; raise it")
    return source


# --------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class MixPart:
    """One dataset of a mix: its cache, the repeats of each record (0 = not trained: held out) and its weight
    (None: its batches per pass, so every dataset finishes its passes with the others: the datasets concatenated)."""

    cache: Any
    repeats: np.ndarray
    weight: float | None = None


class MixedTrainIterator(BatchStream):
    """`pipeline.TrainIterator` over several datasets (see the module docstring); the same batch dicts, plus
    ``dataset`` [b] int32 (the index of the dataset of every row), and the same state, whose ``dataset`` is a
    fingerprint of all caches, weights and per-record repeats (a state of another mix is refused)."""

    _STATE_LABEL = "datasets"

    def __init__(
        self,
        parts: Sequence[MixPart],
        *,
        global_batch: int,
        process_index: int,
        process_count: int,
        seed: int,
        caption_dropout: float,
        read_threads: int = 4,
        prefetch: int = 2,
    ):
        check_hosts(global_batch, process_index, process_count)
        if not parts:
            raise DataError("no datasets to train on")
        self.parts = list(parts)
        self.global_batch = global_batch
        self.rows = global_batch // process_count
        self.process_index = process_index
        self.seed = seed
        self.planners = []
        for j, part in enumerate(self.parts):
            if not (np.asarray(part.repeats) > 0).any():
                where = getattr(part.cache, "path", f"dataset {j}")
                raise DataError(f"{where}: every example is held out (data.holdout); nothing left to train on")
            self.planners.append(
                EpochPlanner(
                    part.cache.record_group,
                    part.cache.record_bucket,
                    part.repeats,
                    global_batch=global_batch,
                    seed=seed,
                    caption_dropout=caption_dropout,
                    # Dataset 0 draws what it draws alone; the others draw apart from it (and from each other).
                    salt=() if j == 0 else (j,),
                )
            )
        self.weights = [
            float(p.weight) if p.weight is not None else float(planner.batches_per_epoch)
            for p, planner in zip(self.parts, self.planners, strict=True)
        ]
        streams = [batch_numbers(functools.partial(self._load, j)) for j in range(len(self.parts))]
        digest = hashlib.sha256()
        for part, weight in zip(self.parts, self.weights, strict=True):
            digest.update(json.dumps([str(part.cache.fingerprint), weight]).encode())
            digest.update(np.asarray(part.repeats, np.int64).tobytes())
        self.fingerprint = "mix-" + digest.hexdigest()[:32]
        # Batch-level mixing: a pure function of the global batch index (grain interleaves by the weights).
        mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, self.weights)
        self._open(mixed, read_threads=read_threads, prefetch=prefetch)

    def _load(self, j: int, index: int) -> dict[str, np.ndarray]:
        batch = load_batch(
            self.parts[j].cache, self.planners[j].batch(index), self.process_index * self.rows, self.rows
        )
        batch["dataset"] = np.full(self.rows, j, np.int32)
        return batch


def make_mixed_iterator(
    cfg: RunConfig, *, process_index: int, process_count: int, batch_size_per_host: int
) -> tuple[MixedTrainIterator, RecordSubset]:
    """The iterator over every dataset's cache (without their held-out examples) and the trained records."""
    views = dataset_views(cfg)
    caches = [open_cache(view) for view in views]  # pipeline.open_cache
    multipliers = [ds.repeats for ds in cfg.data.datasets] or [1]
    parts, trained = [], []
    for cache, multiplier in zip(caches, multipliers, strict=True):
        repeats = np.asarray(cache.record_repeats, np.int64) * multiplier
        repeats[holdout_mask(cfg, cache)] = 0
        trained.append((cache, np.flatnonzero(repeats)))
        parts.append((cache, repeats))
    weights = [ds.weight for ds in cfg.data.datasets] or [None]
    iterator = MixedTrainIterator(
        [MixPart(cache, repeats, weight) for (cache, repeats), weight in zip(parts, weights, strict=True)],
        global_batch=batch_size_per_host * process_count,
        process_index=process_index,
        process_count=process_count,
        seed=cfg.data.shuffle_seed,
        caption_dropout=cfg.data.caption_dropout,
        read_threads=cfg.data.read_threads,
    )
    return iterator, RecordSubset(trained, "training datasets")


def first_cache_dir(cfg: RunConfig) -> Path:
    """The first dataset's cache dir (where generated demo encoders live for the whole run)."""
    return resolve_cache_dir(dataset_views(cfg)[0])
