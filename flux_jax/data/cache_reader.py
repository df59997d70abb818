"""Reading a complete latent cache (written by `cache.build_cache`): the records and their index.

Opening checks every file against cache.json's file table (`cache_files`: sizes, then CRC-32s) and refuses a
damaged cache with one line naming the file; `flux-jax cache` repairs it. A cache written before file tables
existed is refused until `flux-jax cache` has verified it and recorded its table (nothing is re-encoded)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flux_jax.data.buckets import Bucket
from flux_jax.data.cache import CACHE_FORMAT, CACHE_JSON, CACHE_VERSION, EMPTY_CAPTION, text_fields
from flux_jax.data.cache_files import check_files
from flux_jax.data.examples import BatchShape, Example
from flux_jax.errors import DataError
from flux_jax.weights.safetensors_file import SafetensorsFile


class LatentCacheReader:
    """A complete cache: random access to records plus the per-record index, without reading tensors.

    Also satisfies the trainer's ``ExampleSource`` protocol (``__len__``, ``batch_shape(i)``, ``read(i)``,
    ``describe()``) so `flux_jax.data.examples.BatchIterator` can read it directly.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        import tensorflow_datasets as tfds

        self.path = Path(cache_dir)
        marker = self.path / CACHE_JSON
        if not marker.is_file():
            raise DataError(f"{self.path}: no complete cache here ({CACHE_JSON} missing); run `flux-jax cache` first")
        try:
            info = json.loads(marker.read_text())
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
            if info.get("format") != CACHE_FORMAT or info.get("version") != CACHE_VERSION:
                raise DataError(f"{marker}: not a {CACHE_FORMAT} v{CACHE_VERSION} cache")
            self.buckets = tuple(Bucket(int(w), int(h)) for w, h in info["buckets"])
            records = info["records"]
            self.record_bucket = np.asarray(records["bucket"], np.int64)
            self.record_group = np.asarray(records["group"], np.int64)
            self.record_repeats = np.asarray(records["repeats"], np.int64)
            self.fingerprint = str(info["fingerprint"]) + "-" + str(info["items_digest"])
            self.shapes = dict(info["shapes"])
            self.online = "clip_length" in self.shapes  # token ids, not states (tfds_builders.holds_tokens)
            dataset_dir = self.path / info["dataset"]
            n = int(info["num_records"])
            table = info.get("files")
            if table is not None and not (
                isinstance(table, dict)
                and all(isinstance(e, dict) and {"size", "crc32"} <= e.keys() for e in table.values())
            ):
                raise ValueError("the file table is not a mapping of file -> size and CRC-32")
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise DataError(f"{marker}: malformed ({e!r})") from None
        if not (len(self.record_bucket) == len(self.record_group) == len(self.record_repeats) == n):
            raise DataError(f"{marker}: the record index does not have {n} entries")
        if table is None:
            raise DataError(
                f"{marker}: written by an older flux-jax, without file checksums; run `flux-jax cache` with this "
                "config once to verify the cache and record them (nothing is encoded again)"
            )
        problems = check_files(self.path, table)
        if problems:
            name, problem = next(iter(problems.items()))
            more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
            raise DataError(
                f"{self.path / name}: {problem}{more}; the cache is damaged: run `flux-jax cache` with this config "
                "again to encode what was lost"
            )
        self.info = info
        try:
            self.data = tfds.builder_from_directory(str(dataset_dir)).as_data_source("train")
            with SafetensorsFile(self.path / EMPTY_CAPTION) as f:
                # The empty caption's text fields (states, or online its token ids): what caption dropout swaps in.
                self.empty = {name: np.array(f.array(name)) for name in text_fields(self.online)}
        except Exception as e:  # intact files that still do not open: TFDS and safetensors errors of any type
            raise DataError(f"{dataset_dir}: cannot open the cache ({_first_line(e)})") from None
        if len(self.data) != n:
            raise DataError(f"{dataset_dir}: {len(self.data)} records, {marker} says {n}")

    def __len__(self) -> int:
        return len(self.record_bucket)

    def read_many(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        try:
            return list(self.data.__getitems__(indices))
        except RuntimeError as e:  # Riegeli: a file damaged after the cache was opened
            raise self._unreadable(indices, e) from None

    def _unreadable(self, indices: Sequence[int], e: Exception) -> DataError:
        shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
        return DataError(
            f"{self.path}: records {shown} do not read back ({_first_line(e)}); the cache is damaged: run "
            "`flux-jax cache` with this config again to encode what was lost"
        )

    def batch_shape(self, index: int) -> BatchShape:
        """(token height, token width, text length): what groups records into batches."""
        gh, gw = self.buckets[self.record_bucket[index]].tokens
        return BatchShape(gh, gw, int(self.shapes["t5_length"]))

    def read(self, index: int) -> Example:
        if self.online:
            raise DataError(
                f"{self.path}: holds T5 / CLIP token ids (encoders.online), not the text states an example needs"
            )
        try:
            r = self.data[int(index)]
        except RuntimeError as e:
            raise self._unreadable([int(index)], e) from None
        caption = r["caption"].decode("utf-8") if isinstance(r["caption"], bytes) else str(r["caption"])
        return Example(r["latents"], r["t5"], r["clip"], int(r["height"]), int(r["width"]), caption)

    def describe(self) -> str:
        return f"latent cache {self.path} ({len(self)} records, buckets {', '.join(map(str, self.buckets))})"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
