"""`flux-jax cache`: encode every example once into a TFDS array_record dataset the trainer streams.

A cache directory holds::

  cache.json                  written last, atomically: its presence means the cache is complete. Format,
                              fingerprint, bucket table and a per-record index (bucket, group, repeats).
  report.json                 the bad-data report (counts and file names per reason)
  empty_caption.safetensors   T5 and CLIP of the empty caption (caption dropout swaps these in)
  tfds/flux_jax_latent_cache/1.0.0/   the records (`tfds_builders.LatentCache`)
  work/                       while encoding: fingerprint.json and one chunk file per encoded batch and host
  demo_encoders/              the generated tiny encoders, when no encoders are configured

Steps: (1) scan: decode every image and caption, place it in its buckets, build the report (with ``strict`` a
non-empty report is an error before anything is written); (2) encode the examples not yet in a chunk, batch by
bucket, sharded on the mesh, each batch written as one atomic chunk (temp file + rename), so a run that dies
leaves only whole chunks and the next run continues from them; (3) finalize: write the TFDS dataset from the
chunks in a fixed order (the same whether or not the run was interrupted), the report, the empty caption and
finally cache.json, then drop the chunks. Augmentation is decided per example id here: each random crop (and
its mirror) is its own record, and the pipeline picks one record of a group per appearance. Read a complete
cache with `cache_reader.LatentCacheReader`.

On several hosts every process scans the data, all of them step through the same batches (each encodes its rows
of every global batch and writes its own chunks) and process 0 finalizes, so ``cache_dir`` must be on a
filesystem every host sees.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flux_jax.atomic import atomic_file
from flux_jax.data.buckets import Bucket, BucketSpec, crop_box, render
from flux_jax.data.images import (
    CAPTION_EMPTY,
    CAPTION_MISSING,
    EMPTY_CAPTION_USED,
    BadExample,
    DataReport,
    decode_caption,
    decode_image,
)
from flux_jax.data.sources import Source, open_source
from flux_jax.errors import ConfigError, DataError, FluxJaxError
from flux_jax.storage import is_remote
from flux_jax.weights.safetensors_file import SafetensorsFile, save_file

log = logging.getLogger(__name__)

CACHE_FORMAT = "flux_jax.latent_cache"
CACHE_VERSION = 1
CACHE_JSON = "cache.json"
REPORT_JSON = "report.json"
EMPTY_CAPTION = "empty_caption.safetensors"
TFDS_DIR = "tfds"
WORK_DIR = "work"
DEMO_ENCODERS = "demo_encoders"


def resolve_cache_dir(cfg: Any) -> Path:
    """``data.cache_dir``, or next to the data: ``<folder>_cache`` beside an image folder or prepared TFDS
    directory, ``<output_dir>/cache`` for a TFDS dataset given by name."""
    data = cfg.data
    if data.cache_dir:
        return Path(data.cache_dir)
    path = Path(data.path)
    if data.source == "folder" or path.is_dir():
        return path.parent / f"{path.name}_cache"
    if is_remote(cfg.output_dir):
        raise ConfigError(
            f"output_dir {cfg.output_dir} is a bucket, but the latent cache is read from a local disk; set "
            "data.cache_dir to a local path (on a pod: the same path on every host)",
            key="data.cache_dir",
        )
    return Path(cfg.output_dir) / "cache"


# --------------------------------------------------------------------------------------------------
# Scan


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One record to encode: an image at one target side, one crop variant, mirrored or not."""

    id: str
    index: int
    key: str
    caption: str
    repeats: int
    bucket: int
    group: int
    box: tuple[float, float, float, float]
    flipped: bool


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def scan(
    source: Source, data: Any, spec: BucketSpec, *, threads: int | None = None
) -> tuple[list[WorkItem], DataReport]:
    """Decode every example, place it in its buckets and lay out its records; report everything refused."""
    report = DataReport(total=len(source) + len(source.problems))
    for reason, name, detail in source.problems:
        report.skip(reason, name, detail)
    bucket_ids = {b: i for i, b in enumerate(spec.all_buckets)}

    def look(index: int) -> tuple[int, Any]:
        try:
            raw = source[index]
            image = decode_image(raw.image, max_pixels=data.max_image_pixels)
            placed = spec.assign(*image.size)
            conversions = list(image.conversions)
            try:
                caption = decode_caption(raw.caption)
            except BadExample as e:
                if e.reason not in (CAPTION_MISSING, CAPTION_EMPTY) or data.missing_caption != "empty":
                    raise
                caption = ""
                conversions.append(EMPTY_CAPTION_USED)
        except BadExample as e:
            return index, e
        raw_bytes = raw.image if isinstance(raw.image, bytes) else np.ascontiguousarray(raw.image).tobytes()
        digest = hashlib.blake2b(raw_bytes + b"\0" + caption.encode("utf-8"), digest_size=12).hexdigest()
        return index, (raw.key, raw.repeats, caption, image.size, placed, conversions, digest)

    items: list[WorkItem] = []
    group = 0
    with concurrent.futures.ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
        for index, result in pool.map(look, range(len(source))):
            if isinstance(result, BadExample):
                report.skip(result.reason, source.key(index), result.detail)
                continue
            key, repeats, caption, (w, h), placed, conversions, digest = result
            report.used += 1
            for reason in conversions:
                report.convert(reason, key)
            for side, bucket in placed:
                for variant, box, flipped in _variants(data, key, w, h, side, bucket):
                    item_id = f"{digest}-{side}-{variant}-{int(flipped)}"
                    items.append(
                        WorkItem(item_id, index, key, caption, repeats, bucket_ids[bucket], group, box, flipped)
                    )
                group += 1
    return items, report


def _variants(
    data: Any, key: str, w: int, h: int, side: int, bucket: Bucket
) -> Iterator[tuple[int, tuple[float, float, float, float], bool]]:
    """(variant, crop box, mirrored) of each record of one image at one side; random crops are seeded by the
    data seed and the file name, so they do not change when other files are added or removed."""
    for variant in range(data.crop_variants):
        rng = np.random.default_rng([data.shuffle_seed, _stable_int(key), side, variant])
        box = tuple(float(v) for v in crop_box(w, h, bucket, random=data.crop == "random", rng=rng))
        for flipped in (False, True) if data.flip else (False,):
            yield variant, box, flipped


# --------------------------------------------------------------------------------------------------
# Build


@dataclasses.dataclass(frozen=True)
class CacheSummary:
    cache_dir: Path
    records: int
    encoded: int
    """Records encoded by this run (the rest came from an interrupted earlier run, or the cache was complete)."""
    seconds: float
    """Wall time of the encode step."""
    report: DataReport
    buckets: tuple[Bucket, ...]
    up_to_date: bool = False

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")


def _settings(cfg: Any, spec: BucketSpec, encoder_identity: Any) -> dict[str, Any]:
    d = cfg.data
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "buckets": dataclasses.asdict(spec),
        "crop": d.crop,
        "crop_variants": d.crop_variants,
        "flip": d.flip,
        "seed": d.shuffle_seed,
        "missing_caption": d.missing_caption,
        "max_image_pixels": d.max_image_pixels,
        "t5_max_length": cfg.encoders.t5_max_length,
        "encoder_dtype": cfg.encoders.dtype,
        "encoders": encoder_identity,
    }


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _items_digest(items: Sequence[WorkItem]) -> str:
    return hashlib.sha256("\n".join(it.id for it in items).encode()).hexdigest()[:32]


def _clear(cache_dir: Path) -> None:
    """Remove a cache (completion marker first, so a half-removed cache never looks complete)."""
    (cache_dir / CACHE_JSON).unlink(missing_ok=True)
    for name in (TFDS_DIR, WORK_DIR):
        shutil.rmtree(cache_dir / name, ignore_errors=True)
    for name in (REPORT_JSON, EMPTY_CAPTION):
        (cache_dir / name).unlink(missing_ok=True)


def build_cache(
    cfg: Any,
    *,
    strict: bool | None = None,
    force: bool = False,
    progress: bool = True,
    encoders: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> CacheSummary:
    """Build (or finish) the cache for a `RunConfig`; see the module docstring.

    ``encoders``: an already loaded `encoding.FluxEncoders` for the paths this config names (benchmarks and
    tests build several caches with one); by default they are loaded here and released on return.
    ``on_batch(n)`` is called after each chunk is written (progress hooks, and the interruption tests)."""
    import jax

    from flux_jax.data.encoding import FluxEncoders, resolve_encoder_paths
    from flux_jax.sharding import make_mesh

    strict = cfg.data.strict if strict is None else strict
    source = open_source(cfg.data)
    spec = BucketSpec.from_config(cfg.data)
    cache_dir = resolve_cache_dir(cfg)
    items, report = scan(source, cfg.data, spec)
    if strict:
        report.raise_if_strict(source.describe())
    if not items:
        raise DataError(f"{source.describe()}: no usable examples\n{report.summary()}")

    paths, demo_stamp = resolve_encoder_paths(cfg, cache_dir / DEMO_ENCODERS)
    settings = _settings(cfg, spec, demo_stamp or paths.identity())
    fingerprint = _fingerprint(settings)
    digest = _items_digest(items)
    if force:
        _clear(cache_dir)
    done_marker = cache_dir / CACHE_JSON
    if done_marker.is_file():
        info = json.loads(done_marker.read_text())
        if info.get("fingerprint") == fingerprint and info.get("items_digest") == digest:
            log.info("cache %s is up to date (%d records)", cache_dir, info["num_records"])
            return CacheSummary(cache_dir, int(info["num_records"]), 0, 0.0, report, spec.all_buckets, True)
        raise DataError(
            f"{cache_dir}: a complete cache built from other data or settings is there; run with --force to "
            "rebuild it, or set data.cache_dir to another directory"
        )

    work = cache_dir / WORK_DIR
    process, processes = jax.process_index(), jax.process_count()
    _open_work_dir(work, fingerprint, settings, process)
    _barrier("flux_jax_cache_open")
    enc = cfg.encoders
    if encoders is None:
        encoders = FluxEncoders.load(
            paths, mesh=make_mesh(*cfg.mesh.shape), dtype=enc.dtype, t5_max_length=enc.t5_max_length
        )
    elif (encoders.paths, encoders.dtype, encoders.t5_max_length) != (paths, enc.dtype, enc.t5_max_length):
        raise FluxJaxError("build_cache: the given encoders were not loaded from this config's encoders section")
    multiple = int(np.lcm(encoders.batch_multiple(), processes))
    global_batch = -(-cfg.encoders.batch_size // multiple) * multiple

    done = _done_items(work)
    pending = [it for it in items if it.id not in done]
    start = time.perf_counter()
    seq = _next_seq(work, process)
    buckets = spec.all_buckets
    with tqdm(total=len(pending), unit="img", desc="encoding", disable=not progress or process != 0) as bar:
        for batch, pad in _plan(pending, global_batch):
            rows = global_batch // processes
            local, local_pad = batch[process * rows : (process + 1) * rows], pad[process * rows : (process + 1) * rows]
            images = _render_batch(source, cfg.data, local, buckets)
            out = encoders.encode(images, [it.caption for it in local], global_batch)
            keep = [j for j, is_pad in enumerate(local_pad) if not is_pad]
            _check_finite(out, [local[j].key for j in keep], keep)
            if keep:
                save_file(
                    work / f"chunk-p{process:03d}-{seq:06d}.safetensors",
                    {name: np.ascontiguousarray(value[keep]) for name, value in out.items()},
                    metadata={"items": json.dumps([local[j].id for j in keep])},
                )
                seq += 1
            bar.update(sum(1 for p in pad if not p))
            if on_batch is not None:
                on_batch(len(keep))
    seconds = time.perf_counter() - start
    _barrier("flux_jax_cache_encoded")
    # A collective on the mesh, so every process runs it; process 0 writes it.
    rows = global_batch // processes
    empty = encoders.encode_text([""] * rows, global_batch)
    if process == 0:
        _finalize(cache_dir, items, report, spec, settings, fingerprint, digest, empty, encoders, source.describe())
    _barrier("flux_jax_cache_done")
    return CacheSummary(cache_dir, len(items), len(pending), seconds, report, buckets)


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _open_work_dir(work: Path, fingerprint: str, settings: dict[str, Any], process: int) -> None:
    marker = work / "fingerprint.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            raise DataError(
                f"{work}: holds a partial cache made with other settings or encoders; run with --force to "
                "discard it, or set data.cache_dir to another directory"
            )
    elif process == 0:
        work.mkdir(parents=True, exist_ok=True)
        with atomic_file(marker) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=1))
    for stale in work.glob(f".chunk-p{process:03d}-*"):  # temp files of a run killed mid-write
        stale.unlink(missing_ok=True)


def _chunks(work: Path) -> list[Path]:
    return sorted(work.glob("chunk-p*.safetensors"))


def _done_items(work: Path) -> dict[str, tuple[Path, int]]:
    """item id -> (chunk, row) over every readable chunk; the first chunk (by name) holding an id wins."""
    done: dict[str, tuple[Path, int]] = {}
    for chunk in _chunks(work):
        try:
            with SafetensorsFile(chunk) as f:
                ids = json.loads(f.metadata["items"])
                rows = {f.info(name).shape[0] for name in ("latents", "t5", "clip")}
            if rows != {len(ids)}:
                raise FluxJaxError(f"{len(ids)} ids for {rows} rows")
        except (FluxJaxError, KeyError, ValueError) as e:
            # Chunks are renamed into place only once complete, so this is outside damage: re-encode them.
            log.warning("ignoring unreadable cache chunk %s (%s); its examples will be encoded again", chunk, e)
            continue
        for row, item in enumerate(ids):
            done.setdefault(item, (chunk, row))
    return done


def _next_seq(work: Path, process: int) -> int:
    seqs = [int(p.stem.rsplit("-", 1)[1]) for p in work.glob(f"chunk-p{process:03d}-*.safetensors")]
    return max(seqs, default=-1) + 1


def _plan(items: Sequence[WorkItem], global_batch: int) -> Iterator[tuple[list[WorkItem], list[bool]]]:
    """Full batches of one bucket each; a bucket's last batch is padded with its own first item (flagged)."""
    by_bucket: dict[int, list[WorkItem]] = {}
    for it in items:
        by_bucket.setdefault(it.bucket, []).append(it)
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        for start in range(0, len(members), global_batch):
            batch = members[start : start + global_batch]
            pad = [False] * len(batch) + [True] * (global_batch - len(batch))
            yield batch + [batch[0]] * (global_batch - len(batch)), pad


def _render_batch(source: Source, data: Any, items: Sequence[WorkItem], buckets: Sequence[Bucket]) -> np.ndarray:
    def one(it: WorkItem) -> np.ndarray:
        try:
            image = decode_image(source[it.index].image, max_pixels=data.max_image_pixels).image
        except BadExample as e:
            raise DataError(f"{it.key}: changed while caching ({e})") from None
        return render(image, buckets[it.bucket], it.box, flip=it.flipped)

    with concurrent.futures.ThreadPoolExecutor(min(len(items), os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(one, items)))


def _check_finite(out: dict[str, np.ndarray], names: Sequence[str], rows: Sequence[int]) -> None:
    for field, value in out.items():
        bad = [names[i] for i, r in enumerate(rows) if not np.isfinite(value[r].astype(np.float32)).all()]
        if bad:
            raise FluxJaxError(
                f"the encoders produced non-finite {field} for {', '.join(bad[:5])}; nothing was written"
            )


def _finalize(
    cache_dir: Path,
    items: Sequence[WorkItem],
    report: DataReport,
    spec: BucketSpec,
    settings: dict[str, Any],
    fingerprint: str,
    digest: str,
    empty: dict[str, np.ndarray],
    encoders: Any,
    description: str,
) -> None:
    from flux_jax.data.tfds_builders import write_latent_cache

    work = cache_dir / WORK_DIR
    where = _done_items(work)
    missing = [it.key for it in items if it.id not in where]
    if missing:
        raise DataError(f"{cache_dir}: examples were not encoded: {', '.join(missing[:5])}")
    buckets = spec.all_buckets
    shapes = {
        "latent_dim": encoders.latent_dim,
        "t5_length": encoders.t5_max_length,
        "t5_dim": encoders.t5_dim,
        "clip_dim": encoders.clip_dim,
    }
    files: dict[Path, SafetensorsFile] = {}

    def examples() -> Iterator[dict[str, Any]]:
        for it in items:
            chunk, row = where[it.id]
            if chunk not in files:
                if len(files) >= 64:  # bound the open files: records follow source order, chunks bucket order
                    files.pop(next(iter(files))).close()
                files[chunk] = SafetensorsFile(chunk)
            f = files[chunk]
            gh, gw = buckets[it.bucket].tokens
            yield {
                "latents": np.asarray(f.array("latents")[row]),
                "t5": np.asarray(f.array("t5")[row]),
                "clip": np.asarray(f.array("clip")[row]),
                "height": gh,
                "width": gw,
                "bucket": it.bucket,
                "group": it.group,
                "repeats": it.repeats,
                "flipped": it.flipped,
                "caption": it.caption,
                "source": it.key,
            }

    shutil.rmtree(cache_dir / TFDS_DIR, ignore_errors=True)  # a dataset from a finalize that died before cache.json
    try:
        dataset = write_latent_cache(cache_dir / TFDS_DIR, shapes, examples)
    finally:
        for f in files.values():
            f.close()
    save_file(cache_dir / EMPTY_CAPTION, {"t5": empty["t5"][0], "clip": empty["clip"][0]})
    with atomic_file(cache_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    info = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "items_digest": digest,
        "source": description,
        "dataset": dataset.relative_to(cache_dir).as_posix(),
        "num_records": len(items),
        "buckets": [[b.width, b.height] for b in buckets],
        "shapes": shapes,
        "records": {
            "bucket": [it.bucket for it in items],
            "group": [it.group for it in items],
            "repeats": [it.repeats for it in items],
        },
        "settings": settings,
    }
    with atomic_file(cache_dir / CACHE_JSON) as tmp:
        tmp.write_text(json.dumps(info) + "\n")
    shutil.rmtree(work, ignore_errors=True)
