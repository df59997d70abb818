"""A run directory in a bucket: `output_dir=gs://...` trains, checkpoints, resumes and exports through GCS, and has
one owner at a time (its lease object is created only if absent, through GCS's generation preconditions).

No network here, so the bucket is an in-memory GCS JSON API on localhost (tests/helpers/fake_gcs.py); orbax's
tensorstore (TENSORSTORE_GCS_HTTP_URL) and epath's gcsfs backend (STORAGE_EMULATOR_HOST) both talk to it. The code
under test is the real gs:// path of orbax, epath and flux_jax: only the server is local.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers.compile_cache import child_env
from tests.helpers.gcs_server import fake_gcs
from tests.helpers.leases import refused_while_paused

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BUCKET = "flux-jax-test"
ARGS = ["checkpoint.every=2", "mesh.data=2", "mesh.fsdp=4", "--no-progress"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gcs() -> str:
    """The emulator's URL, with an empty bucket BUCKET."""
    with fake_gcs(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory) -> dict[str, str]:
    return child_env(
        tmp_path_factory.getbasetemp() / "train-xla-cache",  # shared with test_train_resume.py's children
        # epath: gcsfs (it honours STORAGE_EMULATOR_HOST) instead of TensorFlow's gfile.
        EPATH_USE_TF="false",
        STORAGE_EMULATOR_HOST=gcs,
        TENSORSTORE_GCS_HTTP_URL=gcs,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
        GOOGLE_CLOUD_PROJECT="test",
    )


def train_command(out: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "flux_jax.cli", "train", "--config", str(TINY), f"output_dir={out}",
            f"train.steps={steps}", *ARGS]  # fmt: skip


def train(out: str, steps: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(train_command(out, steps), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# Run in a child with the emulator's environment: reads a run's LoRA, metrics and file list as JSON.
READ_RUN = """
import json, sys
import numpy as np
from etils import epath
from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.state import flat_params, split_trainable

run = sys.argv[1]
model, meta = read_lora_weights(run)
lora = {k: np.asarray(v).tolist() for k, v in flat_params(split_trainable(model)[1]).items()}
root = epath.Path(run)
files = sorted(str(p.relative_to(root)) for d in (root, root / "tensorboard") if d.exists() for p in d.iterdir())
metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
print(json.dumps({"step": meta["step"], "lora": lora, "files": files, "metrics": metrics}))
"""


def read_run(run: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", READ_RUN, run], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, env) -> tuple[Path, dict]:
    """6 steps in a local run directory: what every gs:// run here must reproduce."""
    out = tmp_path_factory.mktemp("local") / "run"
    train(str(out), 6, env)
    return out, read_run(str(out), env)


def test_a_gs_run_dir_trains_resumes_and_exports_like_a_local_one(tmp_path, env, local_run):
    local_dir, local = local_run

    run = f"gs://{BUCKET}/runs/tiny"
    train(run, 4, env)
    first = read_run(run, env)
    assert first["step"] == 4
    assert {"config.yaml", "metrics.jsonl", "checkpoints"} <= set(first["files"])
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in first["files"])
    assert [r["step"] for r in first["metrics"]] == [1, 2, 3, 4]

    # A new process (a new VM after preemption) finds the bucket's checkpoint and continues the same files.
    done = train(run, 6, env)
    assert re.search(rf"resuming from gs://{BUCKET}/runs/tiny/checkpoints/4 \(step 4", done.stderr), done.stderr
    got = read_run(run, env)
    assert got["step"] == 6
    assert [r["step"] for r in got["metrics"]] == list(range(1, 7))
    for g, w in zip(got["metrics"], local["metrics"], strict=True):
        assert (g["loss"], g["data_position"]) == (w["loss"], w["data_position"]), g["step"]
    assert got["lora"].keys() == local["lora"].keys()
    for k, w in local["lora"].items():
        np.testing.assert_array_equal(np.asarray(got["lora"][k]), np.asarray(w), err_msg=k)  # bit-exact

    exported = {}
    for name, src in (("gs", run), ("local", str(local_dir))):
        exported[name] = tmp_path / f"lora-{name}.safetensors"
        cmd = [sys.executable, "-m", "flux_jax.cli", "export", src, str(exported[name]), "--format", "kohya",
               "--dtype", "fp32"]  # fmt: skip
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    want, have = load_file(exported["local"]), load_file(exported["gs"])
    assert want.keys() == have.keys()
    for k in want:
        np.testing.assert_array_equal(have[k], want[k], err_msg=k)


def test_a_second_trainer_on_a_gs_run_dir_in_use_exits_2_naming_the_owner(env, local_run):
    run = f"gs://{BUCKET}/runs/two-trainers"
    first = subprocess.Popen(train_command(run, 6), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    log = []
    for line in first.stderr:  # it holds the lease (in the bucket) before it builds the model
        log.append(line)
        if "building a random" in line:
            break
    else:
        raise AssertionError(f"the first trainer exited ({first.wait()}): {''.join(log)[-3000:]}")
    assert any("holds the run directory's lease" in line for line in log), "".join(log)
    # Paused (alive, and not talking to the server while it builds the model): it cannot finish and release the
    # lease while the second trainer starts.
    error, stderr, took = refused_while_paused(first, train_command(run, 6), env, ROOT)
    assert error.startswith(
        f"flux-jax train: error: {run} is in use by another trainer: host {socket.gethostname()} pid {first.pid} since "
    ), error
    assert "building a random" not in stderr  # refused before anything was built
    assert took < 60, took

    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    got = read_run(run, env)
    assert got["step"] == 6 and "lease.json" not in got["files"]  # released at the end
    _, local = local_run
    assert [(r["step"], r["loss"]) for r in got["metrics"]] == [(r["step"], r["loss"]) for r in local["metrics"]]
    for k, w in local["lora"].items():
        np.testing.assert_array_equal(np.asarray(got["lora"][k]), np.asarray(w), err_msg=k)  # as if it were alone
