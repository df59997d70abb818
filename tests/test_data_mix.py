"""Several datasets mixed by weight, per-dataset repeats and caption settings, and the held-out split.

The mixing and resume tests run `MixedTrainIterator` over the in-memory caches of tests/test_data_pipeline.py (each
record's tensors hold its index); the config-to-batches tests build two tiny real caches with the demo encoders,
through `flux-jax train`'s own automatic caching (`prepare_train_data`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_jax.data.cache_reader import LatentCacheReader
from flux_jax.data.inputs import open_train_data, prepare_train_data
from flux_jax.data.mixing import (
    MixedTrainIterator,
    MixPart,
    dataset_views,
    held_out,
    held_out_source,
    holdout_mask,
    uses_mixing,
)
from flux_jax.data.pipeline import TrainIterator, make_train_iterator
from flux_jax.errors import ConfigError, DataError
from flux_jax.run_config import from_dict, load_config
from tests.test_data_pipeline import GROUPS, FakeCache

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
REAL = "data.synthetic=false"

# The sha256 of every key of the first 12 batches of `TrainIterator(FakeCache(GROUPS), global_batch=4, seed=3,
# caption_dropout=0.3)`, taken with the code before data.datasets existed (commit 68d0a13).
BEFORE = "df9cc70c38a473d14fb7d53dc463df368a732ad4aa300c842f9bffdc10903ba3"


def digest(batches, skip=("dataset",)) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            if k not in skip:
                h.update(k.encode())
                h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()


def mixed(parts, *, batch=4, host=0, hosts=1, seed=0, dropout=0.0) -> MixedTrainIterator:
    return MixedTrainIterator(
        parts,
        global_batch=batch,
        process_index=host,
        process_count=hosts,
        seed=seed,
        caption_dropout=dropout,
        read_threads=2,
    )


def take(it, n):
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# In-memory caches


def test_a_single_dataset_gives_the_batches_it_gave_before() -> None:
    plain = TrainIterator(
        FakeCache(GROUPS), global_batch=4, process_index=0, process_count=1, seed=3, caption_dropout=0.3
    )
    assert digest(take(plain, 12)) == BEFORE
    # A one-dataset mix without holdout (`data.datasets` of one entry) draws the same batches.
    cache = FakeCache(GROUPS)
    one = take(mixed([MixPart(cache, cache.record_repeats)], seed=3, dropout=0.3), 12)
    assert digest(one) == BEFORE and all((b["dataset"] == 0).all() for b in one)
    # And a config without datasets or holdout keeps the plain iterator and its cache.
    cfg = load_config(TINY, [REAL, "data.path=photos"])
    assert not uses_mixing(cfg) and dataset_views(cfg) == [cfg]


def two_caches() -> tuple[FakeCache, FakeCache]:
    a = FakeCache(GROUPS)  # 13 records in 3 buckets, 5 batches of 4 per pass
    b = FakeCache([(0, 1, 1)] * 3 + [(1, 1, 1)] * 6)  # 9 records, 3 batches per pass
    b.fingerprint = "fake-b"
    return a, b


def test_two_datasets_mixed_3_to_1_draw_batches_in_that_proportion() -> None:
    """grain's `MapDataset.mix` interleaves by the weights deterministically (no sampling noise): after k batches
    dataset j has had k * w_j / sum(w) of them, rounded, so over N batches each count is within 1 of its share
    (3:1 is represented exactly by grain's integer proportions 300:100). Asserted: within 1 batch (4 examples)."""
    a, b = two_caches()
    it = mixed([MixPart(a, a.record_repeats, 3.0), MixPart(b, b.record_repeats, 1.0)], seed=1)
    n = 400
    batches = take(it, n)
    counts = Counter(int(batch["dataset"][0]) for batch in batches)
    assert abs(counts[0] - 0.75 * n) <= 1 and abs(counts[1] - 0.25 * n) <= 1, counts
    examples = Counter(int(d) for batch in batches for d in batch["dataset"])
    assert abs(examples[0] / (4 * n) - 0.75) <= 4 / (4 * n)
    caches = (a, b)
    per_dataset: dict[int, list] = {0: [], 1: []}
    for batch in batches:
        (j,) = set(batch["dataset"].tolist())  # one dataset per batch ...
        buckets = {int(caches[j].record_bucket[r]) for r in batch["record"]}
        assert len(buckets) == 1  # ... and one bucket, so one shape
        gh, gw = caches[j].buckets[buckets.pop()].tokens
        assert batch["latents"].shape == (4, gh * gw, 64)
        np.testing.assert_array_equal(batch["latents"][:, 0, 0], batch["record"])
        per_dataset[j].append(batch["record"])
    # Each dataset's batches are its own planner's, in order: every pass shows each group its repeats.
    for j, planner in enumerate(it.planners):
        for i, records in enumerate(per_dataset[j]):
            np.testing.assert_array_equal(records, planner.batch(i).records)
        whole = [int(r) for records in per_dataset[j][: 5 * planner.batches_per_epoch] for r in records]
        groups = Counter(int(caches[j].record_group[r]) for r in whole)
        assert set(groups) == set(caches[j].record_group.tolist())


def test_unweighted_datasets_are_concatenated() -> None:
    a, b = two_caches()
    it = mixed([MixPart(a, a.record_repeats), MixPart(b, b.record_repeats * 2)])
    assert [p.batches_per_epoch for p in it.planners] == [5, 5]  # b's repeats doubled: 18 appearances
    assert it.weights == [5.0, 5.0]
    batches = take(it, 100)
    assert Counter(int(x["dataset"][0]) for x in batches) == {0: 50, 1: 50}
    # Per-dataset repeats: each of b's groups appears twice per pass.
    seen = Counter(int(b.record_group[r]) for x in batches[:10] if x["dataset"][0] == 1 for r in x["record"])
    assert all(v >= 2 for v in seen.values()) and len(seen) == 9


@pytest.mark.parametrize("hosts_before,hosts_after", [(1, 1), (1, 2), (2, 1)])
def test_mixing_is_deterministic_and_resumes_bit_exact(hosts_before: int, hosts_after: int) -> None:
    def parts():
        a, b = two_caches()
        return [MixPart(a, a.record_repeats, 3.0), MixPart(b, b.record_repeats, 1.0)]

    def run(hosts, n, state=None):
        its = [mixed(parts(), host=h, hosts=hosts, seed=4, dropout=0.25) for h in range(hosts)]
        if state is not None:
            for it in its:
                it.set_state(state)
        out = []
        for _ in range(n):
            halves = [next(it) for it in its]
            out.append({k: np.concatenate([h[k] for h in halves]) for k in halves[0]})
        return out, [it.get_state() for it in its]

    reference, _ = run(1, 23)
    again, _ = run(1, 23)
    assert digest(reference, skip=()) == digest(again, skip=())
    first, states = run(hosts_before, 9)
    assert all(s == states[0] for s in states)
    state = json.loads(json.dumps(states[0]))  # what a checkpoint stores
    assert state["next_batch"] == 9
    rest, _ = run(hosts_after, 14, state)
    assert digest(first + rest, skip=()) == digest(reference, skip=())


def test_a_state_of_another_mix_is_refused() -> None:
    a, b = two_caches()
    state = mixed([MixPart(a, a.record_repeats, 3.0), MixPart(b, b.record_repeats, 1.0)]).get_state()
    with pytest.raises(DataError, match="does not belong"):
        mixed([MixPart(a, a.record_repeats, 2.0), MixPart(b, b.record_repeats, 1.0)]).set_state(state)
    with pytest.raises(DataError, match="does not belong"):
        mixed([MixPart(a, a.record_repeats, 3.0), MixPart(b, b.record_repeats * 2, 1.0)]).set_state(state)
    with pytest.raises(DataError, match="every example is held out"):
        mixed([MixPart(a, a.record_repeats * 0, 3.0)])


def test_holdout_is_by_key_hash_and_stable_when_examples_are_added() -> None:
    keys = [f"img{i:04d}.png" for i in range(2000)]
    mask = held_out(keys, fraction=0.1)
    # Binomial(2000, 0.1): mean 200, sd 13.4; 5 sd either side.
    assert 133 <= mask.sum() <= 267
    more = held_out(keys + [f"new{i}.png" for i in range(500)], fraction=0.1)
    np.testing.assert_array_equal(more[: len(keys)], mask)  # added examples move none
    # Records of one example (sides, crops, flips) go together.
    records = held_out(["a.png", "a.png", "b.png", "a.png"], count=1)
    assert records[0] == records[1] == records[3] != records[2]
    assert held_out(keys, count=7).sum() == 7


# --------------------------------------------------------------------------------------------------
# Configs


def test_datasets_parse_with_dotted_errors(tmp_path: Path) -> None:
    ds = "data.datasets=[{path: a, weight: 3, caption_ext: .caption}, {path: b, weight: 1, repeats: 2}]"
    cfg = load_config(TINY, [REAL, "data.path=", ds])
    assert [d.weight for d in cfg.data.datasets] == [3.0, 1.0] and cfg.data.datasets[1].repeats == 2
    assert uses_mixing(cfg)
    views = dataset_views(cfg)
    assert [v.data.path for v in views] == ["a", "b"]
    assert [v.data.caption_ext for v in views] == [".caption", ".txt"]  # null inherits data.caption_ext
    assert all(v.data.datasets == () and v.data.resolution == cfg.data.resolution for v in views)
    assert load_config(TINY, [REAL, "data.path=", ds]).to_dict() == cfg.to_dict()
    cases = [
        ("data.datasets=[{path: a, wieght: 3}]", "data.datasets[0].wieght", "did you mean 'weight'"),
        ("data.datasets=[{path: a, weight: 3}, {path: b}]", "data.datasets", "on every dataset or on none"),
        ("data.datasets=[{path: a, repeats: 0}]", "data.datasets[0].repeats", "must be >= 1"),
        ("data.datasets=[{path: a, weight: 0}]", "data.datasets[0].weight", "must be > 0"),
        ("data.datasets=[{weight: 1}]", "data.datasets[0].path", "is empty"),
        ("data.holdout=1.0", "data.holdout", "[0, 1)"),
    ]
    for override, key, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(TINY, [REAL, "data.path=", override])
        assert e.value.key == key and message in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="either path") as e:
        load_config(TINY, [REAL, "data.path=x", ds])
    assert e.value.key == "data.datasets"
    with pytest.raises(ConfigError, match="not both") as e:
        load_config(TINY, [REAL, "data.holdout=0.1", "validation.loss_cache=x"])
    assert e.value.key == "validation.loss_cache"
    with pytest.raises(ConfigError, match="not both"):
        load_config(TINY, [REAL, "data.holdout=0.1", "data.holdout_count=3"])
    # A held-out split is something to validate.
    assert load_config(TINY, [REAL, "data.holdout=0.1", "validation.every=5"]).validation.enabled
    with pytest.raises(ConfigError, match="nothing to validate"):
        load_config(TINY, [REAL, "validation.every=5"])
    # Duplicate keys inside a dataset entry are YAML errors, like anywhere else.
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  datasets:\n    - path: a\n      path: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'path'"):
        load_config(path)


def test_two_datasets_may_not_share_a_cache(tmp_path: Path) -> None:
    cfg = load_config(TINY, [REAL, "data.path=", "data.datasets=[{path: a, cache_dir: c}, {path: b, cache_dir: c}]"])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\] and data.datasets\[1\] would share") as e:
        dataset_views(cfg)
    assert e.value.key == "data.datasets[1].cache_dir"
    cfg = load_config(TINY, [REAL, "data.path=", f"data.cache_dir={tmp_path}", "data.datasets=[{path: a}, {path: b}]"])
    assert [v.data.cache_dir for v in dataset_views(cfg)] == [f"{tmp_path}/0", f"{tmp_path}/1"]


# --------------------------------------------------------------------------------------------------
# Real caches, built by the trainer's automatic caching


def photos(root: Path, n: int, caption: str, ext: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (70, 72, 3), dtype=np.uint8)).save(root / f"p{i}.png")
        (root / f"p{i}{ext}").write_text(f"{caption} {i}")
        if ext != ".txt":
            (root / f"p{i}.txt").write_text("the wrong caption file")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from flux_jax.data.demo import build_demo_encoders

    base = tmp_path_factory.mktemp("mix")
    return {
        "base": base,
        "cats": photos(base / "cats", 6, "a cat", ".txt", 0),
        "houses": photos(base / "houses", 3, "a house", ".caption", 1),
        "encoders": build_demo_encoders(base / "encoders"),
    }


def real_config(ws: dict[str, Path], *, datasets=None, **data):
    datasets = datasets or [
        {"path": str(ws["cats"]), "weight": 3.0},
        {"path": str(ws["houses"]), "weight": 1.0, "caption_ext": ".caption", "repeats": 2},
    ]
    return from_dict(
        {
            "model": {"preset": "tiny"},
            "data": {"datasets": datasets, "cache_dir": str(ws["base"] / "caches"), "resolution": 64, **data},
            "encoders": {"root": str(ws["encoders"]), "dtype": "fp32", "t5_max_length": 16, "batch_size": 8},
            "train": {"batch_size": 2},
            "output_dir": str(ws["base"] / "run"),
        }
    )


@pytest.fixture(scope="module")
def built(workspace: dict[str, Path]):
    cfg = real_config(workspace)
    assert prepare_train_data(cfg, progress=False) is not None  # both caches built, as `flux-jax train` does
    assert prepare_train_data(cfg, progress=False) is None  # and reused
    return cfg


def test_each_dataset_gets_its_cache_with_its_caption_settings(workspace, built) -> None:
    caches = [LatentCacheReader(workspace["base"] / "caches" / str(i)) for i in range(2)]
    captions = [sorted(str(r["caption"], "utf-8") for r in c.read_many(range(len(c)))) for c in caches]
    assert captions == [[f"a cat {i}" for i in range(6)], [f"a house {i}" for i in range(3)]]
    # Dataset 0's cache is the one a single-dataset config of that folder builds and accepts: same settings
    # fingerprint, same records; the plain config keeps the plain iterator over it.
    plain_data = {**built.to_dict()["data"], "datasets": [], "path": str(workspace["cats"])}
    cfg = from_dict({**built.to_dict(), "data": {**plain_data, "cache_dir": str(workspace["base"] / "caches" / "0")}})
    assert prepare_train_data(cfg, progress=False) is None  # complete, and accepted below (check_built_from)
    plain = make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=2)
    assert isinstance(open_train_data(cfg)[0], TrainIterator) and plain.cache.fingerprint == caches[0].fingerprint


def test_real_datasets_mix_by_weight_with_their_repeats(built) -> None:
    it, trained = open_train_data(built)
    assert isinstance(it, MixedTrainIterator) and len(trained) == 6 + 3
    assert it.weights == [3.0, 1.0]
    assert [len(p.appearances) for p in it.planners] == [6, 3 * 2]  # houses: repeats: 2
    batches = take(it, 40)
    assert Counter(int(b["dataset"][0]) for b in batches) == {0: 30, 1: 10}


def test_held_out_examples_are_never_trained_and_are_what_the_validation_loss_reads(workspace, built) -> None:
    from flux_jax.sharding import make_mesh
    from flux_jax.train.validation import HeldOutLoss, check_validation, with_held_out_split

    cfg = real_config(workspace, holdout_count=1)
    cfg = from_dict({**cfg.to_dict(), "validation": {"every": 2, "loss_batches": 3}})
    caches = [LatentCacheReader(workspace["base"] / "caches" / str(i)) for i in range(2)]
    masks = [holdout_mask(cfg, c) for c in caches]
    assert [int(m.sum()) for m in masks] == [1, 1]  # one example (one record each at one side, no crops or flips)
    held = {(j, int(r)) for j, m in enumerate(masks) for r in np.flatnonzero(m)}
    # Training: the held-out records never appear, over many passes.
    it, trained = open_train_data(cfg)
    assert {(j, int(r)) for j, (_, records) in enumerate(trained.parts) for r in records}.isdisjoint(held)
    for batch in take(it, 60):
        assert {(int(j), int(r)) for j, r in zip(batch["dataset"], batch["record"], strict=True)}.isdisjoint(held)
    # Validation: its loss source is exactly the held-out records of the same caches ...
    inputs = with_held_out_split(cfg, check_validation(cfg))
    source = inputs.loss_source
    assert set(source.records()) == held and len(source) == len(held)
    assert source.describe().startswith("held-out split")
    assert held_out_source(cfg).records() == source.records()
    # ... and the batches the validation loss evaluates are made of those records' latents.
    loss = HeldOutLoss(
        source, rows=2, batches=3, seed=0, mesh=make_mesh(-1, 1, 1), graphdef=None, template=None, objective=None
    )
    want = {np.asarray(caches[j].read_many([r])[0]["latents"], np.float32).tobytes() for j, r in held}
    got = {np.asarray(row, np.float32).tobytes() for b in loss.batches for row in b["latents"]}
    assert got == want
