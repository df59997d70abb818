"""One trainer per run directory: the lease object `lease.json` is taken atomically, refused while its owner lives,
taken over (with a warning) once the owner is gone, refreshed by a heartbeat, and removed at the end.

The trainer-level behaviour (a second `flux-jax train` on a run directory exits 2 before building anything, locally
and on a gs:// bucket) is in test_train_resume.py, test_train_loop.py and test_remote_run_dir.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_jax.train.lease import LEASE_FILE, STALE_AFTER, RunDirBusyError, RunDirError, RunLease, _process_start
from tests.helpers.leases import a_dead_pid, write_owner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def test_the_lease_is_created_held_and_removed(tmp_path):
    run = tmp_path / "run"
    lease = RunLease(run).acquire()
    held = json.loads((run / LEASE_FILE).read_text())
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    assert held["start"] == _process_start(os.getpid()) and len(held["token"]) == 32
    with pytest.raises(RunDirBusyError, match="in use by a trainer of this process"):
        RunLease(run).acquire()
    lease.release()
    assert not run.exists()  # it created the directory and nothing else was written: no empty output_dir left
    lease.release()  # idempotent


def test_a_live_owner_on_this_machine_is_refused_by_name_however_old_its_heartbeat(tmp_path, live_process):
    owner = write_owner(tmp_path, pid=live_process.pid, start=_process_start(live_process.pid), heartbeat=0.0)
    with pytest.raises(RunDirBusyError) as e:
        RunLease(tmp_path).acquire()
    message = str(e.value)
    assert "\n" not in message
    assert (
        f"{tmp_path} is in use by another trainer: host {socket.gethostname()} pid {live_process.pid} since " in message
    )
    assert "wait for it to finish or stop it, or use another output_dir" in message
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == owner.token  # untouched


def test_a_dead_owner_on_this_machine_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = a_dead_pid()
    write_owner(tmp_path, pid=pid, heartbeat=time.time() - 3600)  # owner dead, heartbeat old
    with caplog.at_level(logging.WARNING):
        lease = RunLease(tmp_path).acquire()
    assert f"taking over the lease of a trainer that is no longer running (host {socket.gethostname()} pid {pid}" in (
        caplog.text
    )
    assert f"its process {pid} on this machine is gone" in caplog.text
    assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == os.getpid()
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_reused_pid_does_not_keep_a_dead_owner_alive(tmp_path, live_process, caplog):
    write_owner(tmp_path, pid=live_process.pid, start="1")  # that pid now belongs to a process started later
    with caplog.at_level(logging.WARNING):
        RunLease(tmp_path).acquire().release()
    assert "taking over" in caplog.text


def test_an_owner_on_another_machine_is_stale_only_once_its_heartbeat_is_old(tmp_path, caplog):
    write_owner(tmp_path, host="elsewhere", pid=12345, interval=30.0, heartbeat=time.time() - 60)
    with pytest.raises(RunDirBusyError, match=r"host elsewhere pid 12345 since .* \(last heartbeat 60 s ago\)"):
        RunLease(tmp_path).acquire()
    write_owner(tmp_path, host="elsewhere", pid=12345, interval=30.0, heartbeat=time.time() - STALE_AFTER * 30 - 5)
    with caplog.at_level(logging.WARNING):
        lease = RunLease(tmp_path).acquire()
    assert "taking over the lease" in caplog.text and "no heartbeat for 305 s (timeout 300 s)" in caplog.text
    lease.release()


def test_the_heartbeat_refreshes_the_lease_and_a_takeover_is_noticed(tmp_path):
    lease = RunLease(tmp_path, interval=0.05).acquire()
    first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
    deadline = time.monotonic() + 30
    while json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] == first:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.02)
    lease.check()  # still ours
    other = write_owner(tmp_path, host="elsewhere", pid=999, token="o" * 32)  # someone took it over
    deadline = time.monotonic() + 30
    while True:
        try:
            lease.check()
        except RunDirBusyError as e:
            assert "this trainer lost the run directory's lease to host elsewhere pid 999" in str(e)
            break
        assert time.monotonic() < deadline, "the takeover went unnoticed"
        time.sleep(0.02)
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == other.token  # not ours to remove


def test_a_run_dir_that_cannot_hold_a_lease_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError) as e:
        RunLease(tmp_path / "file" / "run").acquire()
    assert str(e.value).startswith(f"{tmp_path / 'file' / 'run' / LEASE_FILE}: cannot take the run directory's lease: ")
    assert "Not a directory" in str(e.value) and "\n" not in str(e.value)


def test_a_file_that_is_not_a_lease_is_refused(tmp_path):
    (tmp_path / LEASE_FILE).write_text("hello")
    with pytest.raises(RunDirBusyError, match="not a flux-jax run lease; if no trainer is using"):
        RunLease(tmp_path).acquire()


RACE = """
import os, sys, time
from flux_jax.train.lease import RunDirBusyError, RunLease
run, sync, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(sync, f"ready.{os.getpid()}"), "w").close()
while len([f for f in os.listdir(sync) if f.startswith("ready.")]) < n:  # all imported: start together
    time.sleep(0.001)
try:
    lease = RunLease(run).acquire()
except RunDirBusyError:
    print("refused", flush=True)
    sys.exit()
print("held", flush=True)
while not os.path.exists(os.path.join(sync, "release")):
    time.sleep(0.01)
lease.release()
"""


def test_of_trainers_starting_together_exactly_one_gets_the_lease(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sync = tmp_path / "sync"
    sync.mkdir()
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path / "run"), str(sync), str(n)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(n)
    ]
    try:
        deadline = time.monotonic() + 120
        while sum(p.poll() is not None for p in procs) < n - 1:  # the refused ones exit, the holder waits
            assert time.monotonic() < deadline, "the children did not finish"
            time.sleep(0.05)
        (sync / "release").touch()
        outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert outcomes == ["held", "refused", "refused", "refused"]
    assert not (tmp_path / "run").exists()  # released, and the directory it created was empty
