"""The latent cache's file table: every file's size and CRC-32, recorded in cache.json when the cache is finalised.

Caches are written once, so a difference is outside damage (a deleted, truncated or bit-flipped file).
`cache_reader.LatentCacheReader` checks every file against the table on open (sizes, then checksums, streamed in
chunks over a few threads: about a second per 2 GB) and refuses a damaged cache naming the file;
`cache.build_cache` checks it on a re-run of `flux-jax cache` and re-encodes what was lost.

Table entries (keys are paths relative to the cache directory, '/'-separated)::

  {"size": bytes, "crc32": "8 hex digits"}                   every file of the dataset, empty_caption.safetensors
  {..., "first": record, "records": count}                  an array_record shard: records [first, first+count)
"""

from __future__ import annotations

import concurrent.futures
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20  # zlib.crc32 releases the GIL on large buffers, so files hash in parallel threads


def crc32_of(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _threads(n: int) -> int:
    return max(1, min(8, n, os.cpu_count() or 1))


def file_table(root: Path, names: Iterable[str], shards: Mapping[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """The table for the files ``names`` under ``root``; ``shards``: name -> (first record, count)."""
    names = sorted(names)
    with concurrent.futures.ThreadPoolExecutor(_threads(len(names))) as pool:
        crcs = list(pool.map(lambda name: crc32_of(root / name), names))
    table: dict[str, dict[str, Any]] = {}
    for name, crc in zip(names, crcs, strict=True):
        entry: dict[str, Any] = {"size": (root / name).stat().st_size, "crc32": crc}
        if name in shards:
            entry["first"], entry["records"] = map(int, shards[name])
        table[name] = entry
    return table


def check_files(root: Path, table: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """name -> what is wrong with it, for every file of ``table`` that is missing, has another size or other
    contents; empty when the cache is intact. Sizes are checked first, and only files of the right size are
    read for their checksum."""
    problems: dict[str, str] = {}
    for name, entry in sorted(table.items()):
        try:
            size = (root / name).stat().st_size
        except FileNotFoundError:
            problems[name] = "missing"
            continue
        except OSError as e:
            problems[name] = f"unreadable ({e.strerror or e})"
            continue
        if size != int(entry["size"]):
            problems[name] = f"{size} bytes, cache.json records {int(entry['size'])} (truncated or overwritten)"
    rest = [name for name in sorted(table) if name not in problems]

    def crc(name: str) -> str | OSError:
        try:
            return crc32_of(root / name)
        except OSError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(_threads(len(rest))) as pool:
        for name, got in zip(rest, pool.map(crc, rest), strict=True):
            want = str(table[name]["crc32"])
            if isinstance(got, OSError):
                problems[name] = f"unreadable ({got.strerror or got})"
            elif got != want:
                problems[name] = f"CRC-32 {got}, cache.json records {want} (contents changed)"
    return dict(sorted(problems.items()))
