"""Never lose work: `flux-jax train` killed with SIGKILL mid-run, or stopped with SIGTERM or Ctrl-C, resumes to the
exact LoRA of an uninterrupted run (bit for bit on CPU), continuing at the right step and data position; and a second
trainer started on a run directory in use exits 2 naming the owner, before building anything, leaving the first
one's run exactly as if it had been alone."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.state import flat_params, split_trainable
from tests.helpers.compile_cache import child_env
from tests.helpers.leases import refused_while_paused

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 60
# fsdp=4 so the LoRA and optimizer state are sharded arrays: restore must put every shard back in place.
ARGS = [f"train.steps={STEPS}", "checkpoint.every=4", "mesh.data=2", "mesh.fsdp=4", "log.tensorboard=false"]
COMPARED = ("loss", "grad_norm", "lr", "data_epoch", "data_position")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The children share a compilation cache with each other and with test_train_loop.py's in-process runs (same
    devices, mesh and matmul precision give the same programs): only the first run of the session compiles."""
    return child_env(tmp_path_factory.getbasetemp() / "train-xla-cache")


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "flux_jax.cli", "train", "--config", str(TINY), f"output_dir={out}", *ARGS,
            "--no-progress"]  # fmt: skip


def run(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command(out), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def start_and_wait(out: Path, env: dict[str, str], step: int) -> subprocess.Popen:
    """Start a run and return once it logged ``step`` and completed a checkpoint (it is then mid-run: STEPS is far
    away, and a second async save waits for the first, so the run cannot get there before a checkpoint is done)."""
    proc = subprocess.Popen(command(out), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (any(r["step"] >= step for r in records(out)) and checkpoint_steps(out)):
        if proc.poll() is not None:
            raise AssertionError(f"the run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not reach step {step}")
        time.sleep(0.005)
    return proc


def lora(out: Path) -> dict[str, np.ndarray]:
    model, meta = read_lora_weights(out)
    assert meta["step"] == STEPS
    return {k: np.asarray(v) for k, v in flat_params(split_trainable(model)[1]).items()}


def checkpoint_steps(out: Path) -> list[int]:
    """Complete checkpoints (orbax renames a step's temporary directory to the bare number when it is done)."""
    if not (out / "checkpoints").exists():
        return []
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, env)
    return lora(out), records(out)


def assert_same_run(out: Path, reference) -> None:
    want_lora, want_records = reference
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # each step once, none missing
    for g, w in zip(got, want_records, strict=True):
        assert {k: g[k] for k in COMPARED} == {k: w[k] for k in COMPARED}, g["step"]
    got_lora = lora(out)
    for k, w in want_lora.items():
        np.testing.assert_array_equal(got_lora[k], w, err_msg=k)  # bit-exact


def test_kill9_mid_run_then_resume_reproduces_the_uninterrupted_lora(tmp_path, env, reference):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    out = tmp_path / "run"
    proc = start_and_wait(out, env, step=6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(r["step"] for r in records(out))
    assert killed_at < STEPS and STEPS not in checkpoint_steps(out)
    done = run(out, env)
    # The killed trainer's lease is still there: its process is gone, so the new one takes it over.
    assert "taking over the lease of a trainer that is no longer running" in done.stderr, done.stderr[-3000:]
    found = re.search(r"resuming from \S+ \(step (\d+)", done.stderr)
    assert found, done.stderr[-3000:]
    resumed_from = int(found.group(1))
    assert 4 <= resumed_from <= killed_at and resumed_from % 4 == 0
    assert f"finished at step {STEPS}" in done.stdout
    assert_same_run(out, reference)


def test_sigterm_saves_exits_zero_and_resume_continues_at_the_right_step_and_data(tmp_path, env, reference):
    out = tmp_path / "run"
    proc = start_and_wait(out, env, step=5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = int(re.search(r"stopped early \(preempted\) at step (\d+)", stdout).group(1))
    assert 5 <= stopped < STEPS
    assert max(checkpoint_steps(out)) == stopped  # saved where it stopped, not at the last multiple of 4
    last = records(out)[-1]
    assert last["step"] == stopped
    want = reference[1][stopped - 1]
    assert (last["data_epoch"], last["data_position"]) == (want["data_epoch"], want["data_position"])

    done = run(out, env)
    assert f"resuming from {out.absolute() / 'checkpoints' / str(stopped)} (step {stopped}" in done.stderr
    first_new = records(out)[stopped]
    assert first_new["step"] == stopped + 1
    assert first_new["data_position"] == reference[1][stopped]["data_position"]
    assert_same_run(out, reference)


def test_ctrl_c_saves_at_the_interrupted_step_and_resume_reproduces_the_uninterrupted_run(tmp_path, env, reference):
    out = tmp_path / "run"
    proc = start_and_wait(out, env, step=5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    found = re.search(r"stopped at step (\d+) on SIGINT; checkpoint saved to (\S+), exiting cleanly", stderr)
    assert found, stderr[-3000:]
    stopped = int(found.group(1))
    assert 5 <= stopped < STEPS
    where = out.absolute() / "checkpoints" / str(stopped)
    assert found.group(2) == str(where) and f"LoRA checkpoint: {where}" in stdout
    assert max(checkpoint_steps(out)) == stopped  # saved where it stopped, not at the last multiple of 4
    assert records(out)[-1]["step"] == stopped
    assert not (out / "lease.json").exists()  # a clean exit releases the run directory

    done = run(out, env)
    assert f"resuming from {where} (step {stopped}" in done.stderr
    assert_same_run(out, reference)


def test_a_second_trainer_on_a_run_dir_in_use_exits_2_naming_the_owner(tmp_path, env, reference):
    out = tmp_path / "run"
    first = start_and_wait(out, env, step=2)
    error, stderr, took = refused_while_paused(first, command(out), env, ROOT)
    assert re.fullmatch(
        rf"flux-jax train: error: {re.escape(str(out.absolute()))} is in use by another trainer: "
        rf"host {re.escape(socket.gethostname())} pid {first.pid} since \S+ \(last heartbeat \d+ s ago\); "
        r"wait for it to finish or stop it, or use another output_dir",
        error,
    ), error
    assert "building a random" not in stderr and "resuming" not in stderr  # refused before building
    assert took < 60, took  # the time to start Python and import the trainer, not to build or compile anything

    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert f"finished at step {STEPS}" in stdout
    assert_same_run(out, reference)  # the first run is exactly what it would have been alone
    assert not (out / "lease.json").exists()
