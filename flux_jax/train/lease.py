"""One trainer per run directory: a lease object ``<output_dir>/lease.json``, locally or in a gs:// bucket.

Two trainers on one ``output_dir`` would both resume from the same checkpoint, write into the same directory and
rotate each other's checkpoints away. So a trainer first takes the run directory's lease and refuses to start
(``RunDirBusyError``: one line naming the owner's host, pid and start time) when another live trainer holds it.

The lease is a small JSON object (host, boot id, pid and process start time, a random token, since, heartbeat,
heartbeat interval) written with *conditional* writes through tensorstore's key-value store, the storage layer
orbax already uses, with the same credentials:

* taken by a create-only-if-absent write (locally tensorstore's ``file`` driver, which serialises conditional
  writes of one key between processes with a lock file and an atomic rename; on GCS ``ifGenerationMatch=0``);
* refreshed every ``interval`` seconds (a daemon thread) by a write that succeeds only if the object is still the
  one this trainer wrote last (its generation): an owner whose lease was taken over learns it at its next
  heartbeat and the loop stops (``check``) instead of writing on;
* removed (again only if still its own) when the run ends, however it ends short of a kill.

A lease left behind by a trainer that was killed is *stale* and taken over with a warning: at once when its owner
ran on this machine (same host name and boot id) and that process is gone, otherwise once its heartbeat is older
than ``STALE_AFTER`` owner intervals (5 minutes by default). A lease whose owner is alive on this machine is
never taken over, however old its heartbeat (a stopped process, ``kill -STOP`` or Ctrl-Z, may resume).

Limits: liveness across machines is the heartbeat alone, so a trainer on another machine whose heartbeat thread
stalled for longer than the timeout can lose its lease (it then stops at its next step); heartbeats compare wall
clocks, so hosts sharing a run directory need clocks within a minute or so of each other. Run directories with
other URL schemes (s3://, ...) get no lease (a warning says so). On a multi-host pod process 0 alone holds the lease
(the trainer tells the other processes whether it got it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from etils import epath

from flux_jax.errors import FluxJaxError
from flux_jax.storage import is_remote, run_path

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER = 10
"""A lease whose heartbeat is older than this many of its owner's intervals is stale."""
_FORMAT = "flux_jax.run_lease"


class RunDirBusyError(FluxJaxError):
    """Another trainer owns the run directory (or took it over from this one)."""


class RunDirError(FluxJaxError):
    """The run directory's lease cannot be read or written (not a directory, no permission, no such bucket)."""


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _boot_id() -> str | None:
    try:
        return _read_text("/proc/sys/kernel/random/boot_id").strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the owner."""
    try:
        stat = _read_text(f"/proc/{pid}/stat")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5): starttime


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        state = _read_text(f"/proc/{pid}/stat")
        if state[state.rindex(")") + 2 :].startswith("Z"):
            return False  # a zombie: exited, not yet reaped
    except OSError:
        return True  # no /proc: kill(0) is all we know
    return start is None or _process_start(pid) in (None, start)


def _time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


@dataclasses.dataclass
class Owner:
    """What a lease says about the trainer that holds it."""

    host: str
    pid: int
    token: str
    since: float
    heartbeat: float
    interval: float
    boot_id: str | None = None
    start: str | None = None

    def to_json(self) -> bytes:
        return json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Owner | None:
        try:
            d = json.loads(data)
            return cls(
                host=str(d["host"]),
                pid=int(d["pid"]),
                token=str(d["token"]),
                since=float(d["since"]),
                heartbeat=float(d["heartbeat"]),
                interval=float(d["interval"]),
                boot_id=d.get("boot_id"),
                start=d.get("start"),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def on_this_machine(self) -> bool:
        here = _boot_id()
        return self.host == socket.gethostname() and (self.boot_id is None or here is None or self.boot_id == here)

    def describe(self, now: float) -> str:
        return (
            f"host {self.host} pid {self.pid} since {_time(self.since)} "
            f"(last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)"
        )

    def stale_reason(self, now: float) -> str | None:
        """Why this lease may be taken over, or None while its owner may still be running."""
        if self.on_this_machine():
            if _process_alive(self.pid, self.start):
                return None
            return f"its process {self.pid} on this machine is gone"
        timeout = STALE_AFTER * self.interval
        age = now - self.heartbeat
        if age > timeout:
            return f"no heartbeat for {age:.0f} s (timeout {timeout:.0f} s)"
        return None


def _kvstore_spec(run_dir: epath.Path) -> dict[str, Any] | None:
    location = os.fspath(run_dir)
    if not is_remote(location):
        return {"driver": "file", "path": location.rstrip("/") + "/"}
    if location.startswith("gs://"):
        bucket, _, prefix = location[len("gs://") :].partition("/")
        prefix = prefix.strip("/")
        return {"driver": "gcs", "bucket": bucket, "path": prefix + "/" if prefix else ""}
    return None


class RunLease:
    """The lease of one run directory: ``acquire`` (or refuse), a heartbeat thread, ``check``, ``release``."""

    def __init__(self, run_dir: str | os.PathLike, *, interval: float = HEARTBEAT_S):
        self.run_dir = run_path(run_dir)
        self.where = self.run_dir / LEASE_FILE
        self.interval = float(interval)
        self._spec = _kvstore_spec(self.run_dir)
        self._store = None
        self._owner: Owner | None = None
        self._generation: bytes | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._created_dir = False

    @property
    def held(self) -> bool:
        return self._owner is not None

    # -- storage -----------------------------------------------------------------------------------------------

    def _kv(self):
        if self._store is None:
            import tensorstore as ts

            self._store = ts.KvStore.open(self._spec).result()
        return self._store

    def _read(self) -> tuple[bytes | None, bytes]:
        """(content or None when absent, generation): the generation of an absent key means "must not exist"."""
        got = self._kv().read(LEASE_FILE).result()
        return (got.value if got.state == "value" else None), got.stamp.generation

    def _write(self, value: bytes | None, if_equal: bytes) -> bytes | None:
        """Write (or delete, ``value=None``) only if the key's generation is still ``if_equal``; the new generation,
        or None when the condition failed."""
        stamp = self._kv().write(LEASE_FILE, value, if_equal=if_equal).result()
        return stamp.generation or None

    # -- the lease -----------------------------------------------------------------------------------------------

    def acquire(self) -> RunLease:
        """Take the lease, taking over a stale one with a warning; ``RunDirBusyError`` while another trainer owns
        the run directory, ``RunDirError`` when the lease cannot be read or written there."""
        try:
            return self._acquire()
        except FluxJaxError:
            raise
        except Exception as e:  # tensorstore reports storage failures as ValueErrors
            text = str(e).strip()
            reason = text.splitlines()[0] if text else type(e).__name__
            raise RunDirError(f"{self.where}: cannot take the run directory's lease: {reason}") from None

    def _acquire(self) -> RunLease:
        if self._spec is None:
            log.warning("%s: no lease for this kind of location; make sure no other trainer uses it", self.run_dir)
            return self
        if not is_remote(self.run_dir):
            self._created_dir = not os.path.isdir(os.fspath(self.run_dir))
        now = time.time()
        mine = Owner(
            host=socket.gethostname(),
            pid=os.getpid(),
            token=secrets.token_hex(16),
            since=now,
            heartbeat=now,
            interval=self.interval,
            boot_id=_boot_id(),
            start=_process_start(os.getpid()),
        )
        for _ in range(5):  # each retry follows a write that lost a race; one is almost always enough
            content, generation = self._read()
            now = time.time()
            taking_over = None
            if content is not None:
                owner = Owner.from_json(content)
                if owner is None:
                    raise RunDirBusyError(
                        f"{self.where}: not a flux-jax run lease; if no trainer is using {self.run_dir}, remove it"
                    )
                if owner.token == mine.token:  # our own write, whose reply was lost
                    self._hold(mine, generation)
                    return self
                reason = owner.stale_reason(now)
                if reason is None:
                    if owner.pid == mine.pid and owner.on_this_machine():
                        raise RunDirBusyError(
                            f"{self.run_dir} is in use by a trainer of this process set up {_time(owner.since)} "
                            f"that was never run or closed (Trainer.close() releases it)"
                        )
                    raise RunDirBusyError(
                        f"{self.run_dir} is in use by another trainer: {owner.describe(now)}; "
                        f"wait for it to finish or stop it, or use another output_dir"
                    )
                taking_over = (owner, reason)
            mine.heartbeat = now
            new = self._write(mine.to_json(), if_equal=generation)
            if new is not None:
                if taking_over is not None:
                    owner, reason = taking_over
                    log.warning(
                        "%s: taking over the lease of a trainer that is no longer running (%s; %s)",
                        self.run_dir,
                        owner.describe(now),
                        reason,
                    )
                self._hold(mine, new)
                return self
        raise RunDirBusyError(f"{self.where}: other trainers keep changing the lease; is another one starting?")

    def _hold(self, owner: Owner, generation: bytes) -> None:
        self._owner, self._generation = owner, generation
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeats, name="run-lease-heartbeat", daemon=True)
        self._thread.start()
        log.info("%s: this trainer holds the run directory's lease (pid %d)", self.where, owner.pid)

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.beat():
                    return
            except Exception as e:  # a storage hiccup: try again at the next beat
                log.warning("%s: could not refresh the lease (%s); retrying in %.0f s", self.where, e, self.interval)

    def beat(self) -> bool:
        """Refresh the heartbeat now; False once the lease turned out to be lost (``check`` then raises)."""
        with self._lock:
            if self._owner is None or self._lost is not None:
                return False
            self._owner.heartbeat = time.time()
            new = self._write(self._owner.to_json(), if_equal=self._generation)
            if new is not None:
                self._generation = new
                return True
            content, generation = self._read()
            owner = None if content is None else Owner.from_json(content)
            if owner is not None and owner.token == self._owner.token:  # our write landed; its reply did not
                self._generation = generation
                return True
            self._lost = (
                f"{self.run_dir}: this trainer lost the run directory's lease to "
                + (owner.describe(time.time()) if owner else "nobody (lease.json was removed)")
                + "; stopping without writing anything more"
            )
            log.error("%s", self._lost)
            return False

    def check(self) -> None:
        """Raise ``RunDirBusyError`` if another trainer took the lease over (seen at a heartbeat)."""
        if self._lost is not None:
            raise RunDirBusyError(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this trainer's (idempotent)."""
        if self._owner is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._lock:
            self._owner = None
            if self._lost is None:
                try:
                    if self._write(None, if_equal=self._generation) is None:
                        log.warning("%s: the lease changed hands before this trainer released it", self.where)
                except Exception as e:
                    log.warning(
                        "%s: could not remove the lease (%s); the next trainer will take it over", self.where, e
                    )
        if self._created_dir:  # leave no empty output_dir behind a run that stopped before writing anything
            with contextlib.suppress(OSError):
                os.rmdir(os.fspath(self.run_dir))

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
