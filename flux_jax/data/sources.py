"""Where images and captions come from: a folder (kohya layout or metadata files), any TFDS dataset, or the
web-scale formats in `web_sources` (webdataset tar shards, parquet files).

Every source is random access and yields `RawExample`s: undecoded image bytes (or an array), the raw caption
(bytes, text, or None when there is none) and the number of times the example repeats per epoch. Decoding and
validation happen later, in one place (`images.py`), so bad files are handled the same whatever their source.

Folder layout (sorted, hidden files ignored, searched recursively):

  photos/cat.jpg + photos/cat.txt            a caption file per image (``caption_ext``)
  photos/10_dog/a.png + photos/10_dog/a.txt  kohya: a top-level ``N_name`` folder repeats its images N times
  photos/metadata.jsonl                      {"file_name": "cat.jpg", "text": "..."} per line (``caption_key``);
  photos/metadata.csv                        or a CSV with those columns. Entries apply to files relative to
                                             the metadata file's folder and win over caption files; a
                                             ``file_name`` that is absolute or climbs out of that folder
                                             (``..``) is an error naming the line.

`Source.fingerprint` is a digest of what a source holds that needs no image decoding (names, sizes, captions):
the cache records it, and the trainer refuses a cache whose data is not the configured ``data.path``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Protocol

import numpy as np

from flux_jax.data.images import BAD_METADATA, IMAGE_MISSING, UNREADABLE, BadExample
from flux_jax.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMN = "file_name"  # the Hugging Face imagefolder convention
_REPEATS = re.compile(r"^(\d+)_(.+)$")


@dataclasses.dataclass(frozen=True)
class RawExample:
    key: str
    """Stable name for reports and cache ids: the relative path, or ``split[index]`` for TFDS."""
    image: bytes | np.ndarray
    caption: bytes | str | None
    repeats: int = 1


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawExample:
        """Raises `BadExample` when the example cannot even be read."""
        ...

    def key(self, index: int) -> str: ...

    def describe(self) -> str: ...

    def fingerprint(self) -> str:
        """A digest of the examples' names, sizes and captions (no image decoding): equal for the same data."""
        ...

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        """(reason, name, detail) for inputs found broken while listing (bad metadata lines, missing files)."""
        ...


# --------------------------------------------------------------------------------------------------
# Folder


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    path: Path
    caption: tuple[str, Any]  # ("file", Path) or ("text", str | None)
    repeats: int


class FolderSource:
    """Images under ``root`` with their captions; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike, *, caption_ext: str = ".txt", caption_key: str = "text"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found")
        self.caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
        self.caption_key = caption_key
        self._problems: list[tuple[str, str, str]] = []
        self.entries = self._scan()

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        return list(self._problems)

    def _repeats(self, rel: Path) -> int:
        if len(rel.parts) < 2 or not (m := _REPEATS.match(rel.parts[0])):
            return 1
        if int(m.group(1)) < 1:
            raise DataError(f"{self.root / rel.parts[0]}: a kohya folder must repeat at least once")
        return int(m.group(1))

    def _scan(self) -> list[_Entry]:
        entries = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            metadata = self._read_metadata(here, filenames)
            for name in sorted(filenames):
                path = here / name
                if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                rel = path.relative_to(self.root)
                if rel.as_posix() in metadata:
                    caption = ("text", metadata.pop(rel.as_posix()))
                else:
                    caption = ("file", path.with_suffix(self.caption_ext))
                entries.append(_Entry(rel.as_posix(), path, caption, self._repeats(rel)))
            for missing in sorted(metadata):
                self._problems.append((IMAGE_MISSING, missing, "listed in metadata, no such image file"))
        entries.sort(key=lambda e: e.key)
        if not entries and not self._problems:
            raise DataError(f"{self.root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
        return entries

    def _read_metadata(self, folder: Path, filenames: list[str]) -> dict[str, str | None]:
        """file key -> caption (None when the row has no caption) from this folder's metadata files."""
        out: dict[str, str | None] = {}
        for meta in METADATA_FILES:
            if meta not in filenames:
                continue
            path = folder / meta
            where = path.relative_to(self.root).as_posix()
            try:
                # surrogateescape keeps a non-UTF-8 caption attributable to its row (decode_caption refuses it).
                text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
            except OSError as e:
                self._problems.append((BAD_METADATA, where, f"cannot read: {e}"))
                continue
            rows = self._jsonl_rows(text, where) if meta.endswith(".jsonl") else self._csv_rows(text, where)
            for line, row in rows:
                file_name = row.get(FILE_COLUMN)
                caption = row.get(self.caption_key)
                if (
                    not isinstance(file_name, str)
                    or not file_name
                    or (caption is not None and not isinstance(caption, str))
                ):
                    self._problems.append(
                        (
                            BAD_METADATA,
                            f"{where}:{line}",
                            f"needs a {FILE_COLUMN!r} string and a {self.caption_key!r} string",
                        )
                    )
                    continue
                if _escapes(file_name):
                    raise DataError(
                        f"{path}:{line}: {FILE_COLUMN} {file_name!r} is absolute or leaves the folder; a metadata "
                        f"file names images by their path relative to its own folder ({folder}), never outside it"
                    )
                key = (folder / file_name).relative_to(self.root).as_posix()
                if key in out:
                    self._problems.append((BAD_METADATA, f"{where}:{line}", f"{file_name} is listed twice; first kept"))
                    continue
                out[key] = caption
        return out

    def _jsonl_rows(self, text: str, where: str) -> Iterator[tuple[int, dict]]:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self._problems.append((BAD_METADATA, f"{where}:{line_no}", f"invalid JSON: {e.msg}"))
                continue
            if not isinstance(row, dict):
                self._problems.append((BAD_METADATA, f"{where}:{line_no}", "not a JSON object"))
                continue
            yield line_no, row

    def _csv_rows(self, text: str, where: str) -> Iterator[tuple[int, dict]]:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or FILE_COLUMN not in reader.fieldnames:
            self._problems.append((BAD_METADATA, where, f"the header has no {FILE_COLUMN!r} column"))
            return
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, index: int) -> str:
        return self.entries[index].key

    def __getitem__(self, index: int) -> RawExample:
        entry = self.entries[index]
        try:
            image = entry.path.read_bytes()
        except OSError as e:
            raise BadExample(UNREADABLE, str(e)) from None
        kind, value = entry.caption
        if kind == "file":
            try:
                caption = value.read_bytes()
            except FileNotFoundError:
                caption = None
            except OSError as e:
                raise BadExample(UNREADABLE, f"caption {value.name}: {e}") from None
        else:
            caption = value
        return RawExample(entry.key, image, caption, entry.repeats)

    def describe(self) -> str:
        return f"folder {self.root} ({len(self)} images)"

    def fingerprint(self) -> str:
        """Each image's key, size and repeats and its caption (the metadata text or the caption file's bytes)."""
        h = hashlib.sha256(b"folder\0")
        for entry in self.entries:
            try:
                size = entry.path.stat().st_size
            except OSError:
                size = -1
            kind, value = entry.caption
            if kind == "file":
                try:
                    caption = b"f" + value.read_bytes()
                except FileNotFoundError:
                    caption = b"-"
                except OSError:
                    caption = b"!"
            else:
                caption = b"-" if value is None else b"t" + value.encode("utf-8", "surrogateescape")
            head = json.dumps([entry.key, size, entry.repeats]).encode("utf-8", "surrogateescape")
            for part in (head, caption):
                h.update(len(part).to_bytes(8, "little") + part)
        return h.hexdigest()[:32]


def _escapes(file_name: str) -> bool:
    """Whether a metadata ``file_name`` is absolute (POSIX or Windows style) or has a ``..`` component."""
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    return posix.is_absolute() or bool(windows.drive or windows.root) or ".." in posix.parts or ".." in windows.parts


# --------------------------------------------------------------------------------------------------
# TFDS


class TfdsSource:
    """A TFDS dataset by name (in ``data_dir``) or by prepared directory, read through its random-access data
    source (array_record). Image features are read undecoded so `images.decode_image` sees the original
    bytes; features ``source`` (file name), ``repeats`` and ``has_text`` are used when present (the project's
    folder builder writes them)."""

    def __init__(
        self,
        name_or_dir: str,
        *,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "text",
    ):
        import tensorflow_datasets as tfds

        path = Path(name_or_dir)
        if (path / "dataset_info.json").is_file():
            builder = tfds.builder_from_directory(str(path))
        else:
            try:
                builder = tfds.builder(name_or_dir, data_dir=data_dir)
            except Exception as e:  # TFDS raises several types for unknown names (DatasetNotFoundError, ...)
                raise DataError(f"TFDS dataset {name_or_dir!r}: {e}") from None
            if not builder.is_prepared():
                raise DataError(
                    f"TFDS dataset {name_or_dir!r} is not prepared in {builder.data_dir}; build it first "
                    "(tfds build, or download_and_prepare) or point data.path at a prepared directory"
                )
        features = builder.info.features
        for field, key in (("image_key", image_key), ("caption_key", caption_key)):
            if key not in features:
                raise DataError(
                    f"TFDS dataset {builder.name}: no feature {key!r} (data.{field}); it has {sorted(features)}"
                )
        if split not in builder.info.splits:
            raise DataError(f"TFDS dataset {builder.name}: no split {split!r}; it has {sorted(builder.info.splits)}")
        decoders = (
            {image_key: tfds.decode.SkipDecoding()} if isinstance(features[image_key], tfds.features.Image) else None
        )
        self.name = builder.name
        self._identity = [
            builder.name,
            str(builder.version),
            split,
            image_key,
            caption_key,
            int(builder.info.splits[split].num_examples),
            int(builder.info.splits[split].num_bytes),
            [int(n) for n in builder.info.splits[split].shard_lengths],
        ]
        self.split = split
        self.image_key = image_key
        self.caption_key = caption_key
        self._optional = {k for k in ("source", "repeats", "has_text") if k in features}
        self.data = builder.as_data_source(split, decoders=decoders)

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        return []

    def __len__(self) -> int:
        return len(self.data)

    def key(self, index: int) -> str:
        if "source" in self._optional:
            return _text(self.data[index]["source"])
        return f"{self.split}[{index}]"

    def __getitem__(self, index: int) -> RawExample:
        record = self.data[index]
        key = _text(record["source"]) if "source" in self._optional else f"{self.split}[{index}]"
        caption = record[self.caption_key]
        if "has_text" in self._optional and not bool(record["has_text"]):
            caption = None
        repeats = int(record["repeats"]) if "repeats" in self._optional else 1
        return RawExample(key, record[self.image_key], caption, repeats)

    def describe(self) -> str:
        return f"TFDS {self.name} split {self.split} ({len(self)} examples)"

    def fingerprint(self) -> str:
        """Name, version, split, feature keys, example count, bytes and shard lengths from the dataset's info."""
        return hashlib.sha256(json.dumps(["tfds", *self._identity]).encode()).hexdigest()[:32]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def open_source(data: Any) -> Source:
    """The source a `run_config.DataConfig` describes."""
    if not data.path:
        raise DataError("data.path is empty: set it to an image folder, a TFDS dataset, tar shards or parquet files")
    if data.source == "tfds":
        return TfdsSource(
            data.path,
            split=data.split,
            data_dir=data.tfds_data_dir,
            image_key=data.image_key,
            caption_key=data.caption_key,
        )
    if data.source in ("webdataset", "parquet"):
        # web_sources builds on this module (RawExample, IMAGE_EXTENSIONS): imported here, not at the top.
        from flux_jax.data.web_sources import ParquetSource, WebDatasetSource

        if data.source == "webdataset":
            return WebDatasetSource(data.path, caption_ext=data.caption_ext, caption_key=data.caption_key)
        return ParquetSource(data.path, image_key=data.image_key, caption_key=data.caption_key)
    return FolderSource(data.path, caption_ext=data.caption_ext, caption_key=data.caption_key)
