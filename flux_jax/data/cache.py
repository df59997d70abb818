"""`flux-jax cache`: encode every example once into a TFDS array_record dataset the trainer streams.

A cache directory holds::

  cache.json                  written last, atomically: its presence means the cache is complete. Format,
                              fingerprint, the source's fingerprint, bucket table, a per-record index (bucket,
                              group, repeats) and the file table (size and CRC-32 of every file, `cache_files`).
  report.json                 the bad-data report (counts and file names per reason)
  empty_caption.safetensors   T5 and CLIP of the empty caption (caption dropout swaps these in); with
                              ``encoders.online``, its T5 and CLIP token ids
  tfds/flux_jax_latent_cache/1.0.0/   the records (`tfds_builders.LatentCache`); ``tfds-repaired/`` after a repair
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

With ``encoders.online`` a record holds ``t5_ids`` / ``clip_ids`` (int32 token ids) instead of the ``t5`` / ``clip``
states (the trainer encodes them in its step); the settings record ``online``, so neither kind of cache is ever
taken for the other (`check_cache_kind`).

Re-running on a complete cache checks it (`cache_files`: every file's size and CRC-32); a damaged cache (a
file deleted, truncated or changed) is repaired: the records that still read back intact (every record of an
intact shard, and each record of a damaged shard whose Riegeli hash still matches) are kept, only the others are
encoded again, and a new dataset is written beside the old one (``tfds`` <-> ``tfds-repaired``) and switched to
by cache.json's atomic rewrite, so a repair that dies leaves the damaged cache to repair again, never a mix. A
cache written before file tables existed is verified by reading every record, then given its table.

`flux-jax cache` runs `build_cache`; `flux-jax train` runs it too, through `build_missing_cache`, when the cache
is not complete yet (a complete one it only checks, and refuses if it is damaged or built from other data).

On several hosts (`scan_shared`) each process scans, decodes and encodes only its `share` of the examples (a
contiguous 1/N of the source's indices); the processes exchange the small per-example facts of the scan (names,
sizes, buckets, captions, digests, problems) so that all lay out the same items and report as one host would, then
step through the same global batches, each filling its rows with examples of its own share (`_plan_shared`) and
writing its own chunks; process 0 finalizes. The cache is record for record the one a single host builds (the
records are in item order, whoever encoded them), and ``cache_dir`` must be on a filesystem every host sees, or a
bucket: a ``gs://`` cache_dir is built and read in a local copy on each host, synced with the bucket
(`cache_remote`: chunks uploaded as written, cache.json uploaded last, a complete cache mirrored before reading).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flux_jax.atomic import atomic_file
from flux_jax.data.buckets import Bucket, BucketSpec, crop_box, render
from flux_jax.data.cache_files import check_files, file_table
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
REPAIR_DIR = "tfds-repaired"  # a repair writes the dataset into the other of these two and then switches
WORK_DIR = "work"
DEMO_ENCODERS = "demo_encoders"
# Target size of one shard of the cache's dataset: a truncated or deleted shard costs the encoding of its records
# only, and shards are checksummed in parallel.
SHARD_BYTES = 256 << 20


def resolve_cache_dir(cfg: Any) -> Path:
    """``data.cache_dir``, or next to the data: ``<folder>_cache`` beside an image folder, a prepared TFDS
    directory or a local directory of shards, ``<output_dir>/cache`` for a TFDS dataset given by name and for
    shards given by a glob, a brace range or a bucket URL. A bucket URL (``gs://...``) gives this host's local copy
    of that bucket cache (`cache_remote`)."""
    data = cfg.data
    if data.cache_dir:
        if is_remote(data.cache_dir):
            from flux_jax.data.cache_remote import local_copy_dir

            return local_copy_dir(data.cache_dir, data.cache_local_dir)
        return Path(data.cache_dir)
    path = Path(data.path)
    if data.source == "folder" or path.is_dir():
        return path.parent / f"{path.name}_cache"
    if is_remote(cfg.output_dir):
        raise ConfigError(
            f"output_dir {cfg.output_dir} is a bucket, but the latent cache is read from a local disk; set "
            "data.cache_dir to a local path (on a pod: the same path on every host) or to a gs:// URL",
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


def _look(source: Source, data: Any, spec: BucketSpec, index: int) -> list[Any]:
    """What the scan learns of example ``index``, as plain JSON values (hosts exchange them on a pod):
    ``["bad", key, reason, detail]``, or ``["ok", key, repeats, caption, [w, h], [[side, bucket id], ...],
    conversions, digest]``."""
    bucket_ids = {b: i for i, b in enumerate(spec.all_buckets)}
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
        return ["bad", source.key(index), e.reason, e.detail]
    raw_bytes = raw.image if isinstance(raw.image, bytes) else np.ascontiguousarray(raw.image).tobytes()
    digest = hashlib.blake2b(raw_bytes + b"\0" + caption.encode("utf-8"), digest_size=12).hexdigest()
    sides = [[side, bucket_ids[bucket]] for side, bucket in placed]
    return ["ok", raw.key, raw.repeats, caption, list(image.size), sides, conversions, digest]


def _look_range(source: Source, data: Any, spec: BucketSpec, indices: range, threads: int | None) -> list[list[Any]]:
    with concurrent.futures.ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda i: _look(source, data, spec, i), indices))


def _lay_out(
    source: Source, data: Any, spec: BucketSpec, looks: Sequence[list[Any]]
) -> tuple[list[WorkItem], DataReport]:
    """Items and report from every example's `_look`, in index order: the same on every host."""
    report = DataReport(total=len(source) + len(source.problems))
    for reason, name, detail in source.problems:
        report.skip(reason, name, detail)
    buckets = spec.all_buckets
    items: list[WorkItem] = []
    group = 0
    for index, look in enumerate(looks):
        if look[0] == "bad":
            _, key, reason, detail = look
            report.skip(reason, key, detail)
            continue
        _, key, repeats, caption, (w, h), placed, conversions, digest = look
        report.used += 1
        for reason in conversions:
            report.convert(reason, key)
        for side, bucket_id in placed:
            for variant, box, flipped in _variants(data, key, w, h, side, buckets[bucket_id]):
                item_id = f"{digest}-{side}-{variant}-{int(flipped)}"
                items.append(WorkItem(item_id, index, key, caption, repeats, bucket_id, group, box, flipped))
            group += 1
    return items, report


def scan(
    source: Source, data: Any, spec: BucketSpec, *, threads: int | None = None
) -> tuple[list[WorkItem], DataReport]:
    """Decode every example, place it in its buckets and lay out its records; report everything refused."""
    return _lay_out(source, data, spec, _look_range(source, data, spec, range(len(source)), threads))


def share(n: int, process: int, processes: int) -> range:
    """The examples (source indices) process ``process`` of ``processes`` scans, decodes and encodes: a
    contiguous 1/N of the index range, so a host reads whole runs of files (or shards) and no other host does."""
    return range(n * process // processes, n * (process + 1) // processes)


def scan_shared(
    source: Source, data: Any, spec: BucketSpec, *, threads: int | None = None
) -> tuple[list[WorkItem], DataReport]:
    """`scan` over several processes: each decodes only its `share` of the examples, then all exchange what they
    learnt (names, sizes, buckets, captions, problems: no pixels) and lay out the same items and report, equal to
    a one-process `scan` of the same data. Every process must call it. On one process it is `scan`."""
    import jax

    process, processes = jax.process_index(), jax.process_count()
    if processes == 1:
        return scan(source, data, spec, threads=threads)
    mine = share(len(source), process, processes)
    looks = _look_range(source, data, spec, mine, threads)
    log.info("process %d of %d: scanned inputs %d..%d of %d", process, processes, mine.start, mine.stop, len(source))
    looks_everywhere = _all_gather_json(looks)
    everything = [look for part in looks_everywhere for look in part]
    if len(everything) != len(source):
        raise FluxJaxError(f"the hosts scanned {len(everything)} examples of {len(source)}: do they see the same data?")
    return _lay_out(source, data, spec, everything)


def _all_gather_json(value: Any) -> list[Any]:
    """Every process's JSON ``value``, in process order (zlib-compressed bytes through one all-gather of the
    lengths and one of the padded payloads)."""
    from jax.experimental import multihost_utils

    payload = np.frombuffer(zlib.compress(json.dumps(value).encode("utf-8")), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(zlib.decompress(row[: int(n)].tobytes())) for row, n in zip(gathered, lengths, strict=True)]


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
    """The cache directory, or a bucket cache's URL (an etils.epath.Path)."""
    records: int
    encoded: int
    """Records encoded by this run (the rest came from an interrupted earlier run, or the cache was complete)."""
    seconds: float
    """Wall time of the encode step."""
    report: DataReport
    buckets: tuple[Bucket, ...]
    up_to_date: bool = False
    damaged: tuple[str, ...] = ()
    """Files of a complete cache found damaged and repaired by this run (on process 0; paths in the cache dir)."""

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        """The report `flux-jax cache` prints (and `flux-jax train` logs when it built the cache itself): the
        bad-data summary, then what was done."""
        lines = [self.report.summary()]
        if self.up_to_date:
            return "\n".join([*lines, f"cache {self.cache_dir} is up to date ({self.records} records)"])
        if self.damaged:
            more = len(self.damaged) - 3
            shown = ", ".join(self.damaged[:3]) + (f" and {more} more" if more > 0 else "")
            lines.append(
                f"repaired the damaged cache in {self.cache_dir} ({shown}): {self.encoded} of {self.records} "
                "records encoded again" + (", the others kept" if self.encoded < self.records else "")
            )
        lines.append(
            f"cached {self.records} records ({self.encoded} encoded now in {self.seconds:.1f} s, compilation "
            f"included) in buckets {', '.join(map(str, self.buckets))} to {self.cache_dir}; report: "
            f"{self.cache_dir / REPORT_JSON}"
        )
        return "\n".join(lines)


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
        # Recorded only when set, so the fingerprint of every cache of text states stays what it was.
        **({"online": True} if cfg.encoders.online else {}),
    }


STATE_FIELDS = ("t5", "clip")
TOKEN_FIELDS = ("t5_ids", "clip_ids")


def text_fields(online: bool) -> tuple[str, str]:
    """A record's text fields: the T5 / CLIP token ids of an online cache, else their states."""
    return TOKEN_FIELDS if online else STATE_FIELDS


def _kind(online: bool) -> str:
    return "T5 / CLIP token ids (encoders.online: true)" if online else "T5 / CLIP states (encoders.online: false)"


def check_cache_kind(cfg: Any, cache_dir: Path, info: dict[str, Any]) -> None:
    """A cache of text states is never read as one of token ids, nor the other way round: one line saying so."""
    theirs = bool((info.get("settings") or {}).get("online", False))
    if theirs != bool(cfg.encoders.online):
        raise DataError(
            f"{cache_dir}: this cache holds {_kind(theirs)}, this config needs {_kind(cfg.encoders.online)}; set "
            f"encoders.online: {str(theirs).lower()}, or set data.cache_dir to another directory (or run `flux-jax "
            "cache --force` to replace this cache)"
        )


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


# The config keys behind each entry of `_settings` (for messages).
_SETTING_KEYS = {
    "format": "the cache format",
    "version": "the cache format version",
    "crop": "data.crop",
    "crop_variants": "data.crop_variants",
    "flip": "data.flip",
    "seed": "data.shuffle_seed",
    "missing_caption": "data.missing_caption",
    "max_image_pixels": "data.max_image_pixels",
    "t5_max_length": "encoders.t5_max_length",
    "encoder_dtype": "encoders.dtype",
}
_BUCKET_KEYS = {
    "sides": "data.resolution / data.resolutions",
    "step": "data.bucket_step",
    "max_aspect": "data.max_aspect",
    "max_upscale": "data.max_upscale",
}


def check_built_from(cfg: Any, cache_dir: Path, info: dict[str, Any]) -> None:
    """The trainer's check that the complete cache in ``cache_dir`` (``info``: its cache.json) holds ``cfg.data``
    encoded with ``cfg``'s settings: the same `_settings` (and `_fingerprint`) `build_cache` compares, and the
    source's `fingerprint` (names, sizes and captions: no image is decoded) against the one recorded. Encoders
    named by path are compared only when their files are on this machine (training does not need them)."""
    from flux_jax.data.encoding import demo_stamp, resolve_encoder_paths

    check_cache_kind(cfg, cache_dir, info)
    identity: Any = demo_stamp(cfg)
    if identity is None:
        try:
            identity = resolve_encoder_paths(cfg, cache_dir / DEMO_ENCODERS)[0].identity()
        except FluxJaxError as e:
            log.info("not comparing the cache's encoders with this config's: %s", e)
    settings = _settings(cfg, BucketSpec.from_config(cfg.data), identity)
    ours, theirs = json.loads(json.dumps(settings)), info.get("settings") or {}
    differ = []
    for key, value in ours.items():
        if key == "encoders":
            if identity is not None and value != theirs.get(key):
                differ.append("the encoders are not the files the cache was encoded with")
        elif key == "buckets" and isinstance(theirs.get(key), dict):
            differ += [
                f"{_BUCKET_KEYS.get(k, k)} is {v}, the cache has {theirs[key].get(k)}"
                for k, v in value.items()
                if v != theirs[key].get(k)
            ]
        elif value != theirs.get(key):
            differ.append(f"{_SETTING_KEYS.get(key, key)} is {value}, the cache has {theirs.get(key)}")
    if not differ and identity is not None and _fingerprint(settings) != info.get("fingerprint"):
        differ.append("the settings fingerprint differs")
    source = open_source(cfg.data)
    if source.fingerprint() != info.get("source_digest"):
        differ.insert(0, f"data.path is {source.describe()}, the cache holds {info.get('source', 'other data')}")
    if differ:
        raise DataError(
            f"{cache_dir}: this cache was built from other data or settings ({'; '.join(differ)}); run `flux-jax "
            "cache` with this config (--force replaces the cache), or set data.cache_dir to another directory"
        )


def _items_digest(items: Sequence[WorkItem]) -> str:
    return hashlib.sha256("\n".join(it.id for it in items).encode()).hexdigest()[:32]


def _clear(cache_dir: Path) -> None:
    """Remove a cache (completion marker first, so a half-removed cache never looks complete)."""
    (cache_dir / CACHE_JSON).unlink(missing_ok=True)
    for name in (TFDS_DIR, REPAIR_DIR, WORK_DIR):
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
    devices: Sequence[Any] | None = None,
) -> CacheSummary:
    """Build (or finish) the cache for a `RunConfig`; see the module docstring.

    ``encoders``: an already loaded `encoding.FluxEncoders` for the paths this config names (benchmarks and
    tests build several caches with one); by default they are loaded here, on ``cfg.mesh`` over ``devices``
    (default: every device; the trainer passes its own), and released on return.
    ``on_batch(n)`` is called after each chunk is written (progress hooks, and the interruption tests)."""
    import jax

    from flux_jax.data.encoding import FluxEncoders, resolve_encoder_paths
    from flux_jax.sharding import make_mesh

    strict = cfg.data.strict if strict is None else strict
    source = open_source(cfg.data)
    source_digest = source.fingerprint()
    spec = BucketSpec.from_config(cfg.data)
    cache_dir = resolve_cache_dir(cfg)
    items, report = scan_shared(source, cfg.data, spec)
    if strict:
        report.raise_if_strict(source.describe())
    if not items:
        raise DataError(f"{source.describe()}: no usable examples\n{report.summary()}")

    paths, demo_stamp = resolve_encoder_paths(cfg, cache_dir / DEMO_ENCODERS)
    settings = _settings(cfg, spec, demo_stamp or paths.identity())
    fingerprint = _fingerprint(settings)
    digest = _items_digest(items)
    process, processes = jax.process_index(), jax.process_count()
    remote = _remote(cfg)
    shown = cache_dir if remote is None else remote.url  # what messages name
    if force:
        _clear(cache_dir)
        if remote is not None:
            if process == 0:
                remote.clear()
            _barrier("flux_jax_cache_cleared")
    if remote is not None:  # the local copy becomes the bucket's state: a complete cache, or the chunks so far
        if _broadcast(np.asarray([remote.complete()], np.int32))[0]:
            shutil.rmtree(cache_dir / WORK_DIR, ignore_errors=True)
            remote.mirror(check=lambda info: _check_complete(cfg, shown, info, fingerprint, digest))
        else:
            remote.reset_work()
    done_marker = cache_dir / CACHE_JSON
    kept: _Kept | None = None
    intact = np.zeros(len(items), bool)
    damaged: tuple[str, ...] = ()
    if done_marker.is_file():
        info = _read_info(done_marker)
        _check_complete(cfg, shown, info, fingerprint, digest)
        # Process 0 checks the files; every process needs the outcome (they step through the same batches).
        status = 0
        if process == 0:
            problems, kept = _survey(cache_dir, info, items)
            intact = kept.intact
            if problems:
                status, damaged = 2, tuple(problems)
                for name, problem in problems.items():
                    log.warning("cache %s: %s: %s", cache_dir, name, problem)
                log.warning(
                    "cache %s is damaged: encoding the %d records it lost again, keeping the %d intact ones",
                    cache_dir,
                    int((~intact).sum()),
                    int(intact.sum()),
                )
            elif "files" not in info:
                status = 1  # an older cache, verified by reading every record: record its file table now
                _record_files(cache_dir, info, kept, source_digest)
        status_and_intact = _broadcast(np.concatenate([[status], intact.astype(np.int32)]).astype(np.int32))
        status, intact = int(status_and_intact[0]), status_and_intact[1:].astype(bool)
        if status != 2:
            log.info("cache %s is up to date (%d records)", shown, info["num_records"])
            return CacheSummary(shown, int(info["num_records"]), 0, 0.0, report, spec.all_buckets, True)

    work = cache_dir / WORK_DIR
    _open_work_dir(work, fingerprint, settings, process)
    if remote is not None:
        remote.opened(process)
    _barrier("flux_jax_cache_open")
    enc = cfg.encoders
    if encoders is None:
        encoders = FluxEncoders.load(
            paths, mesh=make_mesh(*cfg.mesh.shape, devices=devices), dtype=enc.dtype, t5_max_length=enc.t5_max_length
        )
    elif (encoders.paths, encoders.dtype, encoders.t5_max_length) != (paths, enc.dtype, enc.t5_max_length):
        raise FluxJaxError("build_cache: the given encoders were not loaded from this config's encoders section")
    multiple = int(np.lcm(encoders.batch_multiple(), processes))
    global_batch = -(-cfg.encoders.batch_size // multiple) * multiple

    done = _done_items(work)
    pending = [it for it, keep in zip(items, intact, strict=True) if it.id not in done and not keep]
    start = time.perf_counter()
    seq = _next_seq(work, process)
    buckets = spec.all_buckets
    owners = [share(len(source), p, processes) for p in range(processes)]
    with tqdm(total=len(pending), unit="img", desc="encoding", disable=not progress or process != 0) as bar:
        for bucket, batch in _plan_shared(pending, owners, global_batch):
            rows = global_batch // processes
            local = batch[process * rows : (process + 1) * rows]
            images = _render_rows(source, cfg.data, local, buckets, bucket)
            captions = [it.caption if it else "" for it in local]
            if enc.online:  # token ids only: the trainer runs T5 and CLIP in its step
                out = {"latents": encoders.encode_images(images, global_batch), **encoders.tokens(captions)}
            else:
                out = encoders.encode(images, captions, global_batch)
            keep = [j for j, it in enumerate(local) if it is not None]
            _check_finite(out, [local[j].key for j in keep], keep)
            if keep:
                chunk = work / f"chunk-p{process:03d}-{seq:06d}.safetensors"
                save_file(
                    chunk,
                    {name: np.ascontiguousarray(value[keep]) for name, value in out.items()},
                    metadata={"items": json.dumps([local[j].id for j in keep])},
                )
                if remote is not None:
                    remote.push_chunk(chunk)
                seq += 1
            bar.update(sum(1 for it in batch if it is not None))
            if on_batch is not None:
                on_batch(len(keep))
    seconds = time.perf_counter() - start
    _barrier("flux_jax_cache_encoded")
    # A collective on the mesh, so every process runs it; process 0 writes it.
    rows = global_batch // processes
    empty = encoders.tokens([""]) if enc.online else encoders.encode_text([""] * rows, global_batch)
    if process == 0:
        if remote is not None:
            remote.fetch_chunks()
        _finalize(
            cache_dir,
            items,
            report,
            spec,
            settings,
            fingerprint,
            digest,
            empty,
            encoders,
            source.describe(),
            source_digest,
            kept if kept is not None and kept.intact.any() else None,
            online=enc.online,
        )
        if remote is not None:
            remote.publish()
    _barrier("flux_jax_cache_done")
    if remote is not None:
        remote.finish(process)
    return CacheSummary(shown, len(items), len(pending), seconds, report, buckets, damaged=damaged)


def _check_complete(cfg: Any, shown: Any, info: dict[str, Any], fingerprint: str, digest: str) -> None:
    """The complete cache ``info`` (its cache.json) is of ``cfg``'s kind, settings and data, or a DataError."""
    check_cache_kind(cfg, shown, info)
    if info.get("fingerprint") != fingerprint or info.get("items_digest") != digest:
        raise DataError(
            f"{shown}: a complete cache built from other data or settings is there; run with --force to "
            "rebuild it, or set data.cache_dir to another directory"
        )


def _remote(cfg: Any) -> Any:
    """``cfg``'s bucket cache (`cache_remote.RemoteCache`), or None for a local one."""
    if not is_remote(cfg.data.cache_dir or ""):
        return None
    from flux_jax.data.cache_remote import remote_cache

    return remote_cache(cfg)


def build_missing_cache(
    cfg: Any, *, progress: bool = True, devices: Sequence[Any] | None = None
) -> CacheSummary | None:
    """The trainer's cache step: `build_cache` with ``cfg``'s settings (exactly what `flux-jax cache` runs) when
    the cache dir holds no complete cache (no cache.json), so an empty dir is built and a partial cache left by
    an interrupted build is continued, not restarted; None, with nothing done, when cache.json is there.

    A complete cache is left to the trainer's checks (`LatentCacheReader`, `check_built_from`), which refuse
    one built from other data or settings, and a damaged one, naming the `flux-jax cache` command that fixes
    it: the trainer never rebuilds or repairs a complete cache itself. Replacing one silently would throw away
    an expensive encode the user may still want (another run's data, a typo in data.path); reusing it would
    train on the wrong data; and damage to a finished cache is worth a look at the disk before re-encoding.

    On several processes every one must call this, as every host runs `flux-jax cache`: the build is collective
    (each process scans and encodes its `share` of the examples into its own chunk files, process 0 alone writes
    the dataset and cache.json, with barriers between), so ``cache_dir`` must be on a filesystem all hosts see, and
    all processes must take the same branch here: process 0's look at cache.json decides for everyone (a host
    that looked a moment later could see the file another run just finished and skip the collectives)."""
    cache_dir = resolve_cache_dir(cfg)
    remote = _remote(cfg)
    complete = (cache_dir / CACHE_JSON).is_file() if remote is None else remote.complete()
    missing = bool(_broadcast(np.asarray([not complete], np.int32))[0])
    if not missing:
        return None
    shown = cache_dir if remote is None else remote.url
    from flux_jax.data.encoding import demo_stamp

    if cfg.model.base and demo_stamp(cfg) is not None:
        # The generated demo encoders are random and sized for a model.preset base; a cache made with them can
        # only fail the trainer's width check later, after encoding, and would then block the right cache.
        raise ConfigError(
            f"{shown}: no complete cache to train on, and no encoders are configured to build it with; set "
            "encoders.root to the base's FLUX.1 download (e.g. black-forest-labs/FLUX.1-dev)",
            key="encoders.root",
        )
    import jax

    main = jax.process_index() == 0
    if main:
        log.info(
            "no complete latent cache in %s: caching %s first, as `flux-jax cache` does (resumable; report: %s)",
            shown,
            cfg.data.path,
            shown / REPORT_JSON,
        )
    summary = build_cache(cfg, progress=progress, devices=devices)
    if main:
        log.info("%s", summary.describe())
    return summary


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _broadcast(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process."""
    import jax

    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def _read_info(marker: Path) -> dict[str, Any]:
    try:
        info = json.loads(marker.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        return info
    except (OSError, ValueError) as e:
        raise DataError(f"{marker}: unreadable ({e}); run with --force to rebuild the cache") from None


# --------------------------------------------------------------------------------------------------
# Verify and repair a complete cache


@dataclasses.dataclass
class _Kept:
    """A complete cache's records that read back intact: what a repair copies into the new dataset."""

    cache_dir: Path
    shapes: dict[str, int]
    shards: list[tuple[str, int, int]]
    """(file, relative to the cache dir; first record; count), in record order."""
    intact: np.ndarray
    """[records] bool."""
    dataset: str
    """The dataset directory, relative to the cache dir."""

    def __post_init__(self) -> None:
        self._open: dict[str, Any] = {}
        self._firsts = [first for _, first, _ in self.shards]

    def read(self, index: int) -> dict[str, Any]:
        from flux_jax.data.tfds_builders import CacheShard

        name, first, count = self.shards[bisect.bisect_right(self._firsts, index) - 1]
        if not first <= index < first + count:
            raise IndexError(index)
        if name not in self._open:
            self.close()  # records are read in order: one shard open at a time
            self._open = {name: CacheShard(self.cache_dir / name, self.shapes)}
        return self._open[name].read(index - first)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open = {}


def _shards_from_table(table: dict[str, Any]) -> list[tuple[str, int, int]]:
    return sorted(
        ((name, int(e["first"]), int(e["records"])) for name, e in table.items() if "records" in e),
        key=lambda shard: shard[1],
    )


def _survey(cache_dir: Path, info: dict[str, Any], items: Sequence[WorkItem]) -> tuple[dict[str, str], _Kept]:
    """What is damaged in a complete cache (file -> problem; empty when it is intact) and which records survive.

    With a file table: sizes and checksums decide; the records of an intact shard are kept unread and a damaged
    shard is read record by record (Riegeli checks a hash per record). Without one (a cache written before file
    tables existed): every record of every shard is read."""
    from flux_jax.data.tfds_builders import SPLIT, CacheShard

    try:
        shapes = {k: int(v) for k, v in info["shapes"].items()}
        dataset = str(info["dataset"])
        table = info.get("files")
        problems: dict[str, str] = {}
        if isinstance(table, dict):
            problems = check_files(cache_dir, table)
            shards = _shards_from_table(table)
        else:
            import tensorflow_datasets as tfds

            try:
                split = tfds.builder_from_directory(str(cache_dir / dataset)).info.splits[SPLIT]
                lengths = [int(n) for n in split.shard_lengths]
                starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
                shards = [(f"{dataset}/{f}", s, n) for f, s, n in zip(split.filenames, starts, lengths, strict=True)]
            except Exception as e:  # TFDS raises several types for a missing or damaged dataset_info.json
                problems[f"{dataset}/dataset_info.json"] = f"unreadable ({str(e).splitlines()[0] if str(e) else e!r})"
                shards = []
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{cache_dir / CACHE_JSON}: malformed ({e!r}); run with --force to rebuild the cache") from None
    intact = np.zeros(len(items), bool)
    ends = [first + count for _, first, count in shards]
    if [first for _, first, _ in shards] != [0, *ends[:-1]] or (ends[-1] if ends else 0) != len(items):
        problems.setdefault(dataset, f"its shards do not hold the {len(items)} records cache.json lists")
        shards = []
    for name, first, count in shards:
        if isinstance(table, dict) and name not in problems:
            intact[first : first + count] = True  # the checksum matches
            continue
        lost = 0
        with CacheShard(cache_dir / name, shapes) as shard:
            if len(shard) != count:
                problems.setdefault(name, f"{len(shard)} readable records, {count} expected")
                continue
            for j in range(count):
                it = items[first + j]
                try:
                    r = shard.read(j)
                    same = _text(r["source"]) == it.key and (int(r["bucket"]), int(r["group"]), bool(r["flipped"])) == (
                        it.bucket,
                        it.group,
                        it.flipped,
                    )
                except ValueError:
                    same = False
                if same:
                    intact[first + j] = True
                else:
                    lost += 1
        if lost:
            problems.setdefault(name, f"{lost} of its {count} records do not read back intact")
    return problems, _Kept(cache_dir, shapes, shards, intact, dataset)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _dataset_files(cache_dir: Path, dataset: Path, shards: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
    names = [p.relative_to(cache_dir).as_posix() for p in sorted(dataset.rglob("*")) if p.is_file()]
    return file_table(cache_dir, [*names, EMPTY_CAPTION], {name: (first, n) for name, first, n in shards})


def _record_files(cache_dir: Path, info: dict[str, Any], kept: _Kept, source_digest: str) -> None:
    """Give an older, verified cache its file table and source fingerprint (cache.json rewritten atomically)."""
    info = {**info, "source_digest": source_digest}
    info["files"] = _dataset_files(cache_dir, cache_dir / kept.dataset, kept.shards)
    with atomic_file(cache_dir / CACHE_JSON) as tmp:
        tmp.write_text(json.dumps(info) + "\n")
    log.info("cache %s: verified every record and recorded its file checksums in %s", cache_dir, CACHE_JSON)


def _open_work_dir(work: Path, fingerprint: str, settings: dict[str, Any], process: int) -> None:
    marker = work / "fingerprint.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            raise DataError(
                f"{work}: holds a partial cache made with other settings or encoders; `flux-jax cache --force` "
                "discards it, or set data.cache_dir to another directory"
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
                rows = {f.info(name).shape[0] for name in f.keys()}
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


def _render_batch(source: Source, data: Any, items: Sequence[WorkItem], buckets: Sequence[Bucket]) -> np.ndarray:
    def one(it: WorkItem) -> np.ndarray:
        try:
            image = decode_image(source[it.index].image, max_pixels=data.max_image_pixels).image
        except BadExample as e:
            raise DataError(f"{it.key}: changed while caching ({e})") from None
        return render(image, buckets[it.bucket], it.box, flip=it.flipped)

    with concurrent.futures.ThreadPoolExecutor(min(len(items), os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(one, items)))


def _plan_shared(
    pending: Sequence[WorkItem], owners: Sequence[range], global_batch: int
) -> Iterator[tuple[int, list[WorkItem | None]]]:
    """(bucket, rows) of the global batches that encode ``pending``, one bucket each, where process ``p`` (rows
    ``[p*b, (p+1)*b)`` of every batch) gets only items of its share ``owners[p]`` of the source: a bucket takes
    as many batches as its largest share needs, and rows with nothing left to encode are None (padding). Every
    process computes the same plan; on one process it is `_plan` with its padding left empty."""
    rows = global_batch // len(owners)
    starts = [r.start for r in owners]
    by_bucket: dict[int, list[list[WorkItem]]] = {}
    for it in pending:
        by_bucket.setdefault(it.bucket, [[] for _ in owners])[bisect.bisect_right(starts, it.index) - 1].append(it)
    for bucket in sorted(by_bucket):
        parts = by_bucket[bucket]
        for start in range(0, max(len(part) for part in parts), rows):
            batch: list[WorkItem | None] = []
            for part in parts:
                mine = part[start : start + rows]
                batch += [*mine, *[None] * (rows - len(mine))]
            yield bucket, batch


def _render_rows(
    source: Source, data: Any, items: Sequence[WorkItem | None], buckets: Sequence[Bucket], bucket: int
) -> np.ndarray:
    """`_render_batch` where padding rows (None) are black images of the batch's bucket (a host with nothing of
    this bucket left still takes part in the collective encode, with padding only)."""
    real = [it for it in items if it is not None]
    rendered = iter(_render_batch(source, data, real, buckets) if real else ())
    pad = np.zeros((buckets[bucket].height, buckets[bucket].width, 3), np.float32)
    return np.stack([next(rendered) if it is not None else pad for it in items])


def _check_finite(out: dict[str, np.ndarray], names: Sequence[str], rows: Sequence[int]) -> None:
    for field, value in out.items():
        bad = [names[i] for i, r in enumerate(rows) if not np.isfinite(value[r].astype(np.float32)).all()]
        if bad:
            raise FluxJaxError(
                f"the encoders produced non-finite {field} for {', '.join(bad[:5])}; nothing was written"
            )


def record_bytes(shapes: dict[str, int], tokens: int) -> int:
    """The tensors of one record of ``tokens`` latent tokens: bf16 latents, then bf16 T5 states and the fp32
    CLIP pooled vector, or (online) int32 T5 and CLIP token ids."""
    if "clip_length" in shapes:
        text = 4 * (shapes["t5_length"] + shapes["clip_length"])
    else:
        text = 2 * shapes["t5_length"] * shapes["t5_dim"] + 4 * shapes["clip_dim"]
    return 2 * shapes["latent_dim"] * tokens + text


def _num_shards(items: Sequence[WorkItem], spec: BucketSpec, shapes: dict[str, int]) -> int:
    """Shards of about `SHARD_BYTES`, from the records' sizes (`record_bytes`)."""
    buckets = spec.all_buckets
    total = sum(record_bytes(shapes, math.prod(buckets[it.bucket].tokens)) + 64 for it in items)  # + small fields
    return max(1, min(len(items), -(-total // SHARD_BYTES)))


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
    source_digest: str,
    kept: _Kept | None = None,
    online: bool = False,
) -> None:
    """Write the dataset from the chunks (and, in a repair, the intact records of the damaged one), the report,
    the empty caption and cache.json with the file table; then drop the chunks and the old dataset."""
    from flux_jax.data.tfds_builders import write_latent_cache

    work = cache_dir / WORK_DIR
    where = _done_items(work)
    intact = kept.intact if kept is not None else np.zeros(len(items), bool)
    missing = [it.key for it, keep in zip(items, intact, strict=True) if it.id not in where and not keep]
    if missing:
        raise DataError(f"{cache_dir}: examples were not encoded: {', '.join(missing[:5])}")
    buckets = spec.all_buckets
    shapes = {"latent_dim": encoders.latent_dim, "t5_length": encoders.t5_max_length}
    if online:
        shapes["clip_length"] = int(empty["clip_ids"].shape[-1])
    else:
        shapes.update(t5_dim=encoders.t5_dim, clip_dim=encoders.clip_dim)
    fields = ("latents", *text_fields(online))
    files: dict[Path, SafetensorsFile] = {}

    def tensors(index: int, it: WorkItem) -> dict[str, np.ndarray]:
        if it.id not in where:
            assert kept is not None
            r = kept.read(index)
            return {name: r[name] for name in fields}
        chunk, row = where[it.id]
        if chunk not in files:
            if len(files) >= 64:  # bound the open files: records follow source order, chunks bucket order
                files.pop(next(iter(files))).close()
            files[chunk] = SafetensorsFile(chunk)
        f = files[chunk]
        return {name: np.asarray(f.array(name)[row]) for name in fields}

    def examples() -> Iterator[dict[str, Any]]:
        for index, it in enumerate(items):
            gh, gw = buckets[it.bucket].tokens
            yield {
                **tensors(index, it),
                "height": gh,
                "width": gw,
                "bucket": it.bucket,
                "group": it.group,
                "repeats": it.repeats,
                "flipped": it.flipped,
                "caption": it.caption,
                "source": it.key,
            }

    # A repair writes beside the dataset it reads from; otherwise any dataset here is from a finalize that died
    # before cache.json.
    old_root = kept.dataset.split("/")[0] if kept is not None else None
    root = REPAIR_DIR if old_root == TFDS_DIR else TFDS_DIR
    for name in (TFDS_DIR, REPAIR_DIR):
        if name != old_root:
            shutil.rmtree(cache_dir / name, ignore_errors=True)
    try:
        dataset, shards = write_latent_cache(
            cache_dir / root, shapes, examples, num_shards=_num_shards(items, spec, shapes)
        )
    finally:
        for f in files.values():
            f.close()
        if kept is not None:
            kept.close()
    save_file(cache_dir / EMPTY_CAPTION, {name: empty[name][0] for name in text_fields(online)})
    with atomic_file(cache_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    starts = np.concatenate([[0], np.cumsum([n for _, n in shards])[:-1]]).astype(int).tolist()
    rel = dataset.relative_to(cache_dir).as_posix()
    shard_table = [(f"{rel}/{name}", first, n) for (name, n), first in zip(shards, starts, strict=True)]
    info = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "items_digest": digest,
        "source": description,
        "source_digest": source_digest,
        "dataset": rel,
        "num_records": len(items),
        "buckets": [[b.width, b.height] for b in buckets],
        "shapes": shapes,
        "records": {
            "bucket": [it.bucket for it in items],
            "group": [it.group for it in items],
            "repeats": [it.repeats for it in items],
            # The example each record is of (its file or shard name): what data.holdout hashes (`mixing`).
            "key": [it.key for it in items],
        },
        "settings": settings,
        "files": _dataset_files(cache_dir, dataset, shard_table),
    }
    with atomic_file(cache_dir / CACHE_JSON) as tmp:
        tmp.write_text(json.dumps(info) + "\n")
    if old_root is not None and old_root != root:
        shutil.rmtree(cache_dir / old_root, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
