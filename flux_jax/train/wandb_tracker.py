"""Weights & Biases as an optional second tracker beside TensorBoard (``log.wandb``; ``pip install 'flux-jax[wandb]'``).

The same scalars as TensorBoard (``<group>/<key>``), the validation images and the run config go to one W&B run.
Its id is kept in the run directory (``wandb_id``), so a run resumed after preemption, on this VM or a new one,
continues the same W&B run (``resume="allow"``). Steps a killed run had logged past its last checkpoint are trained
again after resume; W&B refuses steps below its current one, so those are not sent twice (``run.step`` at start).
Only process 0 creates a tracker (the trainer's MetricsWriter is disabled elsewhere).

W&B's own files go to ``<run>/wandb/`` for a local run directory and to ``$WANDB_DIR`` (default: a directory beside
the staged metrics, uploaded with nothing) for a gs:// one: an offline run in a bucket should set ``WANDB_DIR``.
A failure to start W&B (no login, no network in online mode) is one clear error at startup; a failure to log later
is logged once as a warning and the run goes on: a tracker outage must not cost the training.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from flux_jax.errors import ConfigError
from flux_jax.storage import is_remote, run_path, write_text

log = logging.getLogger(__name__)

ID_FILE = "wandb_id"


class WandbTracker:
    def __init__(self, run_dir, settings, config: Mapping[str, Any], *, local_dir: os.PathLike | None = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "log.wandb: the wandb package is not installed (pip install 'flux-jax[wandb]')", key="log.wandb"
            ) from None
        self._wandb = wandb
        root = run_path(run_dir)
        id_file = root / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        if not id_file.exists():
            write_text(id_file, run_id + "\n")
        files = os.environ.get("WANDB_DIR") if is_remote(root) else os.fspath(root)
        if files is None and local_dir is not None:
            files = os.fspath(local_dir)
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity or None, name=settings.name or None,
                mode=settings.mode, id=run_id, resume="allow", dir=files, config=dict(config),
                settings=wandb.Settings(silent=True, console="off"),
            )  # fmt: skip
        except Exception as e:  # wandb raises its own error types for login / network failures
            raise ConfigError(f"log.wandb: W&B could not start ({type(e).__name__}: {e})", key="log.wandb") from None
        self.id = run_id
        self._first = int(self.run.step or 0)  # a resumed online run continues after its last step
        self._warned = False

    def _log(self, step: int, values: Mapping[str, Any]) -> None:
        if step < self._first or not values:
            return
        try:
            self.run.log(dict(values), step=step)
        except Exception as e:
            if not self._warned:
                log.warning("W&B logging failed; training goes on without it (%s: %s)", type(e).__name__, e)
                self._warned = True

    def scalars(self, step: int, values: Mapping[str, Any], group: str) -> None:
        self._log(step, {f"{group}/{k}": v for k, v in values.items() if isinstance(v, int | float)})

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        self._log(step, {tag: self._wandb.Image(np.asarray(image)) for tag, image in images.items()})

    def close(self) -> None:
        try:
            self.run.finish()
        except Exception as e:
            log.warning("W&B did not finish cleanly (%s: %s)", type(e).__name__, e)
