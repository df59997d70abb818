"""Dataset sources: kohya folders, metadata.jsonl/csv, and TFDS (the project's folder builder, by dir and name)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_jax.data import images as im
from flux_jax.data.sources import FolderSource, TfdsSource, open_source
from flux_jax.run_config import DataConfig


def jpeg(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def kohya(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "10_dog").mkdir(parents=True)
    (root / "cats").mkdir()
    (root / ".thumbs").mkdir()
    (root / "a.jpg").write_bytes(jpeg(0))
    (root / "a.txt").write_text("a photo of a cat\n")
    (root / "10_dog" / "d1.png").write_bytes(jpeg(1))  # content sniffed, not the extension
    (root / "10_dog" / "d1.txt").write_bytes("a dog \u00e9".encode())
    (root / "cats" / "c.JPG").write_bytes(jpeg(2))  # no caption file
    (root / ".thumbs" / "x.jpg").write_bytes(jpeg(3))  # hidden: ignored
    (root / "notes.md").write_text("not an image extension: ignored")
    return root


def test_folder_lists_images_with_captions_and_kohya_repeats(kohya: Path) -> None:
    src = FolderSource(kohya)
    assert [src.key(i) for i in range(len(src))] == ["10_dog/d1.png", "a.jpg", "cats/c.JPG"]
    examples = [src[i] for i in range(len(src))]
    assert [e.repeats for e in examples] == [10, 1, 1]
    assert examples[0].caption == "a dog \u00e9".encode() and examples[0].image == jpeg(1)
    assert examples[1].caption == b"a photo of a cat\n"
    assert examples[2].caption is None
    assert src.problems == []


def test_folder_metadata_jsonl_and_csv(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg", "z.jpg", "sub/w.jpg"):
        (root / name).write_bytes(jpeg(len(name)))
    (root / "z.txt").write_text("from the caption file")
    lines = [
        json.dumps({"file_name": "x.jpg", "text": "caption x"}),
        b'{"file_name": "y.jpg", "text": "caf\xe9"}'.decode("latin-1"),  # rewritten as bytes below
        "{not json",
        json.dumps({"file_name": "gone.jpg", "text": "no such file"}),
        json.dumps({"file_name": "x.jpg", "text": "duplicate"}),
    ]
    raw = "\n".join(lines).encode("utf-8").replace("caf\u00e9".encode(), b"caf\xe9")
    (root / "metadata.jsonl").write_bytes(raw)
    (root / "sub" / "metadata.csv").write_text('file_name,text\nw.jpg,"a, quoted caption"\n')
    src = FolderSource(root)
    got = {src.key(i): src[i].caption for i in range(len(src))}
    assert got["x.jpg"] == "caption x"
    assert got["z.jpg"] == b"from the caption file"  # not in metadata: caption file
    assert got["sub/w.jpg"] == "a, quoted caption"
    with pytest.raises(im.BadExample) as info:
        im.decode_caption(got["y.jpg"])
    assert info.value.reason == im.CAPTION_NOT_UTF8
    problems = {(reason, name) for reason, name, _ in src.problems}
    assert problems == {
        (im.BAD_METADATA, "metadata.jsonl:3"),
        (im.BAD_METADATA, "metadata.jsonl:5"),
        (im.IMAGE_MISSING, "gone.jpg"),
    }


def test_folder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(im.DataError, match="not found"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(im.DataError, match="no images"):
        FolderSource(tmp_path / "empty")
    (tmp_path / "zero" / "0_x").mkdir(parents=True)
    (tmp_path / "zero" / "0_x" / "a.jpg").write_bytes(jpeg(0))
    with pytest.raises(im.DataError, match="at least once"):
        FolderSource(tmp_path / "zero")
    with pytest.raises(im.DataError, match="data.path is empty"):
        open_source(DataConfig())


@pytest.mark.parametrize(
    "file_name",
    ["/etc/passwd", "../outside.jpg", "sub/../../outside.jpg", "C:\\photos\\x.jpg"],
    ids=["absolute", "parent", "climbs-out", "windows-drive"],
)
def test_metadata_must_not_point_outside_its_folder(tmp_path: Path, file_name: str) -> None:
    """An absolute or climbing ``file_name`` is one clear error naming the metadata line (not a ValueError from
    pathlib, and never a file outside the dataset); the same row with a plain name is fine."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "x.jpg").write_bytes(jpeg(0))
    (tmp_path / "outside.jpg").write_bytes(jpeg(1))
    rows = [{"file_name": "x.jpg", "text": "fine"}, {"file_name": file_name, "text": "hostile"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(im.DataError) as err:
        FolderSource(root)
    message = str(err.value)
    assert message.startswith(f"{root / 'metadata.jsonl'}:2: file_name {file_name!r}") and "\n" not in message
    assert "never outside it" in message
    (root / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert FolderSource(root).entries[0].caption == ("text", "fine")


def test_metadata_path_error_is_one_line_from_the_cli(tmp_path: Path, capsys) -> None:
    from flux_jax.cli import main

    root = tmp_path / "ds"
    root.mkdir()
    (root / "x.jpg").write_bytes(jpeg(0))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": str(root / "x.jpg"), "text": "abs"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {root}\n  cache_dir: {tmp_path / 'cache'}\n")
    assert main(["cache", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"error: {root / 'metadata.jsonl'}:1: file_name" in err, err
    assert "Traceback" not in err and not (tmp_path / "cache").exists()


def test_unreadable_file_is_reported(kohya: Path) -> None:
    src = FolderSource(kohya)
    (kohya / "a.jpg").unlink()  # vanished after listing
    with pytest.raises(im.BadExample) as info:
        src[1]
    assert info.value.reason == im.UNREADABLE


# --------------------------------------------------------------------------------------------------
# TFDS (imports TensorFlow: a few seconds, once)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from flux_jax.data.tfds_builders import build_folder_dataset

    base = tmp_path_factory.mktemp("tfds")
    root = base / "photos"
    (root / "3_set").mkdir(parents=True)
    (root / "good.jpg").write_bytes(jpeg(0))
    (root / "good.txt").write_bytes(b"a photo of a cat")
    (root / "3_set" / "nocap.jpg").write_bytes(jpeg(1))
    (root / "3_set" / "bad.jpg").write_bytes(b"")
    (root / "3_set" / "bad.txt").write_bytes(b"\xff\xfe latin")
    data_dir = base / "data"
    return root, data_dir, build_folder_dataset(root, data_dir)


def test_folder_builder_round_trips_through_tfds(packed: tuple[Path, Path, Path]) -> None:
    root, _, dataset_dir = packed
    assert (dataset_dir / "dataset_info.json").is_file()
    assert list(dataset_dir.glob("*.array_record*"))
    folder, tfds_src = FolderSource(root), TfdsSource(str(dataset_dir))
    assert len(tfds_src) == len(folder) == 3
    for i in range(3):
        a, b = folder[i], tfds_src[i]
        assert (b.key, b.image, b.repeats) == (a.key, a.image, a.repeats)
        assert b.caption == a.caption  # raw bytes kept, bad ones included; None stays None
    assert tfds_src[0].caption == b"\xff\xfe latin" and tfds_src[1].caption is None


def test_tfds_source_by_name_and_its_errors(packed: tuple[Path, Path, Path]) -> None:
    _, data_dir, _ = packed
    cfg = DataConfig(source="tfds", path="flux_jax_folder_images", tfds_data_dir=str(data_dir))
    src = open_source(cfg)
    assert isinstance(src, TfdsSource) and len(src) == 3
    with pytest.raises(im.DataError, match="no feature 'caption'"):
        TfdsSource("flux_jax_folder_images", data_dir=str(data_dir), caption_key="caption")
    with pytest.raises(im.DataError, match="no split 'test'"):
        TfdsSource("flux_jax_folder_images", data_dir=str(data_dir), split="test")
    with pytest.raises(im.DataError, match="not prepared"):
        TfdsSource("flux_jax_folder_images", data_dir=str(data_dir / "elsewhere"))


def test_demo_photos_and_config() -> None:
    """The shipped demo: 8 photos with captions fill all three 192-px buckets without upscaling."""
    from flux_jax.commands.demo import DEMO_CONFIG, DEMO_PHOTOS
    from flux_jax.data.buckets import BucketSpec
    from flux_jax.data.cache import scan
    from flux_jax.data.demo import DEMO_CORPUS
    from flux_jax.run_config import load_config

    photos = Path(str(DEMO_PHOTOS))
    cfg = load_config(Path(str(DEMO_CONFIG)), [f"data.path={photos}"])
    cfg.validate_for_training()
    spec = BucketSpec.from_config(cfg.data)
    items, report = scan(open_source(cfg.data), cfg.data, spec)
    assert report.used == report.total == 8 and report.converted == {im.GRAYSCALE: ["cameraman.jpg", "page.jpg"]}
    assert {str(spec.all_buckets[it.bucket]) for it in items} == {"128x256", "192x192", "256x128"}
    assert all(it.caption in DEMO_CORPUS for it in items)  # the tiny tokenizers keep these words whole
    assert sum((photos / it.key).stat().st_size for it in items) < 100_000
