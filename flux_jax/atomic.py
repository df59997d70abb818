"""All-or-nothing output files and directories.

A converter or trainer that dies half-way (preemption, OOM, Ctrl-C, a bad tensor) must not leave a
truncated checkpoint at the path a later run will trust. Both context managers here write into a hidden
temporary sibling on the same filesystem (so the final rename is atomic and never copies) and move it into
place only after the body finished without an exception; on any exception the temporary is deleted and the
destination is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
from collections.abc import Iterator

from flux_jax.errors import FluxJaxError


class OutputExistsError(FluxJaxError, FileExistsError):
    """The output path already exists and overwriting was not requested.

    A `FluxJaxError` so the CLI prints one line, and a `FileExistsError` so generic callers can catch it.
    """


def _temp_sibling(path: pathlib.Path, tag: str) -> pathlib.Path:
    # Hidden, unique per process and call, and in the same directory: same filesystem => atomic rename.
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(directory: pathlib.Path) -> None:
    """Persist a rename: the new directory entry is durable only once the parent directory is fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms or filesystems that cannot open directories; the rename itself still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: pathlib.Path) -> None:
    """Best-effort removal of a file or directory tree (cleanup must not mask the original error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _exists_message(path: pathlib.Path) -> str:
    return f"{path} already exists (use --force to overwrite)"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool = True) -> Iterator[pathlib.Path]:
    """Yield a temporary path to write; on success fsync it and rename it onto `path`.

    The yielded path does not exist yet: the caller creates it (with normal permissions, unlike mkstemp's
    0600). Missing parent directories are created. `force` defaults to True because replacing a single file
    is itself atomic (os.replace); pass False to refuse an existing destination with `OutputExistsError`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise FluxJaxError(f"{path} is a directory, expected a file path")
    if not force and path.exists():
        raise OutputExistsError(_exists_message(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise FluxJaxError(f"{path}: nothing was written (temporary file {tmp.name} is missing)")
        _fsync_file(tmp)
        if not force and path.exists():  # appeared while we were writing
            raise OutputExistsError(_exists_message(path))
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[pathlib.Path]:
    """Yield a fresh temporary directory; on success move it into place as `path`.

    Without `force` an existing `path` is refused up front (before any work is done) with
    `OutputExistsError`. With `force` the existing `path` is replaced only after the body succeeded: it is
    first renamed aside, the new directory renamed in, and then the old one deleted, so a failure at any
    point leaves either the old or the new complete directory at `path`, never a mix.
    """
    path = pathlib.Path(path)
    if not force and path.exists():
        raise OutputExistsError(_exists_message(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        old: pathlib.Path | None = None
        if path.exists() or path.is_symlink():
            if not force:  # appeared while we were writing; rename would silently replace an empty dir
                raise OutputExistsError(_exists_message(path))
            old = _temp_sibling(path, "old")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)  # put the previous output back
            raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        _remove(old)
