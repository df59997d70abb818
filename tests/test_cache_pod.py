"""`flux-jax cache` on a pod: each host scans, decodes and encodes only its share of the inputs, and the cache is
record for record (and report for report) the one a single host builds; a host killed mid-way leaves only whole
chunks, and a rerun finishes the same cache.

Two processes with 4 fake CPU devices each (jax.distributed over gloo, as in test_data_cache.py) share one cache
dir; the reference is built here, by one process over 8 devices. Each child counts the source examples it reads
(every decode goes through ``source[index]``) by wrapping `open_source` from outside the code under test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_jax.data import cache as cache_mod
from flux_jax.data.cache import build_cache
from flux_jax.data.images import GRAYSCALE, NOT_AN_IMAGE
from flux_jax.data.sources import open_source
from flux_jax.weights.safetensors_file import SafetensorsFile
from tests.test_data_cache import assert_same_records, config, records, write_photos

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # fresh processes, each importing JAX and TensorFlow and compiling the encoders

_WORKER = """
import json, os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
process, port, cfg_path, reads_path, hang = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
from flux_jax.data import cache
from flux_jax.run_config import load_config

reads = []
opened = cache.open_source

def counting_source(data):
    source = opened(data)
    get = source.__getitem__
    class Counted(type(source)):
        def __getitem__(self, index):
            reads.append(int(index))
            return get(index)
    source.__class__ = Counted
    return source

cache.open_source = counting_source

def on_batch(n):
    if hang == str(process):  # after its first chunk: wait to be killed
        time.sleep(600)

summary = cache.build_cache(load_config(cfg_path), progress=False, on_batch=on_batch)
with open(reads_path, "w") as f:
    json.dump(reads, f)
print("RECORDS", jax.process_count(), jax.device_count(), summary.records, summary.encoded, summary.up_to_date)
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """test_data_cache's six photos, plus a grayscale one (converted) and a broken file (skipped), so the report
    has entries of both kinds and hosts see bad inputs in their shares."""
    from flux_jax.data.demo import build_demo_encoders

    base = tmp_path_factory.mktemp("pod")
    photos = base / "photos"
    write_photos(photos)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (140, 150), dtype=np.uint8)).save(photos / "zgray.png")
    (photos / "zgray.txt").write_text("a gray cat")
    (photos / "broken.png").write_bytes(b"not a png at all")
    (photos / "broken.txt").write_text("nothing")
    return {"base": base, "photos": photos, "encoders": build_demo_encoders(base / "encoders")}


@pytest.fixture(scope="module")
def reference(workspace: dict[str, Path]) -> Path:
    cache_dir = workspace["base"] / "reference"
    summary = build_cache(config(workspace, cache_dir), progress=False)
    assert summary.records == summary.encoded == 28  # 7 usable photos x 2 crops x 2 flips
    assert summary.report.converted == {GRAYSCALE: ["zgray.png"]}
    assert [name for name, _ in summary.report.skipped[NOT_AN_IMAGE]] == ["broken.png"]
    return cache_dir


def launch(workspace: dict[str, Path], cache_dir: Path, hang: int | None = None) -> list[subprocess.Popen]:
    cfg_path = cache_dir.with_suffix(".yaml")
    cfg_path.write_text(config(workspace, cache_dir).to_yaml())
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    return [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(p), port, str(cfg_path), str(reads_file(cache_dir, p)), str(hang)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]


def reads_file(cache_dir: Path, process: int) -> Path:
    return cache_dir.parent / f"{cache_dir.name}-reads-p{process}.json"


def finish(procs: list[subprocess.Popen], expect: str) -> None:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert expect in out, out[-3000:]


def assert_same_cache(cache_dir: Path, reference: Path) -> None:
    assert_same_records(records(cache_dir), records(reference))
    assert json.loads((cache_dir / "report.json").read_text()) == json.loads((reference / "report.json").read_text())
    ours, theirs = (json.loads((d / "cache.json").read_text()) for d in (cache_dir, reference))
    for key in ("fingerprint", "items_digest", "num_records", "buckets", "shapes", "records", "settings"):
        assert ours[key] == theirs[key], key


def test_two_hosts_each_decode_only_their_share_and_build_the_one_host_cache(workspace, reference) -> None:
    cache_dir = workspace["base"] / "two_hosts"
    finish(launch(workspace, cache_dir), "RECORDS 2 8 28 28 False")
    assert_same_cache(cache_dir, reference)
    n = len(open_source(config(workspace, cache_dir).data))
    assert n == 8
    for p in range(2):
        reads = json.loads(reads_file(cache_dir, p).read_text())
        mine = cache_mod.share(n, p, 2)
        assert set(reads) == set(mine), (p, sorted(set(reads)), mine)  # every one of its share, and nothing else
        # Scanned once each, then read again for each batch that renders it (usable ones only).
        assert all(reads.count(i) >= 1 for i in mine)


def test_a_host_killed_mid_build_leaves_whole_chunks_and_a_rerun_finishes_the_same_cache(workspace, reference):
    cache_dir = workspace["base"] / "killed"
    work = cache_dir / "work"
    procs = launch(workspace, cache_dir, hang=1)
    deadline = time.monotonic() + 600
    while not list(work.glob("chunk-p001-*.safetensors")):
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        assert time.monotonic() < deadline, "process 1 wrote no chunk"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=60)
    try:
        procs[0].wait(timeout=5)  # its next collective fails without process 1, or waits there forever
    except subprocess.TimeoutExpired:
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=60)
    for p in procs:
        p.communicate()
    assert not (cache_dir / "cache.json").exists()
    chunks = sorted(work.glob("chunk-p*.safetensors"))
    assert chunks and {c.name[:10] for c in chunks} <= {"chunk-p000", "chunk-p001"}
    done = 0
    for chunk in chunks:  # whole: every chunk opens and holds a row per listed item
        with SafetensorsFile(chunk) as f:
            ids = json.loads(f.metadata["items"])
            assert {f.info(name).shape[0] for name in ("latents", "t5", "clip")} == {len(ids)}
            done += len(ids)
    assert 0 < done < 28
    finish(launch(workspace, cache_dir), f"RECORDS 2 8 28 {28 - done} False")
    assert_same_cache(cache_dir, reference)
