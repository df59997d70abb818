"""Training metrics: the FLOP count behind MFU, and the jsonl + TensorBoard writers.

The peaks MFU divides by are hardware facts: ``flux_jax.hardware.peak_flops``.

FLOPs follow ``shared/bench/torch_peer_lora_step.py`` so the JAX and PyTorch numbers are comparable: per sample
and block, forward matmuls ``2 * 12 H^2 L`` and attention ``4 L^2 H`` (L = image + text tokens); a LoRA step
with a frozen base counts ``2 x`` the matmuls (forward + input gradients, no weight gradients) and ``3 x``
attention (forward + two backward products). Embedders, modulation and the LoRA matmuls are not counted.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Mapping

import numpy as np

from flux_jax.model.config import FluxConfig
from flux_jax.storage import is_remote, run_path, upload, write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def useful_flops_per_sample(cfg: FluxConfig, img_tokens: int, txt_tokens: int) -> float:
    """The peer script's count of one LoRA training step for one sample (see the module docstring)."""
    tokens = img_tokens + txt_tokens
    blocks = cfg.depth + cfg.depth_single_blocks
    h = cfg.hidden_size
    matmul_fwd = 2 * 12 * h * h * tokens * blocks
    attention_fwd = 4 * tokens * tokens * h * blocks
    return 2 * matmul_fwd + 3 * attention_fwd


class MetricsWriter:
    """Appends one JSON record per logged step to ``metrics.jsonl`` (and one per validated step, with the validation
    keys) and mirrors scalars and validation images to TensorBoard.

    Only process 0 writes. On resume, records past the resumed step (written after the last checkpoint of a
    run that was killed) are dropped first, so the file holds each step once.

    A run directory in a bucket (gs://) cannot be appended to: the files are then written in a local staging
    directory and uploaded whole by :meth:`sync` (the trainer calls it at every checkpoint) and at close. A
    resumed remote run starts from the bucket's metrics.jsonl, so a new VM continues the same file.
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int = 0, enabled: bool = True,
        wandb=None, config: Mapping | None = None,
    ):  # fmt: skip
        self.enabled = enabled
        self._wandb = None
        self.run_dir = run_path(run_dir)
        self.remote = is_remote(self.run_dir)
        self._tb = None
        self._staging: tempfile.TemporaryDirectory | None = None
        if not enabled:
            return
        if self.remote:
            self._staging = tempfile.TemporaryDirectory(prefix="flux_jax_logs_")
            self.local_dir = pathlib.Path(self._staging.name)
        else:
            self.local_dir = pathlib.Path(os.fspath(self.run_dir))
        self.path = self.local_dir / METRICS_FILE
        self.local_dir.mkdir(parents=True, exist_ok=True)
        if self.remote and (self.run_dir / METRICS_FILE).exists():
            self.path.write_text((self.run_dir / METRICS_FILE).read_text())
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            # On resume, TensorBoard hides what the previous run logged past the resumed step (it is logged again).
            purge = resume_step + 1 if resume_step > 0 else None
            self._tb = SummaryWriter(str(self.local_dir / TENSORBOARD_DIR), purge_step=purge)
        if wandb is not None and wandb.project:  # log.wandb: the same scalars and images, one W&B run per run dir
            from flux_jax.train.wandb_tracker import WandbTracker

            self._wandb = WandbTracker(self.run_dir, wandb, config or {}, local_dir=self.local_dir)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, values: Mapping[str, float | int | None], *, group: str = "train") -> None:
        """One metrics.jsonl record for ``step``; its numbers also go to TensorBoard as ``<group>/<key>``."""
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"{group}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.scalars(step, {k: v for k, v in record.items() if k != "step"}, group)

    def add_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """TensorBoard (and W&B) images: ``{tag: uint8 [H, W, 3]}`` at ``step`` (nothing without either)."""
        if self._wandb is not None:  # only an enabled writer has one
            self._wandb.images(step, images)
        if not self.enabled or self._tb is None:
            return
        for tag, image in images.items():
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
        self._tb.flush()  # images are few and large: on disk now rather than at the next flush interval

    def sync(self) -> None:
        """Upload the staged files of a remote run directory (a no-op for a local one)."""
        if not (self.enabled and self.remote):
            return
        if self._tb is not None:
            self._tb.flush()
        write_text(self.run_dir / METRICS_FILE, self.path.read_text())
        if (self.local_dir / TENSORBOARD_DIR).is_dir():
            upload(self.local_dir / TENSORBOARD_DIR, self.run_dir / TENSORBOARD_DIR)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()  # flushes
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        try:
            self.sync()
        finally:
            if self._staging is not None:
                self._staging.cleanup()
