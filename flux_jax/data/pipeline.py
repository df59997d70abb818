"""The training input pipeline: grain over the latent cache, deterministic, host-sharded, resumable mid-epoch.

Every host computes the same *global* plan and reads only its rows of each global batch:

- an epoch lists each group (an image at one target side) ``repeats`` times, shuffled with
  ``(shuffle_seed, epoch)``; each appearance picks one record of its group (a crop variant, mirrored or not)
  and draws caption dropout, from the same seeded stream;
- appearances are dealt into per-bucket batches in shuffled order, so one batch never mixes shapes and the
  train step compiles once per bucket; a bucket's last, partial batch is filled by cycling through that
  bucket's appearances of the epoch (static shapes, and nothing is dropped);
- global batch ``k`` is batch ``k mod N`` of epoch ``k div N`` (N, the batches per epoch, depends only on the
  bucket sizes), and host ``p`` of ``P`` takes rows ``[p*b, (p+1)*b)``.

Sharding records per host instead (grain's ``ShardByJaxProcess``) would put different buckets on different
hosts in the same step, which a global jit cannot take. Because the plan depends on the global batch size
only, the iterator state (the index of the next global batch) resumes exactly, on the same or a different
number of hosts, without repeating or skipping an example.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from flux_jax.data.cache import check_built_from, resolve_cache_dir, text_fields
from flux_jax.data.cache_reader import LatentCacheReader
from flux_jax.data.cache_remote import remote_cache
from flux_jax.errors import DataError
from flux_jax.model.latents import image_ids

STATE_VERSION = 1
_NO_END = 2**62  # grain's MapDataset needs a length; training stops by step count, not by running out


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    records: np.ndarray
    """[global_batch] record indices."""
    drop_caption: np.ndarray
    """[global_batch] bool."""
    bucket: int


class EpochPlanner:
    """The global batches of each epoch, a pure function of (seed, epoch) and the cache index."""

    def __init__(
        self,
        record_group: np.ndarray,
        record_bucket: np.ndarray,
        record_repeats: np.ndarray,
        *,
        global_batch: int,
        seed: int,
        caption_dropout: float,
        salt: tuple[int, ...] = (),
    ):
        """``salt``: more words of the shuffle seed, so several datasets of one run draw apart (`mixing`); the
        empty salt is the stream of a single dataset."""
        if global_batch < 1:
            raise DataError(f"global batch must be >= 1, got {global_batch}")
        self.global_batch = global_batch
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.salt = tuple(int(w) for w in salt)
        groups: dict[int, list[int]] = {}
        for record, group in enumerate(record_group):
            groups.setdefault(int(group), []).append(record)
        self.group_ids = np.asarray(sorted(groups), np.int64)
        self.alternatives = [np.asarray(groups[g], np.int64) for g in self.group_ids]
        self.group_bucket = np.asarray([record_bucket[a[0]] for a in self.alternatives], np.int64)
        repeats = np.asarray([record_repeats[a[0]] for a in self.alternatives], np.int64)
        # One entry per appearance of a group in an epoch (kohya repeats).
        self.appearances = np.repeat(np.arange(len(self.alternatives)), repeats)
        per_bucket = np.bincount(self.group_bucket[self.appearances])
        self.batches_per_epoch = int(sum(-(-int(n) // global_batch) for n in per_bucket))
        self._cache: OrderedDict[int, list[PlannedBatch]] = OrderedDict()
        self._lock = threading.Lock()

    def epoch(self, epoch: int) -> list[PlannedBatch]:
        with self._lock:
            if epoch in self._cache:
                self._cache.move_to_end(epoch)
                return self._cache[epoch]
        plan = self._make(epoch)
        with self._lock:
            self._cache[epoch] = plan
            while len(self._cache) > 2:  # prefetch threads straddle at most one epoch boundary
                self._cache.popitem(last=False)
        return plan

    def _make(self, epoch: int) -> list[PlannedBatch]:
        rng = np.random.default_rng([self.seed, *self.salt, epoch])
        order = self.appearances[rng.permutation(len(self.appearances))]
        picks = rng.random(len(order))
        drops = rng.random(len(order)) < self.caption_dropout
        records = np.asarray(
            [self.alternatives[g][int(p * len(self.alternatives[g]))] for g, p in zip(order, picks, strict=True)],
            np.int64,
        )
        buckets = self.group_bucket[order]
        plan: list[PlannedBatch] = []
        pending: dict[int, list[int]] = {}
        for position, bucket in enumerate(buckets):
            members = pending.setdefault(int(bucket), [])
            members.append(position)
            if len(members) == self.global_batch:
                plan.append(PlannedBatch(records[members], drops[members], int(bucket)))
                pending[int(bucket)] = []
        for bucket in sorted(pending):
            members = pending[bucket]
            if members:
                every = np.flatnonzero(buckets == bucket)  # the bucket's appearances, in epoch order
                fill = np.resize(every, self.global_batch - len(members))
                chosen = np.concatenate([members, fill])
                plan.append(PlannedBatch(records[chosen], drops[chosen], bucket))
        assert len(plan) == self.batches_per_epoch
        return plan

    def batch(self, index: int) -> PlannedBatch:
        return self.epoch(index // self.batches_per_epoch)[index % self.batches_per_epoch]


def load_batch(cache: Any, planned: PlannedBatch, lo: int, rows: int) -> dict[str, np.ndarray]:
    """Rows ``[lo, lo + rows)`` of the planned global batch, read from ``cache`` (see `TrainIterator`)."""
    records = planned.records[lo : lo + rows]
    drops = planned.drop_caption[lo : lo + rows]
    examples = cache.read_many(records)
    gh, gw = cache.buckets[planned.bucket].tokens
    text = {}
    # A dropped caption is the empty caption's: its cached states, or (online) its token ids, which the step
    # then encodes into those same states.
    for name in text_fields(cache.online):
        text[name] = np.stack([e[name] for e in examples])
        text[name][drops] = cache.empty[name]
    ids = image_ids(gh, gw)
    return {
        "latents": np.stack([e["latents"] for e in examples]),
        **text,
        "img_ids": np.broadcast_to(ids, (len(records), *ids.shape)).copy(),
        "height": np.full(len(records), gh, np.int32),
        "width": np.full(len(records), gw, np.int32),
        "record": records.copy(),
        "caption_dropped": drops.copy(),
    }


class BatchStream:
    """What both train iterators share (`TrainIterator`, `mixing.MixedTrainIterator`): a grain dataset of batches
    indexed by the global batch number, read ahead by threads, and a JSON-able state (the next batch number, checked
    against the global batch, seed and ``fingerprint`` of the data it was taken on). A subclass sets
    ``global_batch``, ``seed``, ``fingerprint`` and calls `_open` with its dataset."""

    global_batch: int
    seed: int
    fingerprint: str
    _STATE_LABEL = "cache"  # how a state-mismatch message names the fingerprint

    def _open(self, dataset: grain.MapDataset, *, read_threads: int, prefetch: int) -> None:
        self._dataset = dataset
        self._options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch, read_threads))
        self._start(0)

    def _start(self, next_batch: int) -> None:
        self._iter = iter(self._dataset.to_iter_dataset(self._options))
        if next_batch:
            self._iter.set_state({"next_index": next_batch})

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        """JSON-able; store it in the trainer checkpoint next to the step."""
        return {
            "version": STATE_VERSION,
            "next_batch": int(self._iter.get_state()["next_index"]),
            "global_batch": self.global_batch,
            "seed": self.seed,
            "dataset": self.fingerprint,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state` taken on this or another host count; refuses a state that would not
        continue the same sequence (other data, seed or global batch)."""
        try:
            version, next_batch = int(state["version"]), int(state["next_batch"])
            theirs = (int(state["global_batch"]), int(state["seed"]), str(state["dataset"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"invalid data-iterator state {state!r}: {e!r}") from None
        if version != STATE_VERSION:
            raise DataError(f"data-iterator state version {version} is not {STATE_VERSION}")
        ours = (self.global_batch, self.seed, self.fingerprint)
        if theirs != ours:
            raise DataError(
                "the checkpoint's data-iterator state does not belong to this input pipeline "
                f"(global batch, seed, {self._STATE_LABEL}: {theirs} vs {ours}); resuming would repeat or skip "
                "examples"
            )
        self._start(next_batch)


def batch_numbers(load: Callable[[int], dict[str, np.ndarray]]) -> grain.MapDataset:
    """``load(n)`` for every global batch number n (endless: the epochs follow one another)."""
    return grain.MapDataset.range(0, _NO_END).map(load)


class TrainIterator(BatchStream):
    """Yields this host's batches: dicts of numpy arrays, one bucket per batch.

    ``latents`` [b, L, 64] bf16, ``t5`` [b, Lt, D] bf16, ``clip`` [b, D'] float32 (from an online cache instead
    ``t5_ids`` [b, Lt] and ``clip_ids`` [b, 77] int32), ``img_ids`` [b, L, 3] float32,
    ``height`` / ``width`` [b] int32 (the token grid), ``record`` [b] int64 (cache record, for reports),
    ``caption_dropped`` [b] bool. `get_state` / `set_state` give and take a JSON-able dict.
    """

    def __init__(
        self,
        cache: LatentCacheReader,
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
        self.cache = cache
        self.global_batch = global_batch
        self.rows = global_batch // process_count
        self.process_index = process_index
        self.planner = EpochPlanner(
            cache.record_group,
            cache.record_bucket,
            cache.record_repeats,
            global_batch=global_batch,
            seed=seed,
            caption_dropout=caption_dropout,
        )
        self.seed = seed
        self.fingerprint = cache.fingerprint
        self._open(batch_numbers(self._load), read_threads=read_threads, prefetch=prefetch)

    @property
    def batches_per_epoch(self) -> int:
        return self.planner.batches_per_epoch

    def _load(self, index: int) -> dict[str, np.ndarray]:
        return load_batch(self.cache, self.planner.batch(index), self.process_index * self.rows, self.rows)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.get_state()["next_batch"] // self.batches_per_epoch


def check_hosts(global_batch: int, process_index: int, process_count: int) -> None:
    """This host's place among ``process_count`` and the global batch splitting evenly over them."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} does not split over {process_count} hosts")


def open_cache(cfg: Any) -> LatentCacheReader:
    """``cfg``'s complete latent cache, checked: a damaged one is refused (`LatentCacheReader`), and so is one built
    from other data or settings (`cache.check_built_from`). A bucket cache is read from this host's local copy,
    mirrored first (its settings checked before any download)."""
    cache_dir = resolve_cache_dir(cfg)
    remote = remote_cache(cfg)
    if remote is not None:
        remote.mirror(check=lambda info: check_built_from(cfg, remote.url, info))
    cache = LatentCacheReader(cache_dir)
    check_built_from(cfg, cache_dir, cache.info)
    return cache


def make_train_iterator(cfg: Any, *, process_index: int, process_count: int, batch_size_per_host: int) -> TrainIterator:
    """The iterator over ``cfg``'s complete latent cache (`resolve_cache_dir`; built by `flux-jax cache`, or by the
    trainer's `inputs.prepare_train_data` just before). Refuses a damaged cache (`LatentCacheReader`) and one
    built from other data or settings (`cache.check_built_from`)."""
    return TrainIterator(
        open_cache(cfg),
        global_batch=batch_size_per_host * process_count,
        process_index=process_index,
        process_count=process_count,
        seed=cfg.data.shuffle_seed,
        caption_dropout=cfg.data.caption_dropout,
        read_threads=cfg.data.read_threads,
    )
