"""Web-scale sources: webdataset tar shards (as img2dataset writes them) and parquet files (Hugging Face layout).

``data.path`` names the shards: a directory (its ``.tar`` / ``.parquet`` files, not recursive), a glob
(``shards/*.tar``), a brace range (``shards/{00000..00099}.tar``) or several of these joined by ``::`` (webdataset's
own shard-spec syntax); each is a local path or a URL that etils.epath opens (``gs://bucket/shards``), as the run
directory is (`flux_jax.storage`). Keys name the shard relative to the shards' common folder: ``00000.tar/000000012``
for a tar sample, ``train-00000.parquet[12]`` for a parquet row.

webdataset: a sample is the consecutive tar members sharing a name up to the first dot (webdataset's
``base_plus_ext``): ``000000012.jpg`` (any image extension folders accept) with ``000000012.txt`` (``caption_ext``)
or ``000000012.json`` (the caption under ``caption_key``; img2dataset writes both). A tar is indexed once, reading
only headers and the small caption members: the index holds each sample's key and the offsets and sizes of its image
and caption, and an image is read from its offset when asked for, so no image bytes are held. webdataset's own
readers stream a shard's members without their offsets (random access through them would hold a shard's bytes or
re-read it from the start), so the index is built with the standard library's tarfile; webdataset gives the sample
grouping, the ``__*__`` metadata convention and the shard-spec expansion. A shard cut short (a broken download)
keeps the samples before the cut and is reported once as ``truncated`` naming the shard; the sample being read at
the cut is dropped with it, since its caption may be what was lost.

parquet: ``image_key`` is a struct ``{"bytes", "path"}`` (the datasets ``Image`` feature) or a binary column,
``caption_key`` a string (or binary) column. Only the caption column is read up front (kept as an Arrow array); an
image is read with the rest of its row group's image column, and the last few row groups read are kept: the cache
reads images in source order within each bucket, so each row group is read about once per bucket it has images in.
A row with a null image is refused as ``image_missing``.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import glob as globlib
import hashlib
import json
import os
import tarfile
import threading
from typing import Any

import numpy as np
from etils import epath

from flux_jax.data.images import BAD_METADATA, IMAGE_MISSING, TRUNCATED, UNREADABLE, BadExample
from flux_jax.data.sources import IMAGE_EXTENSIONS, RawExample
from flux_jax.errors import DataError
from flux_jax.storage import is_remote

_GLOB_CHARS = frozenset("*?[")
_BLOCK = tarfile.BLOCKSIZE


def _expand(spec: str) -> list[str]:
    """webdataset's shard-spec expansion: ``::``-separated parts, each brace-expanded."""
    # webdataset imports torch when it is installed (seconds): only the sources that read shards pay for it.
    from webdataset.shardlists import expand_urls

    return list(expand_urls(spec))


def _glob(pattern: str) -> list[str]:
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    # epath globs below a directory: split the pattern at the first folder with a wildcard.
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    base = epath.Path("/".join(parts[:first]))
    return sorted(os.fspath(p) for p in base.glob("/".join(parts[first:])))


def resolve_shards(spec: str, suffix: str, what: str) -> tuple[list[str], list[str]]:
    """The files ``spec`` names (see the module docstring) and their names relative to their common folder.

    A directory gives its ``*suffix`` files; a glob must match something; a named file must exist. Anything else
    is a `DataError` naming the path."""
    files: list[str] = []
    for part in _expand(spec):
        if _GLOB_CHARS & set(part):
            found = [f for f in _glob(part) if not epath.Path(f).is_dir()]
            if not found:
                raise DataError(f"{part}: no {what} files match")
            files.extend(found)
            continue
        path = epath.Path(part)
        try:
            is_dir, exists = path.is_dir(), path.exists()
        except Exception as e:  # the backends raise their own types for a bucket that cannot be reached
            raise DataError(f"{part}: cannot read ({e})") from None
        if is_dir:
            found = sorted(os.fspath(p) for p in path.iterdir() if p.name.endswith(suffix) and not p.is_dir())
            if not found:
                raise DataError(f"{part}: no {suffix} files in this directory")
            files.extend(found)
        elif exists:
            files.append(os.fspath(path))
        else:
            raise DataError(f"{part}: no such {what} file or directory")
    seen: set[str] = set()
    files = [f for f in files if not (f in seen or seen.add(f))]
    return files, _relative_names(files)


def _relative_names(files: list[str]) -> list[str]:
    """Each file's path below the files' deepest common folder (just the file name when they share one folder)."""
    split = [f.split("/") for f in files]
    common = split[0][:-1]
    for parts in split[1:]:
        n = 0
        while n < min(len(common), len(parts) - 1) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ["/".join(parts[len(common) :]) for parts in split]


def _open(path: str):
    return open(path, "rb") if not is_remote(path) else epath.Path(path).open("rb")


def _digest_part(h: Any, *parts: Any) -> None:
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part).encode("utf-8", "surrogateescape")
        h.update(len(data).to_bytes(8, "little") + data)


def _unreadable(name: str) -> bytes:
    digest = hashlib.sha256()
    _digest_part(digest, name, "unreadable")
    return digest.digest()


# --------------------------------------------------------------------------------------------------
# webdataset

_NO_CAPTION, _TEXT, _JSON = 0, 1, 2


class WebDatasetSource:
    """Samples of webdataset tar shards; see the module docstring."""

    def __init__(self, spec: str, *, caption_ext: str = ".txt", caption_key: str = "text"):
        from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

        self.spec = spec
        ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
        self.caption_ext = ext[1:].lower()
        self.caption_key = caption_key
        self._split = base_plus_ext
        self._meta = (meta_prefix, meta_suffix)
        self.shards, self.names = resolve_shards(spec, ".tar", "tar")
        self._problems: list[tuple[str, str, str]] = []
        self._digest = hashlib.sha256(b"webdataset\0")
        _digest_part(self._digest, self.caption_ext, caption_key)
        keys: list[str] = []
        columns: list[list[int]] = [[] for _ in range(6)]  # shard, image offset, size, caption kind, offset, size
        # Shards are indexed in parallel (in a bucket each is mostly waiting for reads), combined in order.
        with concurrent.futures.ThreadPoolExecutor(min(16, len(self.shards))) as pool:
            for rows, problems, digest in pool.map(self._index, range(len(self.shards))):
                self._problems.extend(problems)
                self._digest.update(digest)
                for key, row in rows:
                    keys.append(key)
                    for column, value in zip(columns, row, strict=True):
                        column.append(value)
        self.keys = keys
        self._shard, self._image_at, self._image_size, self._caption_kind, self._caption_at, self._caption_size = (
            np.asarray(c, np.int64) for c in columns
        )

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        return list(self._problems)

    def _index(self, shard: int) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[str, str, str]], bytes]:
        """One shard's usable samples as (key, (shard, image offset, size, caption kind, offset, size)), its
        problems (broken samples, a truncation) and the digest of what it holds."""
        path, name = self.shards[shard], self.names[shard]
        problems: list[tuple[str, str, str]] = []
        digest = hashlib.sha256()
        groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        captions: dict[int, bytes] = {}  # caption member offset -> its bytes
        cut, lost = None, None
        try:
            with _open(path) as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(0)
                end = 0
                try:
                    with tarfile.open(fileobj=f, mode="r:") as tar:
                        for member in tar:
                            prefix, suffix = self._split(member.name)
                            if member.offset_data + member.size > size:
                                cut = f"{member.name} needs {member.offset_data + member.size}"
                                # The sample of the member cut is lost; the one before it is whole (a sample's
                                # members are consecutive) unless it is the same sample.
                                lost = prefix
                                break
                            end = max(end, member.offset_data + -(-member.size // _BLOCK) * _BLOCK)
                            if not member.isreg() or self._is_meta(member.name) or prefix is None:
                                continue
                            if not groups or groups[-1][0] != prefix:
                                groups.append((prefix, {}))
                            suffix = suffix.lower()
                            if suffix not in groups[-1][1]:
                                groups[-1][1][suffix] = member
                                if suffix in (self.caption_ext, "json"):
                                    # Small members, read now: the fingerprint digests the captions.
                                    captions[member.offset_data] = tar.extractfile(member).read()
                except tarfile.ReadError as e:
                    if not groups and end == 0:
                        problems.append((UNREADABLE, name, f"not a tar archive ({e})"))
                        return [], problems, _unreadable(name)
                    cut = str(e)
                if cut is None:
                    f.seek(end)
                    marker = f.read(_BLOCK)
                    if len(marker) < _BLOCK or marker.strip(b"\0"):
                        # tarfile stops silently at a cut or a garbage header: only the end-of-archive marker tells.
                        cut = f"no end-of-archive marker at byte {end}"
                if cut is not None and lost is None and groups:
                    lost = groups[-1][0]  # the member after the cut, maybe of the same sample, is unknown
        except OSError as e:
            problems.append((UNREADABLE, name, str(e)))
            return [], problems, _unreadable(name)
        if cut is not None:
            if groups and groups[-1][0] == lost:
                groups.pop()
            detail = f"cut at byte {size} ({cut}): {len(groups)} samples before the cut used"
            problems.append((TRUNCATED, name, detail + (f", sample {lost} lost" if lost else "")))
        _digest_part(digest, name, size)
        out = []
        seen: set[str] = set()
        for prefix, members in groups:
            key = f"{name}/{prefix}"
            if prefix in seen:
                problems.append((BAD_METADATA, key, "the key appears again later in the shard; first kept"))
                continue
            seen.add(prefix)
            image = next((m for ext, m in members.items() if "." + ext in IMAGE_EXTENSIONS), None)
            if image is None:
                problems.append((IMAGE_MISSING, key, f"no image member (has {', '.join(sorted(members))})"))
                continue
            kind, caption = _NO_CAPTION, None
            if self.caption_ext != "json" and self.caption_ext in members:
                kind, caption = _TEXT, members[self.caption_ext]
            elif "json" in members:
                kind, caption = _JSON, members["json"]
            raw = captions[caption.offset_data] if caption else b""
            _digest_part(digest, key, image.name, image.size, kind, raw)
            at, length = (caption.offset_data, caption.size) if caption else (0, 0)
            out.append((key, (shard, image.offset_data, image.size, kind, at, length)))
        return out, problems, digest.digest()

    def _is_meta(self, name: str) -> bool:
        prefix, suffix = self._meta
        return "/" not in name and name.startswith(prefix) and name.endswith(suffix)

    def _caption(self, kind: int, raw: bytes) -> bytes | str | None:
        if kind == _TEXT:
            return raw
        if kind == _NO_CAPTION:
            return None
        try:
            meta = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
            raise BadExample(BAD_METADATA, f"invalid .json member: {e}") from None
        caption = meta.get(self.caption_key) if isinstance(meta, dict) else None
        if caption is not None and not isinstance(caption, str):
            raise BadExample(BAD_METADATA, f".json {self.caption_key!r} is {type(caption).__name__}, not a string")
        return caption

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return self.keys[index]

    def __getitem__(self, index: int) -> RawExample:
        shard = self.shards[int(self._shard[index])]
        reads = [(int(self._image_at[index]), int(self._image_size[index]))]
        kind = int(self._caption_kind[index])
        if kind != _NO_CAPTION:
            reads.append((int(self._caption_at[index]), int(self._caption_size[index])))
        try:
            with _open(shard) as f:
                data = []
                for at, size in reads:
                    f.seek(at)
                    data.append(f.read(size))
        except OSError as e:
            raise BadExample(UNREADABLE, str(e)) from None
        if any(len(d) != size for d, (_, size) in zip(data, reads, strict=True)):
            raise BadExample(UNREADABLE, f"{shard} is shorter than when it was indexed")
        caption = self._caption(kind, data[1]) if kind != _NO_CAPTION else None
        return RawExample(self.keys[index], data[0], caption)

    def describe(self) -> str:
        return f"webdataset {self.spec} ({len(self.shards)} shards, {len(self)} samples)"

    def fingerprint(self) -> str:
        """Each shard's name and size; each sample's key, image member name and size, and raw caption member."""
        return self._digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# parquet


@dataclasses.dataclass(frozen=True)
class _ParquetFile:
    path: str
    name: str
    row_starts: tuple[int, ...]
    """First row of each row group (and the number of rows at the end)."""
    captions: Any  # pyarrow ChunkedArray


class ParquetSource:
    """Rows of parquet files with an image and a caption column; see the module docstring."""

    ROW_GROUPS_KEPT = 4
    """Row groups' image columns kept in memory (the last ones read)."""

    def __init__(self, spec: str, *, image_key: str = "image", caption_key: str = "text"):
        self.spec = spec
        self.image_key = image_key
        self.caption_key = caption_key
        paths, names = resolve_shards(spec, ".parquet", "parquet")
        digest = hashlib.sha256(b"parquet\0")
        _digest_part(digest, image_key, caption_key)
        self.files: list[_ParquetFile] = []
        self._problems: list[tuple[str, str, str]] = []
        # Files are opened in parallel (in a bucket each is mostly waiting for reads), combined in order.
        with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:
            for file, problem, part in pool.map(self._open_file, paths, names):
                digest.update(part)
                if file is None:
                    self._problems.append(problem)
                else:
                    self.files.append(file)
        self._file_starts = np.cumsum([0] + [f.row_starts[-1] for f in self.files]).tolist()
        self._digest = digest.hexdigest()[:32]
        self._lock = threading.Lock()
        self._groups: collections.OrderedDict[tuple[int, int], concurrent.futures.Future] = collections.OrderedDict()

    def _open_file(self, path: str, name: str) -> tuple[_ParquetFile | None, tuple[str, str, str] | None, bytes]:
        """One file's row layout and captions (or why it cannot be read), and the digest of what it holds."""
        import pyarrow.parquet as pq

        try:
            with _open(path) as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(0)
                pf = pq.ParquetFile(f)
                self._check_columns(pf.schema_arrow, path)
                meta = pf.metadata
                captions = pf.read(columns=[self.caption_key]).column(0)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            # One broken file of many (a cut download) is reported and skipped, as a broken tar shard is.
            return None, (UNREADABLE, name, f"not a readable parquet file ({e})"), _unreadable(name)
        digest = hashlib.sha256()
        _digest_part(digest, name, size, meta.num_rows)
        starts = [0]
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            starts.append(starts[-1] + group.num_rows)
            # The image column's stored size stands in for the images' sizes (reading those means reading the
            # images); a struct column is stored as one leaf column per field, named "image.bytes" and so on.
            sizes = [
                group.column(c).total_compressed_size
                for c in range(group.num_columns)
                if group.column(c).path_in_schema.split(".")[0] == self.image_key
            ]
            _digest_part(digest, group.num_rows, sizes)
        for chunk in captions.chunks:
            _digest_part(digest, chunk.to_pylist())
        return _ParquetFile(path, name, tuple(starts), captions), None, digest.digest()

    def _check_columns(self, schema: Any, name: str) -> None:
        import pyarrow as pa

        for field, key in (("image_key", self.image_key), ("caption_key", self.caption_key)):
            if schema.get_field_index(key) < 0:
                raise DataError(f"{name}: no column {key!r} (data.{field}); it has {schema.names}")
        image = schema.field(self.image_key).type
        binary = (pa.types.is_binary, pa.types.is_large_binary)
        is_struct = pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
        if not (is_struct and any(t(image.field("bytes").type) for t in binary) or any(t(image) for t in binary)):
            raise DataError(
                f"{name}: column {self.image_key!r} is {image}; it must be binary or a struct with binary 'bytes'"
            )
        caption = schema.field(self.caption_key).type
        if not any(t(caption) for t in (*binary, pa.types.is_string, pa.types.is_large_string)):
            raise DataError(f"{name}: column {self.caption_key!r} is {caption}; it must be a string column")

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        return list(self._problems)

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        file = bisect.bisect_right(self._file_starts, index) - 1
        return file, index - self._file_starts[file]

    def __len__(self) -> int:
        return self._file_starts[-1]

    def key(self, index: int) -> str:
        file, row = self._locate(index)
        return f"{self.files[file].name}[{row}]"

    def _row_group(self, file: int, group: int) -> Any:
        """The image column of one row group, read once however many threads ask for it."""
        import pyarrow.parquet as pq

        with self._lock:
            future = self._groups.get((file, group))
            if future is not None:
                self._groups.move_to_end((file, group))
                waiting = True
            else:
                future = self._groups[(file, group)] = concurrent.futures.Future()
                while len(self._groups) > self.ROW_GROUPS_KEPT:
                    self._groups.popitem(last=False)
                waiting = False
        if not waiting:
            try:
                with _open(self.files[file].path) as f:
                    future.set_result(pq.ParquetFile(f).read_row_group(group, columns=[self.image_key]).column(0))
            except Exception as e:  # handed to every thread waiting for this row group, and not kept
                with self._lock:
                    if self._groups.get((file, group)) is future:
                        del self._groups[(file, group)]
                future.set_exception(e)
        return future.result()

    def __getitem__(self, index: int) -> RawExample:
        file, row = self._locate(index)
        pf = self.files[file]
        key = f"{pf.name}[{row}]"
        group = bisect.bisect_right(pf.row_starts, row) - 1
        try:
            column = self._row_group(file, group)
        except (OSError, ValueError) as e:
            raise BadExample(UNREADABLE, f"row group {group}: {e}") from None
        cell = column[row - pf.row_starts[group]].as_py()
        if isinstance(cell, dict):
            image = cell.get("bytes")
            if image is None:
                where = f" (only a path, {cell['path']!r})" if cell.get("path") else ""
                raise BadExample(IMAGE_MISSING, f"null image bytes{where}")
        elif cell is None:
            raise BadExample(IMAGE_MISSING, "null image")
        else:
            image = cell
        return RawExample(key, image, pf.captions[row].as_py())

    def describe(self) -> str:
        return f"parquet {self.spec} ({len(self.files)} files, {len(self)} rows)"

    def fingerprint(self) -> str:
        """Each file's name, size and rows; each row group's rows and image column size; every caption."""
        return self._digest
