"""The trainer's cached-example format, its resumable host-sharded iterator, and the metrics helpers."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from flux_jax.data.examples import (
    INDEX_NAME,
    BatchIterator,
    CachedExamples,
    Example,
    InMemoryExamples,
    synthetic_examples,
    write_cached_examples,
)
from flux_jax.errors import DataError
from flux_jax.hardware import peak_flops
from flux_jax.model.config import preset
from flux_jax.model.latents import image_ids
from flux_jax.train.metrics import MetricsWriter, useful_flops_per_sample
from flux_jax.train.step import micro_batches

BF16 = np.dtype(ml_dtypes.bfloat16)


def example(i: int, h: int = 2, w: int = 3, text_len: int = 4, dtype=BF16) -> Example:
    rng = np.random.default_rng(i)
    return Example(
        latents=rng.standard_normal((h * w, 64)).astype(dtype),
        t5=rng.standard_normal((text_len, 8)).astype(dtype),
        clip=rng.standard_normal((5,)).astype(np.float32),
        height=h,
        width=w,
        caption=f"caption {i}",
    )


def indices_of(batch: dict[str, np.ndarray], examples: list[Example]) -> list[int]:
    """Which examples a collated batch holds (by matching latents)."""
    return [next(i for i, e in enumerate(examples) if np.array_equal(e.latents, lat)) for lat in batch["latents"]]


def test_cached_examples_round_trip(tmp_path):
    examples = [example(i) for i in range(5)] + [example(9, h=3, w=3, text_len=6)]
    path = write_cached_examples(tmp_path / "ds", examples, per_shard=4)
    assert sorted(p.name for p in path.iterdir()) == [INDEX_NAME, "shard-00000.safetensors", "shard-00001.safetensors"]
    ds = CachedExamples(path)
    assert len(ds) == 6
    assert [ds.batch_shape(i) for i in range(6)] == [(2, 3, 4)] * 5 + [(3, 3, 6)]
    for i, want in enumerate(examples):
        got = ds.read(i)
        assert got.latents.dtype == BF16 and got.clip.dtype == np.float32
        np.testing.assert_array_equal(got.latents, want.latents)
        np.testing.assert_array_equal(got.t5, want.t5)
        np.testing.assert_array_equal(got.clip, want.clip)
        assert (got.height, got.width, got.caption) == (want.height, want.width, want.caption)
    assert "6 examples" in ds.describe()


def test_write_refuses_existing_and_bad_examples(tmp_path):
    write_cached_examples(tmp_path / "ds", [example(0)])
    with pytest.raises(FileExistsError):
        write_cached_examples(tmp_path / "ds", [example(1)])
    bad = Example(np.zeros((5, 64), np.float32), np.zeros((4, 8), np.float32), np.zeros(5, np.float32), 2, 3)
    with pytest.raises(DataError, match=r"latents \(5, 64\) do not match 2x3"):
        write_cached_examples(tmp_path / "bad", [bad])
    assert not (tmp_path / "bad").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda d: (d / INDEX_NAME).unlink(), "no index.json"),
        (lambda d: (d / INDEX_NAME).write_text("{"), "cannot read index"),
        (lambda d: _edit_index(d, format="other"), "format is not"),
        (lambda d: _edit_index(d, version=7), "unsupported version 7"),
        (lambda d: _edit_index(d, examples=[]), "no examples"),
        (lambda d: _edit_example(d, height=5), r"000000.latents has shape \(6, 64\), expected \[15, C\]"),
        (lambda d: _edit_example(d, name="nope"), "has no tensor nope.latents"),
        (lambda d: _edit_example(d, shard=3), "names shard 3"),
        (lambda d: (d / "shard-00000.safetensors").write_bytes(b"\x01"), "truncated"),
    ],
)
def test_cached_examples_errors_name_the_file(tmp_path, corrupt, match):
    path = write_cached_examples(tmp_path / "ds", [example(0), example(1)])
    corrupt(path)
    with pytest.raises(DataError if "truncated" not in match else Exception, match=match) as err:
        CachedExamples(path)
    assert str(path) in str(err.value)


def _edit_index(d, **changes):
    index = json.loads((d / INDEX_NAME).read_text())
    index.update(changes)
    (d / INDEX_NAME).write_text(json.dumps(index))


def _edit_example(d, **changes):
    index = json.loads((d / INDEX_NAME).read_text())
    index["examples"][0].update(changes)
    (d / INDEX_NAME).write_text(json.dumps(index))


def test_missing_directory():
    with pytest.raises(DataError, match="dataset directory not found"):
        CachedExamples("/nonexistent/dataset")


def mixed_source() -> tuple[InMemoryExamples, list[Example]]:
    examples = [example(i) for i in range(11)] + [example(100 + i, h=3, w=3) for i in range(7)]
    return InMemoryExamples(examples), examples


def test_epochs_are_deterministic_bucketed_and_never_repeat():
    source, examples = mixed_source()
    it = BatchIterator(source, batch_size=4, seed=3)
    plan0 = it.plan(0)
    # 11 -> 2 full batches, 7 -> 1 full batch; remainders dropped for this epoch only.
    assert len(plan0) == 3
    for batch in plan0:
        assert len({source.batch_shape(i) for i in batch}) == 1
    flat = [i for b in plan0 for i in b]
    assert len(flat) == len(set(flat))
    assert plan0 == BatchIterator(source, batch_size=4, seed=3).plan(0)  # same seed, same plan
    assert plan0 != it.plan(1) and plan0 != BatchIterator(source, batch_size=4, seed=4).plan(0)
    got = [indices_of(next(it), examples) for _ in range(6)]
    assert got == plan0 + it.plan(1)
    assert it.get_state()["epoch"] == 1 and it.get_state()["position"] == 3


def test_resume_mid_epoch_continues_exactly():
    source, examples = mixed_source()
    straight = BatchIterator(source, batch_size=4, seed=1)
    want = [indices_of(next(straight), examples) for _ in range(8)]
    first = BatchIterator(source, batch_size=4, seed=1)
    got = [indices_of(next(first), examples) for _ in range(4)]
    state = json.loads(json.dumps(first.get_state()))  # goes through the checkpoint's JSON
    assert state["epoch"] == 1 and state["position"] == 1
    resumed = BatchIterator(source, batch_size=4, seed=1)
    resumed.set_state(state)
    got += [indices_of(next(resumed), examples) for _ in range(4)]
    assert got == want


@pytest.mark.parametrize("field,value", [("seed", 2), ("batch_size", 2), ("examples", 5)])
def test_foreign_state_is_refused(field, value):
    source, _ = mixed_source()
    it = BatchIterator(source, batch_size=4, seed=1)
    state = dict(it.get_state(), **{field: value})
    with pytest.raises(DataError, match="repeat or skip"):
        it.set_state(state)
    with pytest.raises(DataError, match="invalid data-iterator state"):
        it.set_state({"epoch": 0})


def test_hosts_read_disjoint_rows_of_the_same_global_batch():
    source, _ = mixed_source()
    single = BatchIterator(source, batch_size=4, seed=5)
    hosts = [BatchIterator(source, batch_size=4, seed=5, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        whole = next(single)
        parts = [next(h) for h in hosts]
        for key in whole:
            assert parts[0][key].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(DataError, match="cannot be split over 3 hosts"):
        BatchIterator(source, batch_size=4, process_count=3)


def test_batch_too_large_for_every_bucket():
    source, _ = mixed_source()
    with pytest.raises(DataError, match="no shape bucket holds a full batch of 12"):
        BatchIterator(source, batch_size=12)


def test_collated_batch_and_micro_batches():
    source, examples = mixed_source()
    batch = next(BatchIterator(source, batch_size=4, seed=0))
    h, w = examples[indices_of(batch, examples)[0]].height, examples[indices_of(batch, examples)[0]].width
    assert batch["latents"].shape == (4, h * w, 64) and batch["t5"].shape == (4, 4, 8)
    assert batch["clip"].shape == (4, 5) and batch["img_ids"].shape == (4, h * w, 3)
    np.testing.assert_array_equal(batch["img_ids"][1], image_ids(h, w))
    # (0, row, col) per token, row-major like BFL's prepare().
    np.testing.assert_array_equal(image_ids(2, 3)[4], [0, 1, 1])
    split = micro_batches({**batch, "extra": np.zeros(4)}, 2)
    assert set(split) == {"latents", "t5", "clip", "img_ids"}
    assert split["latents"].shape == (2, 2, h * w, 64)
    np.testing.assert_array_equal(split["latents"][1, 0], batch["latents"][2])
    with pytest.raises(ValueError, match="cannot be cut into 3"):
        micro_batches(batch, 3)


def test_synthetic_examples_fit_the_model_and_are_deterministic():
    cfg = preset("tiny")
    kw = dict(in_channels=cfg.in_channels, context_dim=cfg.context_in_dim, vec_dim=cfg.vec_in_dim, resolution=64)
    a, b = synthetic_examples(**kw), synthetic_examples(**kw)
    assert len(a) == 16 and a.batch_shape(0) == (4, 4, 8)
    first = a.read(0)
    assert first.latents.shape == (16, 64) and first.t5.shape == (8, 48) and first.clip.shape == (32,)
    assert first.latents.dtype == np.float32
    for i in range(16):
        np.testing.assert_array_equal(a.read(i).latents, b.read(i).latents)
    # Same class (i % 4) -> same conditioning and colour up to the small per-example noise.
    np.testing.assert_array_equal(a.read(1).t5, a.read(5).t5)
    assert np.abs(a.read(1).latents.mean(0) - a.read(5).latents.mean(0)).max() < 0.15
    assert not np.allclose(a.read(1).latents, synthetic_examples(**kw, seed=1).read(1).latents)


def test_useful_flops_match_the_peer_formula():
    cfg = preset("dev")
    # torch_peer_lora_step.py at 1024 px: L = 4096 + 512, 57 blocks, H = 3072.
    L, blocks, H = 4096 + 512, 57, 3072
    want = 2 * (2 * 12 * H * H * L * blocks) + 3 * (4 * L * L * H * blocks)
    assert useful_flops_per_sample(cfg, 4096, 512) == want
    # The peer's measurement (environment_facts.md): 0.625 s/step at 26.5% of 989 TFLOP/s.
    assert want == pytest.approx(0.265 * 989e12 * 0.625, rel=0.005)


def test_peak_flops_lookup():
    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert peak_flops(Dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(Dev("TPU v5 lite")) == 197e12
    assert peak_flops(Dev("cpu")) is None
    assert peak_flops(Dev("cpu"), override_tflops=2.0) == 2e12


def test_metrics_writer_drops_records_past_the_resumed_step(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in range(1, 6):
        w.write(step, {"loss": float(step), "mfu": None})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a kill
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=3)
    w.write(4, {"loss": 40.0})
    w.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert "mfu" not in records[0]
    assert any((tmp_path / "tensorboard").iterdir())
