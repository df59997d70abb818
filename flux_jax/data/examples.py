"""Cached training examples (VAE latents + text embeddings) and a resumable, host-sharded batch iterator.

The trainer never sees images or captions: the data pipeline (VAE + T5 + CLIP, run once) writes each example as

  ``latents``  [h * w, 64]           packed 2x2 latent patches, already VAE-normalised ((z - shift) * scale), bf16
  ``t5``       [text_len, 4096]      T5-XXL last hidden states (context_in_dim of the model), bf16
  ``clip``     [768]                 CLIP-L pooled output (vec_in_dim), fp32 or bf16
  ``height``, ``width``              the packed latent grid in tokens (pixels / 16); ``img_ids`` derive from it

This module also holds the interface every training input satisfies (``ExampleSource`` for random access,
``DataIterator`` for what the loop reads), so the trainer consumes one type whatever the source.

On disk (``CACHED_FORMAT``) a dataset is a directory::

  index.json               {"format": "flux_jax.cached_examples", "version": 1, "shards": [...],
                            "examples": [{"shard": 0, "name": "000000", "height": 32, "width": 32,
                                          "text_len": 512, "caption": "..."}, ...]}
  shard-00000.safetensors  tensors "<name>.latents", "<name>.t5", "<name>.clip"

Batches are grouped by ``BatchShape`` (height, width, text_len), so every batch stacks without padding. The
iterator's position is ``{"epoch", "position"}`` (batches consumed within the epoch): the batch order of an epoch
is a pure function of (seed, epoch), so a resumed run continues mid-epoch without repeating or skipping. On
several hosts every host walks the same global plan and reads only its own rows of each batch.

This is the simple reader for in-memory and ``index.json`` datasets; the grain pipeline over the latent cache
(``flux_jax.data.pipeline``) produces the same batches (same keys and shapes) behind the same ``DataIterator``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from flux_jax.atomic import atomic_dir
from flux_jax.errors import DataError
from flux_jax.model.latents import PIXELS_PER_TOKEN, image_ids
from flux_jax.weights.safetensors_file import SafetensorsFile, save_file

CACHED_FORMAT = "flux_jax.cached_examples"
CACHED_VERSION = 1
INDEX_NAME = "index.json"
FIELDS = ("latents", "t5", "clip")


@dataclasses.dataclass(frozen=True)
class Example:
    """One cached training example (see the module docstring for shapes)."""

    latents: np.ndarray
    t5: np.ndarray
    clip: np.ndarray
    height: int
    width: int
    caption: str = ""

    @property
    def batch_shape(self) -> BatchShape:
        return BatchShape(self.height, self.width, self.t5.shape[0])


class BatchShape(NamedTuple):
    """The shape key that groups examples into batches (and so compiles the step once): the token grid and the
    text length. An aspect-ratio bucket (``flux_jax.data.buckets.Bucket``) fixes the grid."""

    height: int
    width: int
    text_len: int


class ExampleSource(Protocol):
    """Random access to examples, plus each example's batch shape without reading it."""

    def __len__(self) -> int: ...

    def batch_shape(self, index: int) -> BatchShape: ...

    def read(self, index: int) -> Example: ...

    def describe(self) -> str: ...


class DataIterator(Protocol):
    """What the training loop reads: this host's rows of the next global batch, and a JSON-able resumable state."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------------
# Sources


class InMemoryExamples:
    """Examples held in memory (the synthetic tiny dataset, tests)."""

    def __init__(self, examples: Sequence[Example], description: str = "in-memory"):
        if not examples:
            raise DataError(f"{description}: no examples")
        self.examples = list(examples)
        self.description = description

    def __len__(self) -> int:
        return len(self.examples)

    def batch_shape(self, index: int) -> BatchShape:
        return self.examples[index].batch_shape

    def read(self, index: int) -> Example:
        return self.examples[index]

    def describe(self) -> str:
        return f"{self.description} ({len(self)} examples)"


class CachedExamples:
    """A cached-example directory (``CACHED_FORMAT``), validated up front and read lazily through mmaps."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        index_path = self.path / INDEX_NAME
        if not self.path.is_dir():
            raise DataError(f"{self.path}: dataset directory not found")
        if not index_path.is_file():
            raise DataError(f"{self.path}: no {INDEX_NAME}; not a cached-example dataset ({CACHED_FORMAT})")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{index_path}: cannot read index ({e})") from None
        if not isinstance(index, dict) or index.get("format") != CACHED_FORMAT:
            raise DataError(f"{index_path}: format is not {CACHED_FORMAT!r}")
        if index.get("version") != CACHED_VERSION:
            raise DataError(f"{index_path}: unsupported version {index.get('version')!r} (expected {CACHED_VERSION})")
        try:
            shards = [str(s) for s in index["shards"]]
            entries = list(index["examples"])
        except (KeyError, TypeError) as e:
            raise DataError(f"{index_path}: missing or malformed field {e}") from None
        if not entries:
            raise DataError(f"{index_path}: the dataset has no examples")
        self.files = [SafetensorsFile(self.path / name) for name in shards]  # validates each header now
        self.entries: list[tuple[int, str, BatchShape, str]] = []
        for i, entry in enumerate(entries):
            try:
                shard, name = int(entry["shard"]), str(entry["name"])
                shape = BatchShape(int(entry["height"]), int(entry["width"]), int(entry["text_len"]))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{index_path}: example {i} is malformed ({e!r})") from None
            if not 0 <= shard < len(self.files):
                raise DataError(f"{index_path}: example {i} names shard {shard}, but there are {len(self.files)}")
            self._check(i, self.files[shard], name, shape)
            self.entries.append((shard, name, shape, str(entry.get("caption", ""))))

    def _check(self, i: int, file: SafetensorsFile, name: str, shape: BatchShape) -> None:
        h, w, text_len = shape
        for field in FIELDS:
            if f"{name}.{field}" not in file:
                raise DataError(f"{file.path}: example {i} ({name}) has no tensor {name}.{field}")
        latents, t5, clip = (file.info(f"{name}.{field}").shape for field in FIELDS)
        if len(latents) != 2 or latents[0] != h * w:
            raise DataError(f"{file.path}: {name}.latents has shape {latents}, expected [{h * w}, C] for {h}x{w}")
        if len(t5) != 2 or t5[0] != text_len:
            raise DataError(f"{file.path}: {name}.t5 has shape {t5}, expected [{text_len}, D]")
        if len(clip) != 1:
            raise DataError(f"{file.path}: {name}.clip has shape {clip}, expected [D]")

    def __len__(self) -> int:
        return len(self.entries)

    def batch_shape(self, index: int) -> BatchShape:
        return self.entries[index][2]

    def read(self, index: int) -> Example:
        shard, name, (h, w, _), caption = self.entries[index]
        file = self.files[shard]
        arrays = [file.array(f"{name}.{field}") for field in FIELDS]
        return Example(*arrays, height=h, width=w, caption=caption)

    def describe(self) -> str:
        shapes = sorted({tuple(e[2]) for e in self.entries})
        return f"cached examples {self.path} ({len(self)} examples, buckets (h, w, text_len) {shapes})"


def write_cached_examples(
    path: str | os.PathLike, examples: Sequence[Example], *, per_shard: int = 256, force: bool = False
) -> pathlib.Path:
    """Write examples as a ``CACHED_FORMAT`` directory, atomically (nothing appears at ``path`` on failure)."""
    if not examples:
        raise DataError(f"{path}: refusing to write a dataset with no examples")
    path = pathlib.Path(path)
    with atomic_dir(path, force=force) as tmp:
        shards, entries = [], []
        for start in range(0, len(examples), per_shard):
            shard_name = f"shard-{len(shards):05d}.safetensors"
            tensors = {}
            for i, ex in enumerate(examples[start : start + per_shard], start=start):
                if ex.latents.shape[0] != ex.height * ex.width:
                    raise DataError(f"example {i}: latents {ex.latents.shape} do not match {ex.height}x{ex.width}")
                name = f"{i:06d}"
                tensors.update({f"{name}.latents": ex.latents, f"{name}.t5": ex.t5, f"{name}.clip": ex.clip})
                entries.append(
                    dict(
                        shard=len(shards),
                        name=name,
                        height=ex.height,
                        width=ex.width,
                        text_len=int(ex.t5.shape[0]),
                        caption=ex.caption,
                    )
                )
            save_file(tmp / shard_name, tensors)
            shards.append(shard_name)
        index = dict(format=CACHED_FORMAT, version=CACHED_VERSION, shards=shards, examples=entries)
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return path


def synthetic_examples(
    *,
    in_channels: int,
    context_dim: int,
    vec_dim: int,
    resolution: int,
    count: int = 16,
    classes: int = 4,
    text_len: int = 8,
    seed: int = 0,
) -> InMemoryExamples:
    """A small fixed dataset for smoke runs: ``classes`` flat latent "colours", each tied to one caption embedding.

    A class's latents are one random 64-channel vector at every token (what a solid-colour image looks like in
    latent space) plus a little per-example noise, and its T5/CLIP embeddings are fixed random vectors. The
    velocity target then depends on the conditioning in a way a small LoRA learns within a few dozen steps, so
    the loss visibly falls. Deterministic in ``seed``; float32 so the fp32 smoke run is exactly reproducible.
    """
    grid = resolution // PIXELS_PER_TOKEN
    rng = np.random.default_rng(seed)
    colours = rng.standard_normal((classes, in_channels)).astype(np.float32)
    text_protos = rng.standard_normal((classes, text_len, context_dim)).astype(np.float32)
    vec_protos = rng.standard_normal((classes, vec_dim)).astype(np.float32)
    examples = []
    for i in range(count):
        c = i % classes
        noise = 0.1 * rng.standard_normal((grid * grid, in_channels)).astype(np.float32)
        examples.append(
            Example(
                latents=colours[c][None, :] + noise,
                t5=text_protos[c],
                clip=vec_protos[c],
                height=grid,
                width=grid,
                caption=f"synthetic colour {c}",
            )
        )
    return InMemoryExamples(examples, f"synthetic: {classes} flat latent colours at {grid}x{grid} tokens, seed {seed}")


# --------------------------------------------------------------------------------------------------
# Iteration


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """Where the iterator stands: ``position`` batches of ``epoch`` were consumed."""

    epoch: int = 0
    position: int = 0


class BatchIterator:
    """Yields this host's rows of each global batch: ``{"latents", "t5", "clip", "img_ids"}``, leading dim = rows.

    Every host walks the same global plan (see :meth:`plan`) and takes rows ``[p * R, (p + 1) * R)`` of each
    global batch, R = batch_size / process_count. ``get_state()`` / ``set_state()`` carry a JSON-able dict
    ``{"epoch", "position", "seed", "batch_size", "examples"}``; a state taken with another seed, global batch
    or dataset size is refused (resuming from it would repeat or skip examples).
    """

    def __init__(
        self, source: ExampleSource, *, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ):
        if batch_size % process_count:
            raise DataError(f"global batch of {batch_size} examples cannot be split over {process_count} hosts")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.rows = batch_size // process_count
        self._shapes = [source.batch_shape(i) for i in range(len(source))]
        if not self.plan(0):
            counts: dict[tuple, int] = {}
            for b in self._shapes:
                counts[tuple(b)] = counts.get(tuple(b), 0) + 1
            raise DataError(
                f"{source.describe()}: no shape bucket holds a full batch of {batch_size} examples "
                f"(bucket sizes {counts}); lower train.batch_size or add examples"
            )
        self.state = IteratorState()
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (lists of example indices): a pure function of (seed, epoch).

        Examples are shuffled, grouped by batch shape in shuffled order, cut into full batches (a shape's
        remainder is dropped for this epoch only; the next shuffle drops others), and the batches shuffled.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._shapes))
        by_shape: dict[BatchShape, list[int]] = {}
        for i in order:
            by_shape.setdefault(self._shapes[i], []).append(int(i))
        batches = []
        for shape in sorted(by_shape):
            members = by_shape[shape]
            for start in range(0, len(members) - self.batch_size + 1, self.batch_size):
                batches.append(members[start : start + self.batch_size])
        return [batches[i] for i in rng.permutation(len(batches))]

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        if self._plan_epoch != epoch:
            self._plan_epoch, self._plan = epoch, self.plan(epoch)
        return self._plan

    def next_indices(self) -> list[int]:
        """The global example indices of the next batch; advances the state."""
        epoch, position = self.state.epoch, self.state.position
        plan = self._epoch_plan(epoch)
        if position >= len(plan):
            epoch, position = epoch + 1, 0
            plan = self._epoch_plan(epoch)
        self.state = IteratorState(epoch, position + 1)
        return plan[position]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        indices = self.next_indices()
        mine = indices[self.process_index * self.rows : (self.process_index + 1) * self.rows]
        return collate([self.source.read(i) for i in mine])

    def get_state(self) -> dict[str, int]:
        return {
            "epoch": self.state.epoch,
            "position": self.state.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "examples": len(self._shapes),
        }

    def set_state(self, state: Mapping[str, object]) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])  # type: ignore[call-overload]
            theirs = tuple(int(state[k]) for k in ("seed", "batch_size", "examples"))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"invalid data-iterator state {dict(state)!r}: {e!r}") from None
        ours = (self.seed, self.batch_size, len(self._shapes))
        if theirs != ours:
            raise DataError(
                f"the checkpoint's data-iterator state belongs to another input (seed, global batch, examples: "
                f"{theirs} vs {ours}); resuming would repeat or skip examples"
            )
        self.state = IteratorState(epoch, position)


def collate(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Stack same-bucket examples into a batch (leading dim = examples)."""
    first = examples[0]
    ids = image_ids(first.height, first.width)
    return {
        "latents": np.stack([e.latents for e in examples]),
        "t5": np.stack([e.t5 for e in examples]),
        "clip": np.stack([e.clip for e in examples]),
        "img_ids": np.broadcast_to(ids, (len(examples), *ids.shape)).copy(),
    }
