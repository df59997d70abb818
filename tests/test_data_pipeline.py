"""The grain input pipeline: one bucket per batch, determinism, epochs, and resume across 1 and 2 hosts.

These tests run the real `TrainIterator` over an in-memory stand-in for the latent cache whose records encode
their own index, so every row of every batch can be traced back to the record it came from.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from flux_jax.data.buckets import Bucket
from flux_jax.data.pipeline import EpochPlanner, TrainIterator
from flux_jax.errors import DataError

T5_LEN, T5_DIM, CLIP_DIM = 3, 4, 5
BUCKETS = (Bucket(64, 64), Bucket(128, 64), Bucket(64, 128))


class FakeCache:
    """Groups of records (alternatives) per bucket with kohya repeats; record i's tensors are filled with i."""

    def __init__(self, groups: list[tuple[int, int, int]]):
        """groups: (bucket, repeats, alternatives) per group."""
        self.buckets = BUCKETS
        bucket, group, repeats = [], [], []
        for g, (b, r, alts) in enumerate(groups):
            for _ in range(alts):
                bucket.append(b)
                group.append(g)
                repeats.append(r)
        self.record_bucket = np.asarray(bucket)
        self.record_group = np.asarray(group)
        self.record_repeats = np.asarray(repeats)
        self.fingerprint = "fake-" + str(len(bucket))
        self.online = False
        self.empty = {"t5": np.full((T5_LEN, T5_DIM), -1.0, np.float32), "clip": np.full((CLIP_DIM,), -1.0, np.float32)}
        self.reads = 0

    def read_many(self, indices):
        self.reads += len(indices)
        out = []
        for i in indices:
            gh, gw = self.buckets[self.record_bucket[i]].tokens
            out.append(
                {
                    "latents": np.full((gh * gw, 64), i, np.float32),
                    "t5": np.full((T5_LEN, T5_DIM), i, np.float32),
                    "clip": np.full((CLIP_DIM,), i, np.float32),
                }
            )
        return out


# 11 groups: 6 in bucket 0 (one repeated 3x), 4 in bucket 1 (two with 2 crop/flip alternatives), 1 in bucket 2.
GROUPS = [(0, 1, 1)] * 5 + [(0, 3, 1)] + [(1, 1, 2), (1, 1, 1), (1, 2, 2), (1, 1, 1)] + [(2, 1, 1)]


def iterator(cache: FakeCache, *, batch: int = 4, host: int = 0, hosts: int = 1, seed: int = 0, dropout: float = 0.0):
    return TrainIterator(
        cache,
        global_batch=batch,
        process_index=host,
        process_count=hosts,
        seed=seed,
        caption_dropout=dropout,
        read_threads=2,
    )


def take(it: TrainIterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def test_batches_hold_one_bucket_with_matching_shapes() -> None:
    cache = FakeCache(GROUPS)
    it = iterator(cache)
    for batch in take(it, 2 * it.batches_per_epoch):
        buckets = {int(cache.record_bucket[r]) for r in batch["record"]}
        assert len(buckets) == 1
        gh, gw = cache.buckets[buckets.pop()].tokens
        assert batch["latents"].shape == (4, gh * gw, 64)
        assert batch["t5"].shape == (4, T5_LEN, T5_DIM) and batch["clip"].shape == (4, CLIP_DIM)
        assert batch["img_ids"].shape == (4, gh * gw, 3)
        np.testing.assert_array_equal(batch["img_ids"][0, gw + 1], [0, 1, 1])  # (0, row, col), row-major
        assert (batch["height"] == gh).all() and (batch["width"] == gw).all()
        # Each row really is the record it says it is.
        np.testing.assert_array_equal(batch["latents"][:, 0, 0], batch["record"])
        np.testing.assert_array_equal(batch["clip"][:, 0], batch["record"])


def test_an_epoch_shows_every_group_its_repeats_and_pads_only_partial_batches() -> None:
    cache = FakeCache(GROUPS)
    planner = EpochPlanner(
        cache.record_group, cache.record_bucket, cache.record_repeats, global_batch=4, seed=3, caption_dropout=0.0
    )
    appearances = {0: 5 + 3, 1: 1 + 1 + 2 + 1, 2: 1}  # per bucket
    assert planner.batches_per_epoch == sum(-(-n // 4) for n in appearances.values())  # 2 + 2 + 1
    for epoch in range(3):
        plan = planner.epoch(epoch)
        seen = Counter(int(cache.record_group[r]) for b in plan for r in b.records)
        for g, (_, repeats, _) in enumerate(GROUPS):
            assert seen[g] >= repeats
        # Extra appearances only fill a bucket's last, partial batch: bucket 0 (8 appearances) gets none.
        slots = Counter(b.bucket for b in plan for _ in b.records)
        assert slots == {b: 4 * -(-n // 4) for b, n in appearances.items()}
        assert [seen[g] for g in range(6)] == [1, 1, 1, 1, 1, 3]
    assert [list(b.records) for b in planner.epoch(0)] != [list(b.records) for b in planner.epoch(1)]


def test_alternatives_are_picked_per_appearance() -> None:
    cache = FakeCache(GROUPS)
    planner = EpochPlanner(
        cache.record_group, cache.record_bucket, cache.record_repeats, global_batch=4, seed=0, caption_dropout=0.0
    )
    group6 = set(np.flatnonzero(cache.record_group == 6))
    picked = {int(r) for e in range(20) for b in planner.epoch(e) for r in b.records if r in group6}
    assert picked == group6  # both crops/flips get used over epochs


def test_same_seed_same_batches_other_seed_other_order() -> None:
    a = [b["record"] for b in take(iterator(FakeCache(GROUPS), seed=5), 12)]
    b = [b["record"] for b in take(iterator(FakeCache(GROUPS), seed=5), 12)]
    c = [b["record"] for b in take(iterator(FakeCache(GROUPS), seed=6), 12)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, c, strict=True))


def test_two_hosts_split_the_single_host_batches() -> None:
    one = take(iterator(FakeCache(GROUPS), batch=4), 12)  # more than two epochs
    hosts = [take(iterator(FakeCache(GROUPS), batch=4, host=h, hosts=2), 12) for h in range(2)]
    for k, batch in enumerate(one):
        parts = [hosts[h][k] for h in range(2)]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key], err_msg=f"{k} {key}")
        assert parts[0]["latents"].shape[0] == 2


@pytest.mark.parametrize("hosts_before,hosts_after", [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_resume_mid_epoch_continues_without_repeats_or_skips(hosts_before: int, hosts_after: int) -> None:
    def run(hosts: int, n: int, state=None, skip: int = 0) -> tuple[list[np.ndarray], list]:
        its = [iterator(FakeCache(GROUPS), host=h, hosts=hosts, seed=1) for h in range(hosts)]
        if state is not None:
            for it in its:
                it.set_state(state)
        rows = [np.concatenate([next(it)["record"] for it in its]) for _ in range(n)]
        return rows, [it.get_state() for it in its]

    reference, _ = run(1, 9)
    stop = 3  # mid-epoch: the plan has 5 batches per epoch
    first, states = run(hosts_before, stop)
    assert all(s == states[0] for s in states)  # every host agrees on the state
    state = json.loads(json.dumps(states[0]))  # what a checkpoint stores
    assert state["next_batch"] == stop
    rest, _ = run(hosts_after, 9 - stop, state)
    for got, want in zip(first + rest, reference, strict=True):
        np.testing.assert_array_equal(got, want)


def test_state_survives_prefetch() -> None:
    it = iterator(FakeCache(GROUPS))
    next(it)
    next(it)
    assert it.get_state()["next_batch"] == 2  # batches read ahead by grain's threads are not counted
    assert it.epoch == 0
    take(it, it.batches_per_epoch)
    assert it.epoch == 1


def test_set_state_refuses_another_pipeline() -> None:
    state = iterator(FakeCache(GROUPS)).get_state()
    with pytest.raises(DataError, match="global batch"):
        iterator(FakeCache(GROUPS), batch=8).set_state(state)
    with pytest.raises(DataError, match="does not belong"):
        iterator(FakeCache(GROUPS), seed=9).set_state(state)
    with pytest.raises(DataError, match="does not belong"):
        iterator(FakeCache(GROUPS[:-1])).set_state(state)
    with pytest.raises(DataError, match="invalid"):
        iterator(FakeCache(GROUPS)).set_state({"next_batch": 1})


def test_host_arguments_are_checked() -> None:
    with pytest.raises(DataError, match="split over 3 hosts"):
        iterator(FakeCache(GROUPS), batch=4, hosts=3)
    with pytest.raises(DataError, match="process_index"):
        iterator(FakeCache(GROUPS), host=2, hosts=2)


def test_caption_dropout_swaps_in_the_empty_caption() -> None:
    cache = FakeCache(GROUPS)
    batches = take(iterator(cache, dropout=0.3, seed=2), 60)
    dropped = np.concatenate([b["caption_dropped"] for b in batches])
    assert 0.2 < dropped.mean() < 0.4
    for b in batches:
        d = b["caption_dropped"]
        assert (b["t5"][d] == -1).all() and (b["clip"][d] == -1).all()
        np.testing.assert_array_equal(b["t5"][~d][:, 0, 0], b["record"][~d])
        np.testing.assert_array_equal(b["latents"][:, 0, 0], b["record"])  # images are never dropped
    assert not np.concatenate([b["caption_dropped"] for b in take(iterator(cache), 10)]).any()
