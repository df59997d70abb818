"""Stop-and-save on SIGTERM (TPU/GPU preemption, `kill`, a scheduler's time limit) and on Ctrl-C (SIGINT).

The handler only sets a flag; the training loop polls it between steps, writes a checkpoint of the state it has
and exits with status 0, so a preempted or interrupted job is simply resumed by running it again. A second Ctrl-C
raises ``KeyboardInterrupt`` at once (quit without the checkpoint). On several hosts every host must stop at the
same step: there ``jax.distributed`` (initialised explicitly, see ``flux_jax.train.distributed``) runs JAX's
preemption sync manager, which watches SIGTERM, and ``reached_preemption_sync_point`` makes all hosts agree; there
Ctrl-C keeps its default meaning (``KeyboardInterrupt``), since one host cannot stop the others alone.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import jax

log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Context manager: installs SIGTERM and SIGINT handlers for its duration and answers "stop now?" per step."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str | None:
        """ "SIGTERM" / "SIGINT" once one arrived."""
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: the user wants out now
                raise KeyboardInterrupt
            return
        self.received = signum
        log.warning(
            "received %s: saving a checkpoint after the current step, then exiting%s",
            signal.Signals(signum).name,
            " (Ctrl-C again to quit without it)" if signum == signal.SIGINT else "",
        )

    def __enter__(self) -> PreemptionWatcher:
        # Several hosts must agree on the stop step, so there JAX's preemption sync manager (which watches SIGTERM
        # itself) decides; a host-local flag could stop one host and leave the others waiting in a collective.
        # Signal handlers can only be installed from the main thread (tests may run the trainer elsewhere).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """True once a stop signal arrived (single host), or once the hosts agreed to stop at ``step`` (multi-host)."""
        if self.received is not None:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption sync manager is not running (no jax.distributed)
                return False
        return False
