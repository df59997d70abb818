"""`flux-jax train` caches when it must: pointed at images without a complete latent cache it runs the cache step
itself (the same build, report and resumability as `flux-jax cache`), then trains; a second run reuses that cache
without encoding anything; training from it is bit for bit training from a cache built ahead with `flux-jax cache`;
an interrupted build is continued, not restarted; a complete or partial cache of other settings is refused and
kept, never replaced.

The tiny model of configs/tiny.yaml on the 8 fake CPU devices, the generated tiny demo encoders, six small photos
(one 64x64 bucket, mirrored: 12 records, two encode batches of 8).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from flux_jax import cli
from flux_jax.data.cache import build_cache
from flux_jax.data.cache_reader import LatentCacheReader
from flux_jax.run_config import load_config
from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.state import flat_params, split_trainable
from tests.helpers.photo_workspace import photo_workspace, workspace_overrides

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS = 3
RECORDS = 12  # 6 photos, each also mirrored
FIELDS = ("latents", "t5", "clip", "height", "width", "bucket", "group", "repeats", "flipped", "caption", "source")
CACHING = "no complete latent cache in"


pytestmark = pytest.mark.usefixtures("train_compile_cache")  # conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    return photo_workspace(tmp_path_factory.mktemp("autocache"))


def overrides(ws: dict[str, Path], cache: str, out: str | None = None, *extra: str) -> list[str]:
    return workspace_overrides(ws, cache, out or "unused-run", *extra, steps=STEPS)


def flux_jax(*argv: str) -> tuple[int, str, str]:
    """`flux-jax ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def train(ws: dict[str, Path], cache: str, out: str, *extra: str) -> tuple[int, str, str]:
    return flux_jax("train", "--config", str(TINY), *overrides(ws, cache, out, *extra), "--no-progress")


def lora(run: Path) -> dict[str, np.ndarray]:
    model, meta = read_lora_weights(run)
    assert meta["step"] == STEPS
    return {k: np.asarray(v) for k, v in flat_params(split_trainable(model)[1]).items()}


def assert_same_lora(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit


def records(cache_dir: Path) -> list[dict]:
    reader = LatentCacheReader(cache_dir)
    return reader.read_many(range(len(reader)))


def assert_same_records(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert len(ra) == len(rb) == RECORDS
    for x, y in zip(ra, rb, strict=True):
        for field in FIELDS:
            np.testing.assert_array_equal(np.asarray(x[field]), np.asarray(y[field]), err_msg=field)


def stamps(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of a cache: (size, mtime in ns)."""
    return {
        p.relative_to(cache_dir).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(cache_dir.rglob("*"))
        if p.is_file()
    }


def trained_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def normalized(report: str, cache_dir: Path) -> str:
    """A cache report with its timing and cache directory taken out (what differs between two builds)."""
    return re.sub(r"in \d+\.\d s,", "in T s,", report).replace(str(cache_dir), "CACHE")


@pytest.fixture(scope="module")
def ahead_cache(ws: dict[str, Path]) -> dict:
    """The cache built ahead with `flux-jax cache`, and the report it printed."""
    rc, printed, err = flux_jax("cache", "--config", str(TINY), *overrides(ws, "ahead-cache"), "--no-progress")
    assert rc == 0, err
    return {"cache": ws["base"] / "ahead-cache", "printed": printed.strip()}


@pytest.fixture(scope="module")
def ahead(ws: dict[str, Path], ahead_cache: dict) -> dict:
    """The two-step way: `flux-jax cache`, then `flux-jax train` on the finished cache (the session's first trainer
    here compiles the tiny step: most of this module's time)."""
    rc, out, err = train(ws, "ahead-cache", "ahead-run")
    assert rc == 0, err
    assert f"finished at step {STEPS}" in out
    return {**ahead_cache, "lora": lora(ws["base"] / "ahead-run")}


@pytest.mark.slow  # four tiny training runs in the two tests
def test_train_caches_an_uncached_folder_then_trains_and_a_second_run_reuses_the_cache(
    ws: dict[str, Path], ahead: dict, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = ws["base"] / "auto-cache"
    assert not cache_dir.exists()
    with caplog.at_level(logging.INFO):
        rc, out, err = train(ws, "auto-cache", "auto-run")
    assert rc == 0, err
    assert f"finished at step {STEPS}" in out
    # The cache step ran, announced first, and left a complete cache with its report, as `flux-jax cache` does.
    messages = [r.getMessage() for r in caplog.records]
    first = next(i for i, m in enumerate(messages) if m.startswith(CACHING))
    assert f"{CACHING} {cache_dir}: caching {ws['photos']} first" in messages[first]
    training = next(i for i, m in enumerate(messages) if m.startswith("training steps 1..3"))
    assert first < training
    report = next(m for m in messages if f"cached {RECORDS} records ({RECORDS} encoded now" in m)
    assert normalized(report, cache_dir) == normalized(ahead["printed"], ahead["cache"])  # the same report
    assert sorted(p.name for p in cache_dir.iterdir()) == ["cache.json", "empty_caption.safetensors", "report.json",
                                                           "tfds"]  # fmt: skip
    assert json.loads((cache_dir / "report.json").read_text()) == {"total": 6, "used": 6, "skipped": {},
                                                                   "converted": {}}  # fmt: skip
    assert (cache_dir / "report.json").read_text() == (ahead["cache"] / "report.json").read_text()
    assert_same_records(cache_dir, ahead["cache"])
    run = ws["base"] / "auto-run"
    assert trained_steps(run) == list(range(1, STEPS + 1))
    assert_same_lora(lora(run), ahead["lora"])  # the same as training from a cache built ahead

    # A second run (a new output_dir) finds the cache complete: nothing is encoded, not one cache file is touched.
    before = stamps(cache_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc, out, err = train(ws, "auto-cache", "reuse-run")
    assert rc == 0, err
    assert not [r for r in caplog.records if CACHING in r.getMessage() or "encoded now" in r.getMessage()]
    assert stamps(cache_dir) == before
    assert trained_steps(ws["base"] / "reuse-run") == list(range(1, STEPS + 1))
    assert_same_lora(lora(ws["base"] / "reuse-run"), ahead["lora"])


@pytest.mark.slow
def test_train_continues_an_interrupted_cache_build(
    ws: dict[str, Path], ahead: dict, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = ws["base"] / "interrupted-cache"
    cfg = load_config(TINY, overrides(ws, "interrupted-cache"))

    def crash_after_first_chunk(rows: int) -> None:
        raise KeyboardInterrupt  # what a preemption or Ctrl-C looks like to the encode loop

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, progress=False, on_batch=crash_after_first_chunk)
    work = cache_dir / "work"
    (chunk,) = sorted(work.glob("chunk-*.safetensors"))  # one batch of 8 of the 12 records
    assert not (cache_dir / "cache.json").exists()
    partial = stamps(work)

    # Other settings on that partial cache: refused in one line, naming the fix, and the chunk is kept.
    rc, _, err = train(ws, "interrupted-cache", "other-run", "data.flip=false")
    assert rc == 2
    assert err.strip() == (
        f"flux-jax train: error: {work}: holds a partial cache made with other settings or encoders; `flux-jax cache "
        "--force` discards it, or set data.cache_dir to another directory"
    )
    assert stamps(work) == partial and not (ws["base"] / "other-run" / "checkpoints").exists()

    with caplog.at_level(logging.INFO):
        rc, _, err = train(ws, "interrupted-cache", "interrupted-run")
    assert rc == 0, err
    # Continued: only the 4 records the interrupted build did not write were encoded now.
    assert any(f"cached {RECORDS} records ({RECORDS - 8} encoded now" in r.getMessage() for r in caplog.records)
    assert not work.exists() and not chunk.exists()  # the chunks went into the dataset
    assert_same_records(cache_dir, ahead["cache"])
    assert_same_lora(lora(ws["base"] / "interrupted-run"), ahead["lora"])


_WORKER = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
process, port, cfg_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
from flux_jax.data.inputs import prepare_train_data
from flux_jax.run_config import load_config
for attempt in (1, 2):  # the trainer's cache step on an uncached folder, then on the cache it built
    summary = prepare_train_data(load_config(cfg_path), progress=False)
    print("ATTEMPT", attempt, jax.process_count(), None if summary is None else (summary.records, summary.encoded))
"""


@pytest.mark.slow  # two fresh processes, each importing JAX and TensorFlow and compiling the encoders
def test_two_processes_cache_for_training_as_flux_jax_cache_does(ws: dict[str, Path], ahead_cache: dict) -> None:
    """The trainer's cache step on 2 processes x 4 CPU devices (jax.distributed over gloo) sharing one cache dir:
    both take part in the one build (each its rows of every batch, process 0 finalizes), the records are the
    single-process `flux-jax cache` records bit for bit, and on the complete cache both skip the build together."""
    import os
    import socket
    import subprocess
    import sys

    cfg_path = ws["base"] / "two-processes.yaml"
    cfg_path.write_text(load_config(TINY, overrides(ws, "two-processes-cache")).to_yaml())
    env = {**os.environ, "PYTHONPATH": str(TINY.parents[1]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(p), port, str(cfg_path)],
            env=env,
            cwd=TINY.parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert f"ATTEMPT 1 2 ({RECORDS}, {RECORDS})" in out and "ATTEMPT 2 2 None" in out, out[-3000:]
    assert_same_records(ws["base"] / "two-processes-cache", ahead_cache["cache"])


def test_a_complete_cache_of_other_settings_is_refused_and_kept(ws: dict[str, Path], ahead_cache: dict) -> None:
    """No silent reuse of a stale cache, and no silent deletion of an expensive one: the trainer refuses it as
    it did before it could cache, naming `flux-jax cache --force` and data.cache_dir; the cache is untouched."""
    ahead = ahead_cache
    before = stamps(ahead["cache"])
    rc, _, err = train(ws, "ahead-cache", "stale-run", "data.flip=false")
    assert rc == 2
    line = err.strip()
    assert line.startswith(f"flux-jax train: error: {ahead['cache']}: this cache was built from other data or "
                           "settings (data.flip is False, the cache has True)"), line  # fmt: skip
    assert "run `flux-jax cache` with this config (--force replaces the cache)" in line and "\n" not in line
    assert stamps(ahead["cache"]) == before
    assert not (ws["base"] / "stale-run" / "checkpoints").exists()


def test_no_encoders_for_a_real_base_is_refused_before_caching(ws: dict[str, Path]) -> None:
    """With no encoders configured the cache step would generate the tiny random demo encoders, which fit only a
    model.preset base: for a checkpoint base that is a config error, before anything is encoded or built."""
    rc, _, err = train(ws, "no-encoders-cache", "no-encoders-run", "encoders.root=\"\"", "model.preset=null",
                       f"model.base={ws['base'] / 'some-checkpoint'}")  # fmt: skip
    assert rc == 2
    assert err.strip() == (
        f"flux-jax train: error: {ws['base'] / 'no-encoders-cache'}: no complete cache to train on, and no encoders "
        "are configured to build it with; set encoders.root to the base's FLUX.1 download (e.g. "
        "black-forest-labs/FLUX.1-dev)"
    )
    assert not (ws["base"] / "no-encoders-cache").exists()
