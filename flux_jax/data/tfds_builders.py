"""The project's two TFDS builders, both writing array_record (random access, what grain reads).

- `FolderImages` packages an image folder (`sources.FolderSource`) as a TFDS dataset: the original file
  bytes (nothing is re-encoded or validated here; `flux-jax cache` does that, with its report), the raw caption,
  whether there was one, the file name and the kohya repeat count.
- `LatentCache` is the output of `flux-jax cache`: one record per encoded example (see `cache.py`).

Both keep records in generation order (``disable_shuffling``), so record ``i`` is the ``i``-th example given,
and shard ``k`` holds a contiguous run of records. TFDS prepares into an ``incomplete.*`` directory and renames it
into place at the end, so a dataset directory either holds every record or does not exist. Read them back with
``tfds.builder_from_directory`` (no class or constructor argument needed) or `sources.TfdsSource`;
`CacheShard` reads one shard of the cache record by record without the dataset's metadata files (what a
repair of a damaged cache salvages). Preparing prints nothing: TFDS's "Downloading and preparing dataset"
and "downloaded and prepared" lines go to the debug log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flux_jax.data.images import BadExample
from flux_jax.data.sources import FolderSource

log = logging.getLogger(__name__)

FOLDER_BUILDER = "flux_jax_folder_images"
CACHE_BUILDER = "flux_jax_latent_cache"
SPLIT = "train"


class _QuietPrepare:
    """TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared to ...
    Subsequent calls will reuse this data." to stdout around every `download_and_prepare`; for our builders
    nothing is downloaded and the caller reports what it wrote, so both go to the debug log. Errors still raise."""

    def _log_download_bytes(self) -> None:
        log.debug("preparing TFDS dataset %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        log.debug("prepared TFDS dataset %s in %s", self.name, self.data_dir)


class FolderImages(_QuietPrepare, tfds.core.GeneratorBasedBuilder):
    """A folder of images and captions as a TFDS dataset (features: image, text, has_text, source, repeats)."""

    name = FOLDER_BUILDER
    # No download checksums to look up; TFDS's lookup of them for a class in an installed package imports
    # `importlib_resources`, which tensorflow-datasets does not declare.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original file bytes, raw caption bytes, file name, kohya repeats."}

    def __init__(self, *, folder: str | None = None, caption_ext: str = ".txt", caption_key: str = "text", **kwargs):
        self._folder = folder
        self._caption_ext = caption_ext
        self._caption_key = caption_key
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images with captions, packaged by flux_jax.data.tfds_builders.FolderImages.",
            features=tfds.features.FeaturesDict(
                {
                    # Declared as 3-channel images for TFDS tools; the bytes are the original files, so read
                    # them with SkipDecoding (sources.TfdsSource does) and decode with images.decode_image.
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "text": tfds.features.Text(),
                    "has_text": np.bool_,
                    "source": tfds.features.Text(),
                    "repeats": np.int32,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        if self._folder is None:
            raise ValueError("FolderImages needs folder= to generate")
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        source = FolderSource(self._folder, caption_ext=self._caption_ext, caption_key=self._caption_key)
        for index in range(len(source)):
            try:
                raw = source[index]
            except BadExample:
                continue  # unreadable (permissions, vanished): `flux-jax cache` on the folder reports those
            caption = raw.caption
            text = caption if isinstance(caption, bytes) else (caption or "").encode("utf-8", "surrogateescape")
            yield (
                index,
                {
                    "image": raw.image,
                    "text": text,
                    "has_text": caption is not None,
                    "source": raw.key,
                    "repeats": raw.repeats,
                },
            )


def build_folder_dataset(
    folder: str | Path, data_dir: str | Path, *, caption_ext: str = ".txt", caption_key: str = "text"
) -> Path:
    """Package ``folder`` as an array_record TFDS dataset under ``data_dir``; returns the dataset directory
    (give it to `sources.TfdsSource` or ``data.path`` with ``data.source: tfds``)."""
    builder = FolderImages(
        folder=str(folder),
        caption_ext=caption_ext,
        caption_key=caption_key,
        data_dir=str(data_dir),
        file_format="array_record",
    )
    with _quiet():
        builder.download_and_prepare()
    return Path(builder.data_path)


class LatentCache(_QuietPrepare, tfds.core.GeneratorBasedBuilder):
    """Encoded examples: packed latents, T5 states and CLIP pooled vector (or, online, their token ids), bucket and
    provenance per record."""

    name = CACHE_BUILDER
    code_path = None  # see FolderImages
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "latents/t5 bf16, clip fp32, token grid, bucket, group, repeats, caption, source."}

    def __init__(
        self,
        *,
        shapes: Mapping[str, int] | None = None,
        examples: Callable[[], Iterable[dict[str, Any]]] | None = None,
        **kwargs,
    ):
        self._shapes = dict(shapes or {})
        self._examples = examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Flux training examples encoded by `flux-jax cache` (see flux_jax/data/cache.py).",
            features=latent_cache_features(self._shapes),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        if self._examples is None:
            raise ValueError("LatentCache needs examples= to generate")
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from enumerate(self._examples())


def holds_tokens(shapes: Mapping[str, int]) -> bool:
    """Whether a cache of these dims holds T5 / CLIP token ids (``encoders.online``) instead of their states."""
    return "clip_length" in shapes


def latent_cache_features(shapes: Mapping[str, int]) -> tfds.features.FeaturesDict:
    """The cache's record features for the given dims: ``latent_dim``, ``t5_length`` and either ``t5_dim`` and
    ``clip_dim`` (T5 states and the CLIP pooled vector) or ``clip_length`` (``t5_ids`` and ``clip_ids``, int32)."""
    s = dict(shapes)
    raw = tfds.features.Encoding.BYTES  # raw little-endian bytes: TFDS has no bfloat16 proto type
    if holds_tokens(s):
        text = {
            "t5_ids": tfds.features.Tensor(shape=(s["t5_length"],), dtype=np.int32, encoding=raw),
            "clip_ids": tfds.features.Tensor(shape=(s["clip_length"],), dtype=np.int32, encoding=raw),
        }
    else:
        text = {
            "t5": tfds.features.Tensor(shape=(s.get("t5_length"), s.get("t5_dim")), dtype=_bf16(), encoding=raw),
            "clip": tfds.features.Tensor(shape=(s.get("clip_dim"),), dtype=np.float32, encoding=raw),
        }
    return tfds.features.FeaturesDict(
        {
            "latents": tfds.features.Tensor(shape=(None, s.get("latent_dim")), dtype=_bf16(), encoding=raw),
            **text,
            "height": np.int32,
            "width": np.int32,
            "bucket": np.int32,
            "group": np.int32,
            "repeats": np.int32,
            "flipped": np.bool_,
            "caption": tfds.features.Text(),
            "source": tfds.features.Text(),
        }
    )


def _bf16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


def write_latent_cache(
    data_dir: Path, shapes: Mapping[str, int], examples: Callable[[], Iterable[dict]], *, num_shards: int | None = None
) -> tuple[Path, list[tuple[str, int]]]:
    """Write the cache dataset under ``data_dir`` (which must not hold one yet) in ``num_shards`` shards of equal
    record counts (None: TFDS's choice); returns its directory and its shards in record order, as (file name,
    number of records)."""
    builder = LatentCache(shapes=shapes, examples=examples, data_dir=str(data_dir), file_format="array_record")
    # (DownloadConfig's min/max shard sizes do not reach TFDS's shard count rule in 4.9; a count does.)
    with _quiet():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    split = builder.info.splits[SPLIT]
    return Path(builder.data_path), list(zip(split.filenames, map(int, split.shard_lengths), strict=True))


class CacheShard:
    """One array_record shard of the cache's dataset, read record by record (no TFDS metadata needed).

    ``len`` is the number of records the file's index lists: 0 when the file is missing or its index (at the
    end) is cut off. `read` raises `ValueError` for a record that does not read back intact (Riegeli checks a
    hash per record)."""

    def __init__(self, path: Path, shapes: Mapping[str, int]):
        from array_record.python import array_record_module

        self.path = path
        self._features = latent_cache_features(shapes)
        self._reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")

    def __len__(self) -> int:
        return int(self._reader.num_records()) if self._reader.ok() else 0

    def read(self, index: int) -> dict[str, Any]:
        if not self._reader.ok():
            raise ValueError(f"{self.path.name}: not readable")
        try:
            (serialized,) = self._reader.read([int(index)])
            return self._features.deserialize_example_np(serialized)
        except Exception as e:  # Riegeli raises RuntimeError; a damaged record can fail in decoding too
            raise ValueError(f"{self.path.name} record {index}: {str(e).splitlines()[0] if str(e) else e!r}") from None

    def close(self) -> None:
        if self._reader.ok():  # closing a reader that failed to open re-raises its error
            self._reader.close()

    def __enter__(self) -> CacheShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TFDS's own per-split progress bars would interleave with ours; restore the caller's setting after."""
    from tensorflow_datasets.core.utils import tqdm_utils

    previous = tqdm_utils._active  # TFDS has a setter but no getter
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(previous)
