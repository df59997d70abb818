"""Start and stop the in-memory GCS server of `fake_gcs.py` for a test (no tests here)."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

SERVER = pathlib.Path(__file__).with_name("fake_gcs.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_gcs(bucket: str) -> Iterator[str]:
    """The server's URL (for ``STORAGE_EMULATOR_HOST``) with an empty ``bucket``, once it accepts connections."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(SERVER), str(port), bucket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the fake GCS server did not start") from None
                time.sleep(0.1)
        yield f"http://localhost:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
