"""All-or-nothing output files and directories.

A converter or trainer that dies half-way (preemption, OOM, Ctrl-C, a bad tensor) must not leave a
truncated checkpoint at the path a later run will trust. Both context managers here write into a hidden
temporary sibling on the same filesystem (so the final rename is atomic and never copies) and move it into
place only after the body finished without an exception; on any exception the temporary is deleted and the
destination is left exactly as it was.

A destination that refuses the write (read-only, permission denied, disk full, quota) becomes one
`OutputWriteError` naming the destination, after the temporary is removed; cleanup never raises over the first
error. Temporaries are named `.NAME.tmp-PID-HOST-RANDOM`: a process killed with SIGKILL cannot remove its own,
so `remove_stale_temporaries` (called by `atomic_dir` and by the converters before they write) deletes those of
processes of this host that are no longer running, and never one of a live process or of another host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import re
import secrets
import shutil
import socket
from collections.abc import Iterator

from flux_jax.errors import FluxJaxError

log = logging.getLogger(__name__)

# The destination refused the data: nothing flux-jax can fix, but the user can (another directory, free space).
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class OutputExistsError(FluxJaxError, FileExistsError):
    """The output path already exists and overwriting was not requested.

    A `FluxJaxError` so the CLI prints one line, and a `FileExistsError` so generic callers can catch it.
    """


class OutputWriteError(FluxJaxError, OSError):
    """The destination refused the write: read-only, permission denied, no space left, quota exceeded.

    A `FluxJaxError` so the CLI prints one line, and an `OSError` carrying the original `errno` so generic callers
    can still tell a full disk from a read-only one. `path` is the destination named in the message.
    """

    path: pathlib.Path


def _host() -> str:
    """This machine's name as it goes into temporary names (a shared filesystem may hold other hosts' ones)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:32] or "host"


def _temp_sibling(path: pathlib.Path, tag: str) -> pathlib.Path:
    # Hidden, unique per process and call, and in the same directory: same filesystem => atomic rename.
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{_host()}-{secrets.token_hex(4)}")


# `.NAME.tmp-PID-HOST-RANDOM`; names without a host are from older versions, which wrote only local temporaries.
_TEMP_RE = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)-(?:(?P<host>[A-Za-z0-9._]+)-)?[0-9a-f]{8}")


def _running(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie is not: it can write nothing more)."""
    if pid <= 0 or pid == os.getpid():  # kill(0, ...) would signal our process group: never call it dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) succeeded, so it exists


def remove_stale_temporaries(path: str | os.PathLike) -> list[pathlib.Path]:
    """Delete the temporaries for `path` left by processes of this host that no longer run (SIGKILL, power loss).

    Only `.NAME.tmp-*` / `.NAME.old-*` siblings of `path` are considered; those of a running process or of another
    host are kept. An `.old-*` copy (the previous output set aside while replacing it) is removed only when `path`
    exists, since otherwise it is the only complete copy; it is reported instead. Returns what was removed, and logs
    each one.
    """
    path = pathlib.Path(path)
    prefix = f".{path.name}."
    try:
        names = [e.name for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return []  # a missing or unreadable directory holds nothing we could remove
    host, removed = _host(), []
    for name in sorted(names):
        m = _TEMP_RE.fullmatch(name[len(prefix) :])
        if m is None or m["host"] not in (None, host):
            continue
        pid, stale = int(m["pid"]), path.with_name(name)
        if _running(pid):
            continue
        if m["kind"] == "old" and not os.path.lexists(path):
            log.warning(
                "%s is missing and %s holds its previous version (process %d stopped while replacing it); "
                "move it back to keep it",
                path,
                stale,
                pid,
            )
            continue
        if _remove(stale):
            log.warning("removed %s, left behind by process %d, which is no longer running", stale, pid)
            removed.append(stale)
    return removed


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


def _remove(path: pathlib.Path) -> bool:
    """Best-effort removal of a file or directory tree; True when nothing is left at `path`.

    Never raises: it runs while another error is on its way out, and must not replace it (on a read-only
    filesystem even unlinking a file that was never created fails with EROFS).
    """
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    except OSError as e:
        log.warning("could not remove the temporary %s: %s", path, e)
    try:
        return not os.path.lexists(path)
    except OSError:
        return False


def _inside(name: str | bytes | int | None, root: pathlib.Path) -> bool:
    if not isinstance(name, str | bytes):
        return False
    target, base = os.path.abspath(os.fsdecode(name)), os.path.abspath(root)
    return target == base or target.startswith(base + os.sep)


def _refused(e: BaseException, path: pathlib.Path, tmp: pathlib.Path) -> int | None:
    """The errno when `e` is the destination refusing our write (not, say, an unreadable input file)."""
    if isinstance(e, OutputWriteError):  # from a nested atomic write into our temporary: name our destination
        return e.errno if _inside(str(e.path), tmp) else None
    if not isinstance(e, OSError) or e.errno is None:
        return None
    if e.errno in _SPACE_ERRNOS:  # os.write gives no file name; nothing but a write runs out of space
        return e.errno
    if e.errno in _PERMISSION_ERRNOS and any(_inside(n, p) for n in (e.filename, e.filename2) for p in (tmp, path)):
        return e.errno
    return None


def _write_error(path: pathlib.Path, code: int, removed: bool) -> OutputWriteError:
    reason = os.strerror(code)
    message = f"{path}: cannot write ({reason[:1].lower()}{reason[1:]})"
    if code in _SPACE_ERRNOS:
        message += "; the partial output was removed" if removed else "; a partial temporary copy is left beside it"
    error = OutputWriteError(message)
    error.errno, error.path = code, path
    return error


def _make_parent(path: pathlib.Path) -> None:
    """Create `path`'s parent directories; a refusal is an `OutputWriteError` naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in _SPACE_ERRNOS | _PERMISSION_ERRNOS:
            raise
        raise _write_error(path, e.errno, True) from e


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
    _make_parent(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise FluxJaxError(f"{path}: nothing was written (temporary file {tmp.name} is missing)")
        _fsync_file(tmp)
        if not force and path.exists():  # appeared while we were writing
            raise OutputExistsError(_exists_message(path))
        os.replace(tmp, path)
    except BaseException as e:
        _abandon(e, path, tmp)
        raise
    _fsync_dir(path.parent)


def _abandon(error: BaseException, path: pathlib.Path, tmp: pathlib.Path) -> None:
    """After a failed write to ``tmp``: remove it, and turn a refused write (no space, no permission) into one
    ``OutputWriteError`` naming ``path``; any other error is left for the caller to re-raise."""
    removed = _remove(tmp)
    code = _refused(error, path, tmp)
    if code is not None:
        raise _write_error(path, code, removed) from error


def _restore(old: pathlib.Path, path: pathlib.Path) -> None:
    """Put the previous output back after a failed replace; a failure here is logged, not raised over the first."""
    try:
        os.rename(old, path)
    except OSError as e:
        log.error("could not move the previous %s back from %s (%s); it is still there", path, old, e)


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
    _make_parent(path)
    remove_stale_temporaries(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        tmp.mkdir()
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
                _restore(old, path)
            raise
    except BaseException as e:
        _abandon(e, path, tmp)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        _remove(old)
