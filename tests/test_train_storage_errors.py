"""A full disk during training is one clear line (exit 2), not orbax's tracebacks, and the earlier checkpoints stay
intact.

The child trainer runs with epath's file opens for step 2's checkpoint failing with ENOSPC (what a full disk gives):
orbax's real asynchronous save machinery fails in its background threads, as it does on a full disk, and the error
surfaces at the next save; tensorstore's own wording of the same failure is checked on `storage_problem`."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flux_jax.train.checkpointing import read_lora_weights, storage_problem
from flux_jax.train.state import flat_params, split_trainable
from tests.helpers.compile_cache import child_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

FULL_DISK = """
import errno, os, runpy, sys
from etils.epath import gpath

_open = gpath._GPath.open


def full(self, mode="r", **kwargs):
    if "w" in mode and "/checkpoints/2.orbax-checkpoint-tmp" in os.fspath(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
    return _open(self, mode, **kwargs)


gpath._GPath.open = full
sys.argv = ["flux-jax", *sys.argv[1:]]
runpy.run_module("flux_jax.cli", run_name="__main__")
"""

# Not what this test is about: our own progress lines (INFO/WARNING records of flux_jax), XLA's C++ log lines, and
# orbax's note that a save waited for the previous one (a loaded machine gives it on any run that saves every step).
OURS = re.compile(
    r"^\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) flux_jax\.|^[IW]\d{4} "
    r"|^\d{4}-\d\d-\d\d [\d:,]+ WARNING absl: Waiting for previous save to complete took "
)


@pytest.mark.slow
def test_a_full_disk_is_one_clear_line_and_the_earlier_checkpoints_stay(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", FULL_DISK, "train", "--config", str(TINY), "--no-progress", f"output_dir={out}",
           "train.steps=4", "checkpoint.every=1", "log.tensorboard=false"]  # fmt: skip
    env = child_env(tmp_path / "xla-cache")
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-5000:]
    others = [line for line in done.stderr.splitlines() if line.strip() and not OURS.match(line)]
    assert others == [
        f"flux-jax train: error: {out / 'checkpoints'}: cannot write the checkpoint of step 2: no space left on "
        f"device; the earlier checkpoints are intact (latest: step 1)"
    ], done.stderr[-5000:]
    assert "Traceback" not in done.stderr and "cannot schedule new futures" not in done.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    model, meta = read_lora_weights(out)
    assert meta["step"] == 1
    assert all(np.isfinite(np.asarray(v)).all() for v in flat_params(split_trainable(model)[1]).values())
    assert not (out / "lease.json").exists()


def test_storage_problems_are_recognised_in_every_wording():
    assert storage_problem(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device"
    assert storage_problem(OSError(errno.EROFS, "x")) == "the file system is read-only"
    # tensorstore's wording (orbax's array writer), seen on a full tmpfs:
    ts = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/run/checkpoints/2.orbax-checkpoint-tmp/train/_sharding": '
        "Failed to write 18589 bytes to file 6: No space left on device [os_error_code='28']"
    )
    assert storage_problem(ts) == "no space left on device"
    try:  # behind another exception
        try:
            raise ts
        except ValueError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as wrapped:
        assert storage_problem(wrapped) == "no space left on device"
    assert storage_problem(ValueError("shapes do not match")) is None
