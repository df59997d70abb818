"""`flux-jax cache`: records match the PyTorch encoders, resume after interruption, never a corrupt entry.

The encoders are the generated tiny demo encoders (random weights in the real checkpoint layouts), run on the 8
fake CPU devices; compiled programs are shared across the builds of this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_jax.data import cache as cache_mod
from flux_jax.data.buckets import Bucket
from flux_jax.data.cache import build_cache
from flux_jax.data.cache_reader import LatentCacheReader
from flux_jax.data.images import GRAYSCALE
from flux_jax.errors import ConfigError, DataError
from flux_jax.run_config import RunConfig, from_dict

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("latents", "t5", "clip", "height", "width", "bucket", "group", "repeats", "flipped", "caption", "source")


def write_photos(root: Path) -> None:
    """Four near-square photos (bucket 128x128) and two wide ones (192x64), one in a 2x kohya folder."""
    rng = np.random.default_rng(0)
    (root / "2_wide").mkdir(parents=True)
    for i in range(4):
        pixels = rng.integers(0, 256, (150, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"sq{i}.png")
        (root / f"sq{i}.txt").write_text(f"a photo of a cat {i}")
    for i in range(2):
        pixels = rng.integers(0, 256, (70, 200, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "2_wide" / f"w{i}.jpg", quality=95)
        (root / "2_wide" / f"w{i}.txt").write_text("a red house by the sea")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from flux_jax.data.demo import build_demo_encoders

    base = tmp_path_factory.mktemp("cache")
    write_photos(base / "photos")
    return {"base": base, "photos": base / "photos", "encoders": build_demo_encoders(base / "encoders")}


@pytest.fixture(scope="module")
def encoders(workspace: dict[str, Path]):
    """Loaded once for the builds below (loading, not encoding, dominates a tiny build)."""
    from flux_jax.data.encoding import FluxEncoders, resolve_encoder_paths
    from flux_jax.sharding import make_mesh

    cfg = config(workspace, workspace["base"] / "unused")
    paths, _ = resolve_encoder_paths(cfg, workspace["base"] / "unused")
    return FluxEncoders.load(paths, mesh=make_mesh(-1, 1, 1), dtype="fp32", t5_max_length=16)


def config(ws: dict[str, Path], cache_dir: Path, **data) -> RunConfig:
    return from_dict(
        {
            "model": {"preset": "tiny"},
            "data": {
                "path": str(ws["photos"]),
                "cache_dir": str(cache_dir),
                "resolution": 128,
                "crop": "random",
                "crop_variants": 2,
                "flip": True,
                **data,
            },
            "encoders": {"root": str(ws["encoders"]), "dtype": "fp32", "t5_max_length": 16, "batch_size": 8},
        }
    )


def records(cache_dir: Path) -> list[dict]:
    reader = LatentCacheReader(cache_dir)
    return reader.read_many(range(len(reader)))


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for field in FIELDS:
            np.testing.assert_array_equal(np.asarray(ra[field]), np.asarray(rb[field]), err_msg=field)


@pytest.fixture(scope="module")
def reference(workspace: dict[str, Path]) -> Path:
    cache_dir = workspace["base"] / "reference"
    summary = build_cache(config(workspace, cache_dir), progress=False)
    assert summary.records == summary.encoded == 24  # 6 photos x 2 crops x 2 flips
    return cache_dir


def test_cache_layout_index_and_report(reference: Path) -> None:
    # work/ (the chunks) is gone once the cache is complete.
    assert sorted(p.name for p in reference.iterdir()) == [
        "cache.json",
        "empty_caption.safetensors",
        "report.json",
        "tfds",
    ]
    info = json.loads((reference / "cache.json").read_text())
    assert info["buckets"] == [[64, 192], [64, 256], [128, 128], [192, 64], [256, 64]]
    reader = LatentCacheReader(reference)
    recs = records(reference)
    assert len(reader) == 24 and info["shapes"] == {"latent_dim": 64, "t5_length": 16, "t5_dim": 48, "clip_dim": 32}
    by_source: dict[str, list[dict]] = {}
    for r in recs:
        by_source.setdefault(r["source"].decode(), []).append(r)
    assert sorted(by_source) == ["2_wide/w0.jpg", "2_wide/w1.jpg", "sq0.png", "sq1.png", "sq2.png", "sq3.png"]
    for source, rs in by_source.items():
        wide = source.startswith("2_")
        assert len(rs) == 4 and len({int(r["group"]) for r in rs}) == 1
        assert sorted(bool(r["flipped"]) for r in rs) == [False, False, True, True]
        assert {int(r["repeats"]) for r in rs} == {2 if wide else 1}
        bucket = Bucket(192, 64) if wide else Bucket(128, 128)
        for r in rs:
            assert reader.buckets[int(r["bucket"])] == bucket
            gh, gw = bucket.tokens
            assert (int(r["height"]), int(r["width"])) == (gh, gw)
            assert r["latents"].shape == (gh * gw, 64) and r["latents"].dtype.name == "bfloat16"
            assert r["t5"].shape == (16, 48) and r["t5"].dtype.name == "bfloat16"
            assert r["clip"].shape == (32,) and r["clip"].dtype == np.float32
            assert np.isfinite(r["latents"].astype(np.float32)).all()
        assert len({r["latents"].tobytes() for r in rs}) == 4  # two crops x mirrored: four different latents
    # The trainer's ExampleSource protocol.
    ex = reader.read(0)
    assert reader.batch_shape(0) == (ex.height, ex.width, 16) == ex.batch_shape
    assert ex.caption.startswith(("a photo of a cat", "a red house"))
    report = json.loads((reference / "report.json").read_text())
    assert report == {"total": 6, "used": 6, "skipped": {}, "converted": {}}


@pytest.mark.slow  # imports torch, diffusers and transformers
def test_cached_values_match_the_pytorch_encoders(workspace: dict[str, Path], reference: Path) -> None:
    """Latents (VAE mean, then scale * (z - shift), then 2x2 packing), T5 states and CLIP pooled output of
    each record, recomputed with diffusers / transformers from the same files: equal up to the bf16 rounding
    of the stored value on top of fp32 parity (1e-4)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from flux_jax.data.buckets import BucketSpec, render
    from flux_jax.data.images import decode_image
    from flux_jax.data.sources import FolderSource

    enc = workspace["encoders"]
    vae = diffusers.AutoencoderKL.from_pretrained(enc / "vae").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(enc / "text_encoder_2").eval()
    clip = transformers.CLIPTextModel.from_pretrained(enc / "text_encoder").eval()
    t5_tok = transformers.T5TokenizerFast.from_pretrained(enc / "tokenizer_2")
    clip_tok = transformers.CLIPTokenizer.from_pretrained(enc / "tokenizer")

    cfg = config(workspace, reference)
    items, _ = cache_mod.scan(FolderSource(cfg.data.path), cfg.data, BucketSpec.from_config(cfg.data))
    buckets = BucketSpec.from_config(cfg.data).all_buckets
    recs = records(reference)
    source = FolderSource(cfg.data.path)

    def close_to_bf16(stored: np.ndarray, ref: np.ndarray) -> None:
        # Round-to-nearest bf16 (8 significant bits) is off by at most 2^-8 relative, plus the fp32 tolerance.
        err = np.abs(stored.astype(np.float32) - ref)
        bound = 2.0**-8 * np.abs(ref) + 1e-4
        assert (err <= bound).all(), f"max excess {np.max(err - bound)}"

    for index in (0, 5, 17, 23):
        item, rec = items[index], recs[index]
        assert rec["source"].decode() == item.key and bool(rec["flipped"]) == item.flipped
        image = decode_image(source[item.index].image, max_pixels=10**9).image
        pixels = render(image, buckets[item.bucket], item.box, flip=item.flipped)
        with torch.no_grad():
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
            z = vae.encode(x).latent_dist.mean
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
            packed = diffusers.FluxPipeline._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])[0].numpy()
            t5_ids = t5_tok([item.caption], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
            hidden = t5(t5_ids.input_ids).last_hidden_state[0].numpy()
            clip_ids = clip_tok(
                [item.caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            pooled = clip(clip_ids.input_ids).pooler_output[0].numpy()
        close_to_bf16(rec["latents"], packed)
        close_to_bf16(rec["t5"], hidden)
        np.testing.assert_allclose(rec["clip"], pooled, atol=1e-4, rtol=1e-4)


def test_interrupted_cache_resumes_without_redoing_work(encoders, workspace: dict[str, Path], reference: Path) -> None:
    cache_dir = workspace["base"] / "interrupted"
    cfg = config(workspace, cache_dir)

    def crash_after_first_chunk(rows: int) -> None:
        raise KeyboardInterrupt  # what a preemption or Ctrl-C looks like to the loop

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, progress=False, encoders=encoders, on_batch=crash_after_first_chunk)
    work = cache_dir / "work"
    chunks = sorted(work.glob("chunk-*.safetensors"))
    assert len(chunks) == 1 and not (cache_dir / "cache.json").exists() and not (cache_dir / "tfds").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(DataError, match="no complete cache"):
        LatentCacheReader(cache_dir)

    summary = build_cache(cfg, progress=False, encoders=encoders)
    assert summary.encoded == 24 - 8  # the first chunk (one full batch of 8) was kept
    assert_same_records(records(cache_dir), records(reference))
    assert not work.exists()


def test_damaged_chunks_and_stray_temp_files_are_never_used(
    encoders, workspace: dict[str, Path], reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = workspace["base"] / "damaged"
    cfg = config(workspace, cache_dir)
    calls = []

    def crash_on_second(rows: int) -> None:
        calls.append(rows)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, progress=False, encoders=encoders, on_batch=crash_on_second)
    work = cache_dir / "work"
    first, second = sorted(work.glob("chunk-*.safetensors"))
    # A SIGKILL mid-write leaves a hidden temp file; outside damage truncates a finished chunk.
    (work / f".{first.name}.tmp-999-deadbeef").write_bytes(b"partial")
    second.write_bytes(second.read_bytes()[:200])
    summary = build_cache(cfg, progress=False, encoders=encoders)
    assert summary.encoded == 24 - 8  # the damaged chunk's examples were encoded again
    assert_same_records(records(cache_dir), records(reference))

    # A crash while writing a chunk leaves nothing behind: the writer is atomic.
    other = workspace["base"] / "crash_in_write"

    def failing_save(path, tensors, metadata=None):
        with cache_mod.atomic_file(path) as tmp:
            tmp.write_bytes(b"half a chunk")
            raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build_cache(config(workspace, other), progress=False, encoders=encoders)
    assert list((other / "work").iterdir()) == [other / "work" / "fingerprint.json"]


def test_complete_cache_is_reused_and_other_settings_are_refused(
    encoders, workspace: dict[str, Path], reference: Path
) -> None:
    cfg = config(workspace, reference)
    before = (reference / "cache.json").stat().st_mtime_ns
    summary = build_cache(cfg, progress=False, encoders=encoders)
    assert summary.up_to_date and summary.encoded == 0 and summary.records == 24
    assert (reference / "cache.json").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="--force"):
        build_cache(config(workspace, reference, flip=False), progress=False, encoders=encoders)


def test_force_rebuilds_with_new_settings(encoders, workspace: dict[str, Path]) -> None:
    cache_dir = workspace["base"] / "forced"
    build_cache(config(workspace, cache_dir, flip=False, crop_variants=1), progress=False, encoders=encoders)
    assert len(LatentCacheReader(cache_dir)) == 6
    summary = build_cache(
        config(workspace, cache_dir, flip=False, crop_variants=2), progress=False, encoders=encoders, force=True
    )
    assert summary.encoded == 12 and len(LatentCacheReader(cache_dir)) == 12


def test_strict_refuses_bad_inputs_before_writing(encoders, workspace: dict[str, Path]) -> None:
    photos = workspace["base"] / "gray_photos"
    photos.mkdir()
    Image.new("L", (150, 150), 128).save(photos / "g.png")
    (photos / "g.txt").write_text("a gray square")
    cache_dir = workspace["base"] / "strict"
    cfg = config(workspace, cache_dir, path=str(photos), crop="center", crop_variants=1, flip=False)
    with pytest.raises(DataError, match=f"converted {GRAYSCALE}: 1 \\(g.png\\)"):
        build_cache(cfg, strict=True, progress=False, encoders=encoders)
    assert not cache_dir.exists()
    summary = build_cache(cfg, progress=False, encoders=encoders)  # without strict: converted and reported
    assert summary.report.converted == {GRAYSCALE: ["g.png"]} and summary.records == 1


def test_tfds_source_gives_the_same_cache(encoders, workspace: dict[str, Path], reference: Path) -> None:
    from flux_jax.data.tfds_builders import build_folder_dataset

    dataset = build_folder_dataset(workspace["photos"], workspace["base"] / "packed")
    cache_dir = workspace["base"] / "from_tfds"
    build_cache(config(workspace, cache_dir, source="tfds", path=str(dataset)), progress=False, encoders=encoders)
    assert_same_records(records(cache_dir), records(reference))


def test_cli_cache_then_train_iterator(workspace: dict[str, Path], reference: Path, capsys) -> None:
    from flux_jax.cli import main
    from flux_jax.data.pipeline import make_train_iterator

    cfg = config(workspace, reference)
    path = workspace["base"] / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["cache", "--config", str(path), "--no-progress"]) == 0
    assert "is up to date (24 records)" in capsys.readouterr().out
    assert main(["cache", "--config", str(path), "data.path=/nonexistent"]) == 2
    assert "error: /nonexistent: dataset folder not found" in capsys.readouterr().err

    one = make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=4)
    two = [make_train_iterator(cfg, process_index=p, process_count=2, batch_size_per_host=2) for p in range(2)]
    assert one.batches_per_epoch == 1 + 1  # per bucket: 4 photos x 1 repeat; 2 photos x 2 repeats
    for _ in range(6):
        batch = next(one)
        halves = [next(it) for it in two]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])
        assert batch["latents"].dtype.name == "bfloat16" and batch["img_ids"].shape[:2] == batch["latents"].shape[:2]


@pytest.mark.slow
def test_demo_config_caches_the_demo_photos(tmp_path: Path) -> None:
    """The README main job's first step, on the shipped photos with generated encoders (3 buckets to compile)."""
    from flux_jax.commands.demo import DEMO_CONFIG, DEMO_PHOTOS
    from flux_jax.data.pipeline import make_train_iterator
    from flux_jax.run_config import load_config

    cfg = load_config(
        Path(str(DEMO_CONFIG)),
        [f"data.path={Path(str(DEMO_PHOTOS))}", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    summary = build_cache(cfg, progress=False)
    assert summary.records == 8 and summary.report.num_skipped == 0
    assert summary.report.converted == {GRAYSCALE: ["cameraman.jpg", "page.jpg"]}
    assert (tmp_path / "cache" / "demo_encoders" / "demo.json").is_file()
    reader = LatentCacheReader(tmp_path / "cache")
    used = {str(reader.buckets[b]) for b in reader.record_bucket}
    assert used == {"128x256", "192x192", "256x128"}
    it = make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=cfg.train.batch_size)
    batch = next(it)
    assert batch["latents"].shape[0] == 8 and batch["t5"].shape[1:] == (64, 48) and batch["clip"].shape[1:] == (32,)


_WORKER = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
process, port, cfg_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
from flux_jax.data import cache
from flux_jax.run_config import load_config
cache.SHARD_BYTES = 28 << 10  # 8 shards of 3 records, as in the `sharded` fixture
summary = cache.build_cache(load_config(cfg_path), progress=False)
print("RECORDS", jax.process_count(), jax.device_count(), summary.records, summary.encoded, summary.up_to_date)
"""


@pytest.mark.slow  # two fresh processes, each importing JAX and TensorFlow and compiling
def test_two_hosts_build_the_same_cache(workspace: dict[str, Path], reference: Path) -> None:
    """Two processes with 4 CPU devices each (jax.distributed over gloo) on one shared cache dir: each encodes
    its rows of every global batch and writes its own chunks, process 0 finalizes; the records equal the
    single-process cache's bit for bit. A damaged shard is found by process 0 and both re-encode its records."""
    import socket
    import subprocess
    import sys

    cache_dir = workspace["base"] / "two_hosts"
    cfg_path = workspace["base"] / "two_hosts.yaml"
    cfg_path.write_text(config(workspace, cache_dir).to_yaml())
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)

    def run_two(expect: str) -> None:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = str(s.getsockname()[1])
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(p), port, str(cfg_path)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for p in range(2)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outputs, strict=True):
            assert p.returncode == 0, out[-3000:]
            assert expect in out, out[-3000:]

    run_two("RECORDS 2 8 24 24 False")
    assert_same_records(records(cache_dir), records(reference))
    table = json.loads((cache_dir / "cache.json").read_text())["files"]
    middle = sorted((e["first"], name) for name, e in table.items() if "records" in e)[4]
    (cache_dir / middle[1]).unlink()
    run_two("RECORDS 2 8 24 3 False")
    assert_same_records(records(cache_dir), records(reference))


def test_cache_dir_defaults_and_a_bucket_output_dir_needs_an_explicit_local_one(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    cfg = from_dict({"data": {"path": str(folder), "source": "folder"}, "output_dir": "gs://bucket/run"})
    assert cache_mod.resolve_cache_dir(cfg) == tmp_path / "images_cache"  # beside the images, wherever the run goes
    named = from_dict({"data": {"path": "my_tfds_dataset", "source": "tfds"}, "output_dir": str(tmp_path / "run")})
    assert cache_mod.resolve_cache_dir(named) == tmp_path / "run" / "cache"
    remote = from_dict({"data": {"path": "my_tfds_dataset", "source": "tfds"}, "output_dir": "gs://bucket/run"})
    with pytest.raises(ConfigError, match="data.cache_dir") as err:
        cache_mod.resolve_cache_dir(remote)
    assert err.value.key == "data.cache_dir"


# --------------------------------------------------------------------------------------------------
# Damage: the file table in cache.json, checked on open and on a re-run; a re-run re-encodes only what was lost


SHARD = "flux_jax_latent_cache-train.array_record-{:05d}-of-{:05d}"


@pytest.fixture(scope="module")
def sharded(encoders, workspace: dict[str, Path]) -> tuple[Path, list[tuple[str, int, int]]]:
    """The reference cache written in shards of about 28 kB, and its shards (file relative to the cache dir,
    first record, count), read from the dataset's own TFDS metadata."""
    cache_dir = workspace["base"] / "sharded"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_mod, "SHARD_BYTES", 28 << 10, raising=False)
        build_cache(config(workspace, cache_dir), progress=False, encoders=encoders)
    dataset = cache_dir / "tfds" / "flux_jax_latent_cache" / "1.0.0"
    lengths = [int(n) for n in json.loads((dataset / "dataset_info.json").read_text())["splits"][0]["shardLengths"]]
    firsts = np.cumsum([0, *lengths])[:-1].tolist()
    names = [f"{dataset.relative_to(cache_dir)}/{SHARD.format(k, len(lengths))}" for k in range(len(lengths))]
    return cache_dir, list(zip(names, firsts, lengths, strict=True))


def test_cache_dataset_is_sharded_and_every_file_is_in_the_table(sharded) -> None:
    cache_dir, shards = sharded
    assert [(first, count) for _, first, count in shards] == [(3 * k, 3) for k in range(8)]  # about 28 kB each
    table = json.loads((cache_dir / "cache.json").read_text())["files"]
    files = sorted(p.relative_to(cache_dir).as_posix() for p in (cache_dir / "tfds").rglob("*") if p.is_file())
    assert sorted(table) == sorted([*files, "empty_caption.safetensors"])
    for name, first, count in shards:
        assert (table[name]["first"], table[name]["records"]) == (first, count)
    for name, entry in table.items():
        assert entry["size"] == (cache_dir / name).stat().st_size and len(entry["crc32"]) == 8


def copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("deleted", "missing"),
        ("truncated", "bytes, cache.json records"),
        ("bit-flipped", "CRC-32"),
        ("dataset_info.json deleted", "missing"),
    ],
)
def test_damaged_cache_is_refused_on_open_and_a_rerun_encodes_only_what_was_lost(
    monkeypatch: pytest.MonkeyPatch,
    encoders,
    workspace: dict[str, Path],
    reference: Path,
    sharded: tuple[Path, list[tuple[str, int, int]]],
    damage: str,
    problem: str,
) -> None:
    """Lost: every record of a deleted or truncated shard (its index is at its end), the one record whose Riegeli
    hash no longer matches after a bit flip, nothing when only TFDS's metadata file is gone."""
    from flux_jax.data.pipeline import make_train_iterator

    src, shards = sharded
    cache_dir = copy_cache(src, workspace["base"] / f"damaged_{damage.replace(' ', '_')}")
    cfg = config(workspace, cache_dir)
    name, _, count = shards[len(shards) // 2]  # a shard in the middle
    shard = victim = cache_dir / name
    if damage == "deleted":
        shard.unlink()
        lost = count
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        lost = count
    elif damage == "bit-flipped":
        flip_bit(shard, 8000)  # inside the records (the file ends in padding)
        lost = 1
    else:
        victim = shard.parent / "dataset_info.json"
        victim.unlink()
        lost = 0
    # Opening (the trainer's first step) refuses it: one line naming the file, no Riegeli or TFDS traceback.
    for open_it in (
        lambda: LatentCacheReader(cache_dir),
        lambda: make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=4),
    ):
        with pytest.raises(DataError) as err:
            open_it()
        message = str(err.value)
        assert message.startswith(f"{victim}: ") and problem in message and "flux-jax cache" in message, message
        assert "\n" not in message
    # A re-run is not "up to date": it keeps every intact record and encodes only the lost ones again.
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 28 << 10, raising=False)
    summary = build_cache(cfg, progress=False, encoders=encoders)
    assert not summary.up_to_date and summary.encoded == lost and summary.records == 24
    assert summary.damaged == (victim.relative_to(cache_dir).as_posix(),)
    assert_same_records(records(cache_dir), records(reference))
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "cache.json",
        "empty_caption.safetensors",
        "report.json",
        "tfds-repaired",  # the repaired dataset was written beside the damaged one, which is gone
    ]
    assert build_cache(cfg, progress=False, encoders=encoders).up_to_date
    next(make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=4))


def test_a_repair_of_a_repaired_cache_switches_back_and_an_interrupted_repair_is_resumed(
    monkeypatch: pytest.MonkeyPatch,
    encoders,
    workspace: dict[str, Path],
    reference: Path,
    sharded: tuple[Path, list[tuple[str, int, int]]],
) -> None:
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 28 << 10, raising=False)
    src, shards = sharded
    cache_dir = copy_cache(src, workspace["base"] / "repaired_twice")
    cfg = config(workspace, cache_dir)
    (cache_dir / shards[0][0]).unlink()
    assert build_cache(cfg, progress=False, encoders=encoders).encoded == 3
    info = json.loads((cache_dir / "cache.json").read_text())
    assert info["dataset"].startswith("tfds-repaired/")
    # Damage the repaired dataset (records 6-11: 2 wide, 4 square photos' records), and interrupt its repair after
    # the first re-encoded chunk (the 4 square ones: buckets are encoded in bucket order).
    repaired = sorted(name for name, e in info["files"].items() if "records" in e)
    assert len(repaired) == 8
    for name in repaired[2:4]:
        (cache_dir / name).unlink()

    def crash(rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, progress=False, encoders=encoders, on_batch=crash)
    with pytest.raises(DataError, match="missing"):
        LatentCacheReader(cache_dir)  # still the damaged cache, never a half-repaired one
    summary = build_cache(cfg, progress=False, encoders=encoders)
    assert summary.encoded == 2  # the chunk written before the interruption was kept
    assert json.loads((cache_dir / "cache.json").read_text())["dataset"].startswith("tfds/")
    assert not (cache_dir / "tfds-repaired").exists() and not (cache_dir / "work").exists()
    assert_same_records(records(cache_dir), records(reference))


def test_a_cache_without_file_table_is_verified_once_by_a_rerun(
    encoders, workspace: dict[str, Path], reference: Path, sharded: tuple[Path, list[tuple[str, int, int]]]
) -> None:
    """A cache written before cache.json had a file table: the reader asks for a `flux-jax cache` run, which reads
    every record (Riegeli's per-record hashes), records the table without encoding anything, or re-encodes the
    records that do not read back."""
    src, shards = sharded
    for name, flip in (("old_intact", False), ("old_flipped", True)):
        cache_dir = copy_cache(src, workspace["base"] / name)
        info = json.loads((cache_dir / "cache.json").read_text())
        table = info.pop("files")
        info.pop("source_digest")
        (cache_dir / "cache.json").write_text(json.dumps(info))
        with pytest.raises(DataError, match="older flux-jax, without file checksums; run `flux-jax cache`"):
            LatentCacheReader(cache_dir)
        if flip:
            flip_bit(cache_dir / shards[5][0], 8000)
        summary = build_cache(config(workspace, cache_dir), progress=False, encoders=encoders)
        assert summary.encoded == (1 if flip else 0) and summary.up_to_date == (not flip)
        upgraded = json.loads((cache_dir / "cache.json").read_text())
        if not flip:
            assert upgraded["files"] == table  # the same table the cache would have had
        assert "source_digest" in upgraded
        assert_same_records(records(cache_dir), records(reference))


def test_trainer_refuses_a_cache_built_from_other_data_or_settings(
    workspace: dict[str, Path], reference: Path, tmp_path: Path
) -> None:
    """`flux-jax cache` refuses a cache_dir holding another data set's cache; the trainer does too, instead of
    training on it whatever data.path says. The same data in another folder is the same data."""
    import shutil

    from flux_jax.data.pipeline import make_train_iterator

    def open_with(**data):
        cfg = config(workspace, reference, **data)
        return make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=4)

    moved = tmp_path / "moved"
    shutil.copytree(workspace["photos"], moved)
    assert next(open_with(path=str(moved)))["latents"].shape[0] == 4  # a copy of the data: fine

    other = tmp_path / "other"
    shutil.copytree(workspace["photos"], other)
    (other / "sq3.png").unlink()
    recaptioned = tmp_path / "recaptioned"
    shutil.copytree(workspace["photos"], recaptioned)
    (recaptioned / "sq0.txt").write_text("a photo of a dog")
    for data, what in (
        (
            {"path": str(other)},
            f"(data.path is folder {other} (5 images), the cache holds folder {workspace['photos']}",
        ),
        ({"path": str(recaptioned)}, f"(data.path is folder {recaptioned} (6 images), the cache holds"),
        ({"flip": False}, "(data.flip is False, the cache has True)"),
        ({"resolution": 192}, "(data.resolution / data.resolutions is [192], the cache has [128])"),
        ({"shuffle_seed": 3}, "(data.shuffle_seed is 3, the cache has 0)"),
    ):
        with pytest.raises(DataError) as err:
            open_with(**data)
        message = str(err.value)
        assert message.startswith(f"{reference}: this cache was built from other data or settings"), message
        assert what in message and "run `flux-jax cache` with this config" in message and "\n" not in message

    # Encoders: other encoder files (here: the same files, touched) are other encoders, as for `flux-jax cache`.
    cfg = config(workspace, reference)
    weights = next((workspace["encoders"] / "vae").glob("*.safetensors"))
    stat = weights.stat()
    try:
        os.utime(weights, (stat.st_atime, stat.st_mtime + 10))
        with pytest.raises(DataError, match="the encoders are not the files the cache was encoded with"):
            make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=4)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # Encoders that are not on the training machine are not compared (training does not need them).
    fields = cfg.to_dict()
    gone = from_dict({**fields, "encoders": {**fields["encoders"], "root": str(tmp_path / "no_encoders_here")}})
    assert next(make_train_iterator(gone, process_index=0, process_count=1, batch_size_per_host=4))
