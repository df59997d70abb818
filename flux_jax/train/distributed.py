"""Multi-process start-up: ``jax.distributed.initialize()`` called explicitly, never as a side effect.

A single-process run (one CPU, one GPU, one TPU VM host) must not call it. A multi-host run (a TPU pod slice, a
Slurm or multi-node GPU job) must call it on every process before any other JAX call. The choice is explicit:
``flux-jax train --distributed``, or ``FLUX_JAX_DISTRIBUTED=1`` in the environment (handy for `gcloud ... ssh
--worker=all` launch scripts). JAX then discovers the coordinator from the TPU metadata / Slurm / the standard
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` variables (JAX itself reads only the
first; the other two are read here and passed on, so a plain localhost / hand-launched job works too).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_FLAG = "FLUX_JAX_DISTRIBUTED"


def wants_distributed(flag: bool = False) -> bool:
    return flag or os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes")


def initialize(flag: bool = False) -> bool:
    """Initialise jax.distributed when asked for; returns whether it did."""
    if not wants_distributed(flag):
        return False
    num_processes = os.environ.get("JAX_NUM_PROCESSES", "").strip()
    process_id = os.environ.get("JAX_PROCESS_ID", "").strip()
    jax.distributed.initialize(
        num_processes=int(num_processes) if num_processes else None,
        process_id=int(process_id) if process_id else None,
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
