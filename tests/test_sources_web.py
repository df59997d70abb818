"""Web-scale sources: webdataset tar shards and parquet files, through `flux-jax cache`.

Shards are written with webdataset's own TarWriter (img2dataset writes its shards with it); parquet files in the
Hugging Face datasets layout (an ``image`` struct of ``bytes`` and ``path``). The encoders are the generated tiny
demo encoders on the 8 fake CPU devices; every image is in one bucket, so one program is compiled.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from flux_jax.data import images as im
from flux_jax.data.buckets import BucketSpec
from flux_jax.data.cache import build_cache, check_built_from, scan
from flux_jax.data.cache_reader import LatentCacheReader
from flux_jax.data.sources import open_source
from flux_jax.data.web_sources import ParquetSource, WebDatasetSource
from flux_jax.errors import DataError
from flux_jax.run_config import DataConfig, from_dict

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FIELDS = ("latents", "t5", "clip", "height", "width", "bucket", "group", "repeats", "flipped", "caption")


def png(seed: int) -> bytes:
    """A 150x160 photo: bucket 128x128 at resolution 128."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (150, 160, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def write_parquet(path: Path, images: list, captions: list, *, row_group_size: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, IMAGE), "text": captions}), path, row_group_size=row_group_size)


def cut_inside(path: Path, member: str) -> None:
    """Truncate the tar in the middle of ``member``'s data (a download that broke off)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


@pytest.fixture(scope="module")
def encoders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flux_jax.data.demo import build_demo_encoders

    return build_demo_encoders(tmp_path_factory.mktemp("encoders") / "demo")


def config(path: Path | str, source: str, cache_dir: Path, encoders_dir: Path, **data) -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": {"path": str(path), "source": source, "cache_dir": str(cache_dir), "resolution": 128, **data},
        "encoders": {"root": str(encoders_dir), "dtype": "fp32", "t5_max_length": 16, "batch_size": 8},
    }


def cli_cache(tmp_path: Path, cfg: dict) -> int:
    from flux_jax.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(from_dict(cfg).to_yaml())
    return main(["cache", "--config", str(path), "--no-progress"])


def cached(cache_dir: Path) -> dict[str, dict]:
    reader = LatentCacheReader(cache_dir)
    return {r["source"].decode(): r for r in reader.read_many(range(len(reader)))}


def skipped(cache_dir: Path) -> dict[str, list[str]]:
    report = json.loads((cache_dir / "report.json").read_text())
    return {reason: [e["file"] for e in entries] for reason, entries in report["skipped"].items()}


# --------------------------------------------------------------------------------------------------
# webdataset


def corrupt_shards(root: Path) -> None:
    """Shard 00000: two good samples (a .txt caption, a .json one), bad image bytes, no caption; shard 00001: two
    good samples, then cut inside the third's image."""
    write_shard(
        root / "00000.tar",
        [
            {"__key__": "000000000", "png": png(0), "txt": "a cat", "json": {"text": "a cat (json)", "url": "u"}},
            {"__key__": "000000001", "jpg": b"\xff\xd8\xff not really a jpeg", "txt": "bad bytes"},
            {"__key__": "000000002", "png": png(2), "json": {"url": "no caption here"}},
            {"__key__": "000000003", "png": png(3), "json": {"text": "a dog"}},
        ],
    )
    write_shard(root / "00001.tar", [{"__key__": f"00000000{i}", "png": png(i), "txt": f"cap {i}"} for i in (4, 5, 6)])
    cut_inside(root / "00001.tar", "000000006.png")


def test_webdataset_cache_holds_the_good_samples_and_reports_the_bad(
    tmp_path: Path, encoders_dir: Path, capsys
) -> None:
    corrupt_shards(tmp_path / "shards")
    cache_dir = tmp_path / "cache"
    cfg = config(tmp_path / "shards", "webdataset", cache_dir, encoders_dir)
    assert cli_cache(tmp_path, cfg) == 0
    records = cached(cache_dir)
    assert sorted(records) == [f"0000{s}.tar/00000000{k}" for s, k in ((0, 0), (0, 3), (1, 4), (1, 5))]
    # The .txt caption wins over the .json one; the .json's caption_key otherwise.
    assert [records[k]["caption"].decode() for k in sorted(records)] == ["a cat", "a dog", "cap 4", "cap 5"]
    report = json.loads((cache_dir / "report.json").read_text())
    assert skipped(cache_dir) == {
        im.NOT_AN_IMAGE: ["00000.tar/000000001"],
        im.CAPTION_MISSING: ["00000.tar/000000002"],
        im.TRUNCATED: ["00001.tar"],
    }
    (truncation,) = report["skipped"][im.TRUNCATED]
    assert "2 samples before the cut used, sample 000000006 lost" in truncation["detail"]
    assert (report["total"], report["used"]) == (7, 4)
    # A second index of the shards is the same data: the cache is up to date, and the trainer accepts it.
    assert cli_cache(tmp_path, cfg) == 0
    assert "is up to date (4 records)" in capsys.readouterr().out
    check_built_from(from_dict(cfg), cache_dir, json.loads((cache_dir / "cache.json").read_text()))


def test_webdataset_missing_caption_policy_and_member_problems(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    write_shard(
        root / "a.tar",
        [
            {"__key__": "k0", "png": png(0)},  # no caption member
            {"__key__": "k1", "txt": "a caption and no image"},
            {"__key__": "k2", "png": png(2), "json": b"{not json"},
            {"__key__": "k3", "png": png(3), "txt": b"caf\xe9"},
        ],
    )
    src = WebDatasetSource(str(root))
    assert [src.key(i) for i in range(len(src))] == ["a.tar/k0", "a.tar/k2", "a.tar/k3"]
    assert src.problems == [(im.IMAGE_MISSING, "a.tar/k1", "no image member (has txt)")]
    spec = BucketSpec.from_config(DataConfig(resolution=128))
    for policy, used in (("skip", []), ("empty", ["a.tar/k0"])):
        _, report = scan(src, DataConfig(resolution=128, missing_caption=policy), spec)
        assert [k for k, _ in report.skipped[im.BAD_METADATA]] == ["a.tar/k2"]
        assert [k for k, _ in report.skipped[im.CAPTION_NOT_UTF8]] == ["a.tar/k3"]
        assert [k for k, _ in report.skipped.get(im.CAPTION_MISSING, [])] == ([] if used else ["a.tar/k0"])
        assert report.converted.get(im.EMPTY_CAPTION_USED, []) == used
        assert report.total == 4 and report.used == len(used)


def test_webdataset_tar_without_end_marker_and_not_a_tar(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    write_shard(root / "a.tar", [{"__key__": f"k{i}", "png": png(i), "txt": f"c{i}"} for i in range(3)])
    with tarfile.open(root / "a.tar") as tar:
        at = tar.getmember("k2.png").offset  # a cut exactly between two samples: only the missing marker tells
    (root / "a.tar").write_bytes((root / "a.tar").read_bytes()[:at])
    (root / "b.tar").write_bytes(b"this is not a tar archive" * 40)
    src = WebDatasetSource(str(root))
    # The sample before the cut might have had more members after it: dropped with the cut.
    assert [src.key(i) for i in range(len(src))] == ["a.tar/k0"]
    assert [(reason, name) for reason, name, _ in src.problems] == [(im.TRUNCATED, "a.tar"), (im.UNREADABLE, "b.tar")]
    assert "no end-of-archive marker" in src.problems[0][2]


# --------------------------------------------------------------------------------------------------
# parquet


def test_parquet_cache_holds_the_good_rows_and_reports_the_bad(tmp_path: Path, encoders_dir: Path) -> None:
    write_parquet(
        tmp_path / "data" / "train-00000-of-00002.parquet",
        [
            {"bytes": png(0), "path": "0.png"},
            None,  # a null image
            {"bytes": None, "path": "elsewhere/2.png"},  # a path without bytes: not here
            {"bytes": b"garbage", "path": "3.png"},
            {"bytes": png(4), "path": None},
        ],
        ["a cat", "null image", "path only", "bad bytes", None],
    )
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", [{"bytes": png(5), "path": None}], ["a dog"])
    cache_dir = tmp_path / "cache"
    cfg = config(tmp_path / "data" / "train-*.parquet", "parquet", cache_dir, encoders_dir)
    assert cli_cache(tmp_path, cfg) == 0
    records = cached(cache_dir)
    assert sorted(records) == ["train-00000-of-00002.parquet[0]", "train-00001-of-00002.parquet[0]"]
    assert [records[k]["caption"].decode() for k in sorted(records)] == ["a cat", "a dog"]
    assert skipped(cache_dir) == {
        im.IMAGE_MISSING: ["train-00000-of-00002.parquet[1]", "train-00000-of-00002.parquet[2]"],
        im.NOT_AN_IMAGE: ["train-00000-of-00002.parquet[3]"],
        im.CAPTION_MISSING: ["train-00000-of-00002.parquet[4]"],
    }
    report = json.loads((cache_dir / "report.json").read_text())
    assert "only a path, 'elsewhere/2.png'" in report["skipped"][im.IMAGE_MISSING][1]["detail"]


def test_parquet_raw_binary_column_and_unreadable_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    pq.write_table(pa.table({"jpg": pa.array([png(0), None], pa.binary()), "caption": ["x", "y"]}), root / "a.parquet")
    (root / "b.parquet").write_bytes(b"PAR1 cut off")
    src = ParquetSource(str(root), image_key="jpg", caption_key="caption")
    assert len(src) == 2 and src[0].image == png(0) and src[0].caption == "x"
    with pytest.raises(im.BadExample, match="null image"):
        src[1]
    assert [(reason, name) for reason, name, _ in src.problems] == [(im.UNREADABLE, "b.parquet")]
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(data\.caption_key\); it has \['jpg', 'capt"):
        ParquetSource(str(root / "a.parquet"), image_key="jpg")


# --------------------------------------------------------------------------------------------------
# Both


def test_folder_webdataset_and_parquet_give_the_same_cache(tmp_path: Path, encoders_dir: Path) -> None:
    from flux_jax.data.encoding import FluxEncoders, resolve_encoder_paths
    from flux_jax.sharding import make_mesh

    captions = ["a red house", "a cat on a mat", "a blue boat"]
    (tmp_path / "photos").mkdir()
    for i, caption in enumerate(captions):
        (tmp_path / "photos" / f"{i}.png").write_bytes(png(10 + i))
        (tmp_path / "photos" / f"{i}.txt").write_text(caption)
    write_shard(
        tmp_path / "shards" / "00000.tar",
        [{"__key__": f"{i:09d}", "png": png(10 + i), "json": {"text": c}} for i, c in enumerate(captions)],
    )
    images = [{"bytes": png(10 + i), "path": f"{i}.png"} for i in range(3)]
    write_parquet(tmp_path / "pq" / "train.parquet", images, captions)

    cfgs = {
        source: from_dict(config(tmp_path / path, source, tmp_path / f"cache-{source}", encoders_dir, flip=True))
        for source, path in (("folder", "photos"), ("webdataset", "shards"), ("parquet", "pq"))
    }
    paths, _ = resolve_encoder_paths(cfgs["folder"], tmp_path / "unused")
    encoders = FluxEncoders.load(paths, mesh=make_mesh(-1, 1, 1), dtype="fp32", t5_max_length=16)
    results = {}
    for source, cfg in cfgs.items():
        assert build_cache(cfg, progress=False, encoders=encoders).records == 6  # 3 images, mirrored or not
        reader = LatentCacheReader(cfg.data.cache_dir)
        results[source] = reader.read_many(range(len(reader)))
    assert [r["source"].decode() for r in results["parquet"]][::2] == [f"train.parquet[{i}]" for i in range(3)]
    for source in ("webdataset", "parquet"):
        for a, b in zip(results["folder"], results[source], strict=True):
            for field in FIELDS:
                np.testing.assert_array_equal(np.asarray(a[field]), np.asarray(b[field]), err_msg=f"{source} {field}")


def test_fingerprints_are_stable_and_follow_captions(tmp_path: Path) -> None:
    def shards(caption: str) -> WebDatasetSource:
        write_shard(tmp_path / "s" / "0.tar", [{"__key__": "k", "png": png(0), "txt": caption}])
        return WebDatasetSource(str(tmp_path / "s" / "{0..0}.tar"))

    def table(caption: str) -> ParquetSource:
        write_parquet(tmp_path / "p" / "0.parquet", [{"bytes": png(0), "path": None}], [caption])
        return ParquetSource(str(tmp_path / "p"))

    for make in (shards, table):
        first, again = make("a cat").fingerprint(), make("a cat").fingerprint()
        assert first == again
        assert make("a dog").fingerprint() != first
    assert shards("x").fingerprint() != table("x").fingerprint()


@pytest.mark.parametrize(
    ("source", "path", "message"),
    [
        ("webdataset", "missing", "missing: no such tar file or directory"),
        ("webdataset", "empty", "empty: no .tar files in this directory"),
        ("webdataset", "empty/*.tar", "empty/*.tar: no tar files match"),
        ("webdataset", "empty/{0..1}.tar", "empty/0.tar: no such tar file or directory"),
        ("parquet", "missing/*.parquet", "missing/*.parquet: no parquet files match"),
    ],
)
def test_a_path_with_no_shards_is_one_line(tmp_path: Path, capsys, source: str, path: str, message: str) -> None:
    from flux_jax.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a shard")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data:\n  source: {source}\n  path: {tmp_path / path}\n  cache_dir: {tmp_path / 'cache'}\n")
    assert main(["cache", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"flux-jax cache: error: {tmp_path / message}"], err
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError):
        open_source(DataConfig(source=source, path=str(tmp_path / path)))


def summary(src) -> dict:
    """What a source holds, as JSON: fingerprint, problems, and every example's key, image bytes and caption."""
    rows = []
    for i in range(len(src)):
        r = src[i]
        rows.append([r.key, r.image.hex(), r.caption.decode() if isinstance(r.caption, bytes) else r.caption])
    return {"fingerprint": src.fingerprint(), "problems": [list(p) for p in src.problems], "rows": rows}


# Run in a child with the fake GCS server's environment: copies the local shards and parquet files into the bucket,
# then opens them from gs:// (a directory, a glob, a brace range) and prints what they hold.
READ_FROM_GCS = """
import json, sys
from pathlib import Path
from etils import epath
from flux_jax.data.web_sources import ParquetSource, WebDatasetSource
from tests.test_sources_web import summary

local, bucket = Path(sys.argv[1]), sys.argv[2]
for file in sorted(p for p in local.rglob("*") if p.is_file()):
    target = epath.Path(bucket) / file.relative_to(local).as_posix()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(file.read_bytes())
specs = [f"{bucket}/shards", f"{bucket}/shards/0000*.tar", f"{bucket}/shards/{{00000..00001}}.tar"]
out = [summary(WebDatasetSource(spec)) for spec in specs] + [summary(ParquetSource(f"{bucket}/pq"))]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_shards_in_a_bucket_read_as_local_ones(tmp_path: Path) -> None:
    """gs:// through etils.epath (its gcsfs backend, talking to the in-memory GCS server of tests/helpers)."""
    import os
    import subprocess
    import sys

    from tests.helpers.gcs_server import fake_gcs

    corrupt_shards(tmp_path / "data" / "shards")
    write_parquet(
        tmp_path / "data" / "pq" / "a.parquet", [{"bytes": png(i), "path": None} for i in range(3)], ["x", "y", "z"]
    )
    shards = summary(WebDatasetSource(str(tmp_path / "data" / "shards")))
    table = summary(ParquetSource(str(tmp_path / "data" / "pq")))
    assert len(shards["rows"]) == 6 and shards["problems"][0][:2] == [im.TRUNCATED, "00001.tar"]
    with fake_gcs("shards-bucket") as url:
        env = dict(
            os.environ,
            PYTHONPATH=str(Path(__file__).resolve().parents[1]),
            EPATH_USE_TF="false",  # epath's gcsfs backend honours STORAGE_EMULATOR_HOST; TF's gfile would not
            STORAGE_EMULATOR_HOST=url,
            GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
            GOOGLE_CLOUD_PROJECT="test",
        )
        done = subprocess.run(
            [sys.executable, "-c", READ_FROM_GCS, str(tmp_path / "data"), "gs://shards-bucket/web"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [shards, shards, shards, table]
