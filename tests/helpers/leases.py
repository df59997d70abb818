"""Run-directory leases written by hand, for the tests of `flux_jax.train.lease` and of the trainer's refusal."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flux_jax.train.lease import LEASE_FILE, Owner, _process_start


def write_owner(run: Path, **fields) -> Owner:
    """A lease in ``run`` as a trainer with ``fields`` (default: this host, started an hour ago, heartbeat now)."""
    now = time.time()
    defaults = dict(host=socket.gethostname(), pid=1, token="t" * 32, since=now - 3600, heartbeat=now, interval=30.0)
    owner = Owner(**{**defaults, **fields})
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE_FILE).write_bytes(owner.to_json())
    return owner


@contextlib.contextmanager
def live_owner(run: Path, **fields) -> Iterator[Owner]:
    """A lease held by a live process on this machine (a sleeping child) for the duration."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield write_owner(run, pid=proc.pid, start=_process_start(proc.pid), **fields)
    finally:
        proc.kill()
        proc.wait()


def a_dead_pid() -> int:
    """The pid of a process that exited and was reaped: it names no process now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def refused_while_paused(first: subprocess.Popen, command: list[str], env: dict, cwd: Path) -> tuple[str, str, float]:
    """Run a second trainer ``command`` while ``first`` (which holds the lease) is paused with SIGSTOP, so it
    cannot finish and release the lease meanwhile. Asserts the second exits 2 with one ``flux-jax train:`` line
    and no traceback; returns (that line, its stderr, how long it took)."""
    first.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        second = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
        took = time.monotonic() - started
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    error = [line for line in second.stderr.splitlines() if line.startswith("flux-jax train:")]
    assert len(error) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    return error[0], second.stderr, took
