"""Run directories that are local paths or bucket URLs (``gs://bucket/run``).

On a multi-host TPU slice every host must reach the run's checkpoints, and a preempted spot VM is deleted with its
disk, so ``output_dir`` may be a bucket. orbax writes checkpoints there itself (etils.epath for files, tensorstore
for arrays); the few small files the trainer writes (config.yaml, metrics.jsonl, TensorBoard events) go through
this module. epath picks the backend per scheme: TensorFlow's gfile when TensorFlow is installed (it is a
dependency), gcsfs otherwise (``EPATH_USE_TF=false``).
"""

from __future__ import annotations

import os
import pathlib

from etils import epath

from flux_jax.atomic import atomic_file


def is_remote(location: str | os.PathLike) -> bool:
    """A URL with a scheme (gs://, s3://, ...) rather than a path on this machine."""
    return "://" in os.fspath(location)


def is_local_file(location: str | os.PathLike) -> bool:
    """A file on this machine (a LoRA file, say) rather than a directory or a bucket URL (a training run)."""
    return not is_remote(location) and pathlib.Path(location).is_file()


def run_path(location: str | os.PathLike) -> epath.Path:
    """``location`` as an epath.Path: a URL as it is, a local path made absolute (orbax requires absolute paths)."""
    if is_remote(location):
        return epath.Path(os.fspath(location))
    return epath.Path(os.path.abspath(os.fspath(location)))


def write_text(path: epath.Path, text: str) -> None:
    """Replace the file at ``path`` with ``text``, all or nothing.

    Locally through a temporary sibling and a rename; in a bucket an upload is already all or nothing (the object
    appears only once complete), and a rename would be a second full copy.
    """
    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    with atomic_file(pathlib.Path(os.fspath(path))) as tmp:
        tmp.write_text(text)


def upload(local: pathlib.Path, remote: epath.Path) -> None:
    """Copy every file under the local directory ``local`` to ``remote`` (same relative names), overwriting."""
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        target = remote / file.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
