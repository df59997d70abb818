"""Latent caches in a bucket: ``data.cache_dir=gs://bucket/path``.

array_record (the cache's record format) reads and writes only local files, so a bucket cache is built and read
in a local copy on each host (``data.cache_local_dir``; default ``~/.cache/flux_jax/caches/gs/bucket/path``,
under ``$XDG_CACHE_HOME`` when set) and the bucket holds the same files as a local cache directory:

- building (`cache.build_cache`, on every host): each encoded chunk is uploaded to the bucket's ``work/`` as soon
  as it is written (an upload appears only once complete, so a host that dies leaves only whole chunks there);
  a build that starts on an incomplete bucket cache first replaces its local ``work/`` with the bucket's (its
  own chunks and every other host's), so a rerun on any machine continues where the last one stopped. Process 0
  then downloads the chunks the other hosts uploaded, writes the dataset locally as for a local cache, and
  uploads the dataset, empty_caption.safetensors and report.json, then cache.json LAST, then deletes the bucket's
  ``work/``: a bucket cache is complete iff its cache.json exists.
- reading (the trainer, and `flux-jax cache` on a complete bucket cache): every host mirrors the cache into its
  local copy, checking each local file against cache.json's sizes and CRC-32s, keeping the ones already there and
  intact and downloading the others (logging how much, and that it needs that much local disk); the local
  cache.json is written last, so an interrupted mirror never looks complete. The existing reader then opens the
  local copy; a cache damaged in the bucket is repaired by `flux-jax cache` as a local one is, and re-uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etils import epath

from flux_jax.atomic import atomic_file
from flux_jax.data.cache import (
    CACHE_JSON,
    EMPTY_CAPTION,
    REPAIR_DIR,
    REPORT_JSON,
    TFDS_DIR,
    WORK_DIR,
    resolve_cache_dir,
)
from flux_jax.data.cache_files import check_files
from flux_jax.errors import DataError
from flux_jax.storage import is_remote

log = logging.getLogger(__name__)

_BLOCK = 8 << 20
FINGERPRINT_JSON = "fingerprint.json"  # the work dir's settings marker (`cache._open_work_dir`)


def default_local_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flux_jax" / "caches"


def local_copy_dir(url: str, local_dir: str | None) -> Path:
    """The local copy of the bucket cache ``url``: ``local_dir`` when set, else under `default_local_root`
    (``gs://bucket/a/b`` -> ``<root>/gs/bucket/a/b``, so two bucket caches never share a copy)."""
    if local_dir:
        return Path(local_dir).expanduser().absolute()
    scheme, rest = url.split("://", 1)
    return default_local_root() / scheme / rest.strip("/")


def _download(remote: epath.Path, local: Path) -> str:
    """Copy ``remote`` to ``local`` all or nothing (temp file + rename); returns the CRC-32 of what came."""
    crc = 0
    with atomic_file(local) as tmp, remote.open("rb") as src, open(tmp, "wb") as dst:
        while block := src.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            dst.write(block)
    return f"{crc:08x}"


def _upload(local: Path, remote: epath.Path) -> None:
    """Copy ``local`` to ``remote``; an object appears in a bucket only once its upload completes, and one that
    fails part-way is removed (a closing writer could otherwise commit the part)."""
    try:
        with open(local, "rb") as src, remote.open("wb") as dst:
            while block := src.read(_BLOCK):
                dst.write(block)
    except BaseException:
        try:
            remote.unlink(missing_ok=True)
        except Exception as e:  # the first error is the one to report
            log.warning("could not remove the partial upload %s: %s", remote, e)
        raise


def _forget_listings(path: epath.Path) -> None:
    """gcsfs (epath's gs:// backend without TensorFlow) caches directory listings for the life of the process, so
    objects other hosts (or runs) uploaded since could go unseen; TensorFlow's gfile caches nothing."""
    fs = getattr(getattr(path, "_backend", None), "fs", None)  # epath's fsspec backend only
    if fs is not None:
        fs(os.fspath(path)).invalidate_cache()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class RemoteCache:
    """The bucket cache ``url`` and this host's local copy ``local`` (`cache.resolve_cache_dir`)."""

    def __init__(self, url: str, local: Path):
        self.url = epath.Path(url.rstrip("/"))
        self.local = local

    def __str__(self) -> str:
        return os.fspath(self.url)

    def complete(self) -> bool:
        _forget_listings(self.url)
        return (self.url / CACHE_JSON).exists()

    def info(self) -> tuple[str, dict[str, Any]]:
        """The bucket's cache.json: (its text, parsed)."""
        marker = self.url / CACHE_JSON
        _forget_listings(self.url)
        try:
            text = marker.read_text()
            info = json.loads(text)
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise DataError(f"{marker}: unreadable ({e}); run `flux-jax cache --force` to rebuild the cache") from None
        return text, info

    def clear(self) -> None:
        """Remove the bucket cache (`flux-jax cache --force`): cache.json first, so it never looks complete."""
        (self.url / CACHE_JSON).unlink(missing_ok=True)
        for name in (TFDS_DIR, REPAIR_DIR, WORK_DIR):
            if (self.url / name).exists():
                (self.url / name).rmtree()
        for name in (REPORT_JSON, EMPTY_CAPTION):
            (self.url / name).unlink(missing_ok=True)

    # ---- building

    def reset_work(self) -> None:
        """Before building on an incomplete bucket cache: the local copy becomes the bucket's partial state (its
        ``work/``: fingerprint and every host's chunks); a local cache.json (of a cache the bucket no longer
        holds) is dropped. Downloading every chunk, rather than trusting same-named local files, keeps this host
        from mixing in chunks of an earlier build that the bucket has since replaced."""
        (self.local / CACHE_JSON).unlink(missing_ok=True)
        work = self.local / WORK_DIR
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        remote = self.url / WORK_DIR
        _forget_listings(self.url)
        names = sorted(p.name for p in remote.iterdir()) if remote.exists() else []
        for name in names:
            _download(remote / name, work / name)
        chunks = [name for name in names if name != FINGERPRINT_JSON]
        if chunks:
            log.info("cache %s: continuing the partial cache in the bucket (%d chunk files)", self, len(chunks))

    def opened(self, process: int) -> None:
        """After `cache._open_work_dir`: every host has a local work dir, and the bucket has the fingerprint."""
        work = self.local / WORK_DIR
        work.mkdir(parents=True, exist_ok=True)
        if process == 0 and not (self.url / WORK_DIR / FINGERPRINT_JSON).exists():
            self.push_chunk(work / FINGERPRINT_JSON)

    def push_chunk(self, chunk: Path) -> None:
        """Upload a just-written file of the local work dir (a chunk, the fingerprint) to the bucket's."""
        _upload(chunk, self.url / WORK_DIR / chunk.name)

    def fetch_chunks(self) -> None:
        """On process 0, before finalizing: the chunks the other hosts uploaded (and any of an earlier run)."""
        work, remote = self.local / WORK_DIR, self.url / WORK_DIR
        _forget_listings(self.url)
        for path in sorted(remote.iterdir()) if remote.exists() else []:
            if not (work / path.name).is_file():
                _download(path, work / path.name)

    def publish(self) -> None:
        """On process 0, after the local copy was finalized: upload the dataset, the empty caption and the report,
        then cache.json last; then drop the bucket's chunks and any other dataset directory."""
        text = (self.local / CACHE_JSON).read_text()
        info = json.loads(text)
        root = str(info["dataset"]).split("/")[0]
        if self.complete() and str(self.info()[1].get("dataset", "")).split("/")[0] == root:
            # The dataset about to be overwritten is the one the bucket's cache.json names: not complete meanwhile.
            (self.url / CACHE_JSON).unlink(missing_ok=True)
        if (self.url / root).exists():  # left by a publish that died before its cache.json
            (self.url / root).rmtree()
        names = [*sorted(info["files"]), REPORT_JSON]
        total = sum((self.local / name).stat().st_size for name in names)
        start = time.monotonic()
        for name in names:
            target = self.url / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _upload(self.local / name, target)
        (self.url / CACHE_JSON).write_text(text)  # last: the bucket cache is complete from here on
        for other in (TFDS_DIR, REPAIR_DIR):
            if other != root and (self.url / other).exists():
                (self.url / other).rmtree()
        if (self.url / WORK_DIR).exists():
            (self.url / WORK_DIR).rmtree()
        log.info(
            "cache %s: uploaded %d files (%s) in %.1f s", self, len(names) + 1, _gb(total), time.monotonic() - start
        )

    def finish(self, process: int) -> None:
        """After the build: the hosts other than 0 drop their local chunks (process 0's went into the dataset)."""
        if process != 0:
            shutil.rmtree(self.local / WORK_DIR, ignore_errors=True)

    # ---- reading

    def mirror(self, check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Make the local copy the bucket's complete cache and return its cache.json. ``check(info)`` runs on the
        bucket's cache.json before anything is downloaded (a cache of other settings is refused without fetching
        it). Local files that match cache.json's size and CRC-32 are kept; the others are downloaded. A file that
        is damaged in the bucket is kept as it came (with a warning), for the reader to refuse and `flux-jax cache`
        to repair."""
        text, info = self.info()
        if check is not None:
            check(info)
        table = info.get("files")
        if not isinstance(table, dict) or not all(isinstance(e, dict) and "size" in e for e in table.values()):
            raise DataError(f"{self.url / CACHE_JSON}: malformed (no file table); run `flux-jax cache --force`")
        marker = self.local / CACHE_JSON
        fetch = sorted(check_files(self.local, table))
        if not fetch and marker.is_file() and marker.read_text() == text and (self.local / REPORT_JSON).is_file():
            log.info("cache %s: the local copy %s is complete and intact", self, self.local)
            return info
        marker.unlink(missing_ok=True)  # the local copy is not complete while it changes
        total = sum(int(e["size"]) for e in table.values())
        need = sum(int(table[name]["size"]) for name in fetch)
        log.info(
            "cache %s: mirroring %d files (%s) to %s, which needs that much local disk; %d files (%s) to download, "
            "the rest already there and intact",
            self,
            len(table),
            _gb(total),
            self.local,
            len(fetch),
            _gb(need),
        )
        start = last = time.monotonic()
        done = 0
        for i, name in enumerate(fetch):
            crc = _download(self.url / name, self.local / name)
            if crc != str(table[name]["crc32"]):
                want = table[name]["crc32"]
                log.warning("cache %s: %s has CRC-32 %s in the bucket, cache.json records %s", self, name, crc, want)
            done += int(table[name]["size"])
            if time.monotonic() - last > 10 or i == len(fetch) - 1:
                last = time.monotonic()
                progress = (i + 1, len(fetch), _gb(done), _gb(need), last - start)
                log.info("cache %s: downloaded %d of %d files, %s of %s (%.0f s)", self, *progress)
        _download(self.url / REPORT_JSON, self.local / REPORT_JSON)
        with atomic_file(marker) as tmp:  # last
            tmp.write_text(text)
        return info


def remote_cache(cfg: Any) -> RemoteCache | None:
    """``cfg``'s bucket cache, or None for a local ``data.cache_dir`` (or none)."""
    url = cfg.data.cache_dir
    if not url or not is_remote(url):
        return None
    return RemoteCache(url, resolve_cache_dir(cfg))
