"""Latent caches in a bucket: ``data.cache_dir=gs://...`` (flux_jax.data.cache_remote).

`flux-jax cache` builds into a local copy and uploads chunks as they are written, then the dataset and cache.json
last; `flux-jax train` mirrors the bucket cache to a local copy (a fresh one here: another machine) and trains the
same LoRA as from a local cache, bit for bit; a rerun reuses the bucket cache without encoding; `flux-jax train`
on an uncached folder builds the bucket cache itself; an interrupted build continues from the bucket on another
machine; two hosts (jax.distributed, each its own local copy) build the one-host cache through the bucket.

No network here: the bucket is the in-memory GCS server of tests/helpers/fake_gcs.py, reached through etils.epath's
gcsfs backend (STORAGE_EMULATOR_HOST), in a child process with that environment. The tiny model of configs/tiny.yaml,
the generated tiny demo encoders, six small photos (one 64x64 bucket, mirrored: 12 records, two encode batches).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flux_jax.data.cache import resolve_cache_dir
from flux_jax.data.cache_remote import default_local_root
from flux_jax.errors import ConfigError
from flux_jax.run_config import load_config
from tests.helpers.compile_cache import child_env
from tests.helpers.gcs_server import fake_gcs
from tests.helpers.photo_workspace import photo_workspace

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BUCKET = "flux-jax-caches"
RECORDS = 12

# The child: every `flux-jax` command in one process (one JAX start, one compile of the tiny step), the bucket's
# objects (name -> generation, a creation timestamp in ns) after each stage, and the LoRAs as .npz files.
CHILD = r"""
import contextlib, io, json, logging, sys
from pathlib import Path
import gcsfs
import numpy as np
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from flux_jax import cli
from flux_jax.data import cache_remote
from flux_jax.data.cache import build_cache
from flux_jax.run_config import load_config
from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.state import flat_params, split_trainable

tiny, base, photos, encoders, bucket = sys.argv[1:]
base = Path(base)
messages = []

class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())

logging.getLogger().addHandler(Keep(logging.INFO))
fs = gcsfs.GCSFileSystem()

def objects(prefix):
    fs.invalidate_cache()
    found = fs.find(f"{bucket}/{prefix}", detail=True)
    return {k.split("/", 2)[2]: int(v["generation"]) for k, v in found.items()}

def args(cache, local, out="unused-run"):
    return ["data.synthetic=false", f"data.path={photos}", f"data.cache_dir={cache}",
            *([f"data.cache_local_dir={base / local}"] if local else []), "data.resolution=64", "data.flip=true",
            f"encoders.root={encoders}", "encoders.dtype=fp32", "encoders.t5_max_length=16", "encoders.batch_size=8",
            "train.steps=3", "checkpoint.every=100", "checkpoint.async_save=false", "log.tensorboard=false",
            f"output_dir={base / out}"]

def flux_jax(*argv):
    del messages[:]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    assert rc == 0, err.getvalue()[-3000:]
    logging.getLogger().setLevel(logging.INFO)
    return {"stdout": out.getvalue(), "log": list(messages)}

def cache(cache_dir, local):
    return flux_jax("cache", "--config", tiny, *args(cache_dir, local), "--no-progress")

def train(cache_dir, local, out):
    done = flux_jax("train", "--config", tiny, *args(cache_dir, local, out), "--no-progress")
    model, meta = read_lora_weights(base / out)
    assert meta["step"] == 3, meta
    np.savez(base / f"{out}.npz", **{k: np.asarray(v) for k, v in flat_params(split_trainable(model)[1]).items()})
    return done

gs = f"gs://{bucket}"
result = {}
cache(base / "local-cache", None)
result["local_train"] = train(base / "local-cache", None, "local-run")

def crash(rows):
    raise KeyboardInterrupt  # a host preempted after its first chunk

try:
    build_cache(load_config(tiny, args(f"{gs}/built", "machine-a")), progress=False, on_batch=crash)
except KeyboardInterrupt:
    pass
result["interrupted"] = objects("built")
result["cache"] = {**cache(f"{gs}/built", "machine-b"), "objects": objects("built")}

# A build that dies while uploading the finished cache (before its cache.json): not complete, and continued.
upload = cache_remote._upload

def dies_at_the_report(local, remote):
    if remote.name == "report.json":
        raise ConnectionError("the network went away")
    upload(local, remote)

cache_remote._upload = dies_at_the_report
try:
    build_cache(load_config(tiny, args(f"{gs}/dies", "machine-e")), progress=False)
except ConnectionError:
    pass
cache_remote._upload = upload
result["died_uploading"] = objects("dies")
result["after_dying"] = {**cache(f"{gs}/dies", "machine-f"), "objects": objects("dies")}
result["cache_again"] = {**cache(f"{gs}/built", "machine-b"), "objects": objects("built")}
result["train"] = {**train(f"{gs}/built", "machine-c", "gs-run"), "objects": objects("built")}
result["autocache_train"] = {**train(f"{gs}/auto", "machine-d", "auto-run"), "objects": objects("auto")}
result["train_again"] = {**train(f"{gs}/auto", "machine-d", "again-run"), "objects": objects("auto")}
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return photo_workspace(tmp_path_factory.mktemp("gcs-cache"))


@pytest.fixture(scope="module")
def runs(ws: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    with fake_gcs(BUCKET) as url:
        env = child_env(
            tmp_path_factory.getbasetemp() / "train-xla-cache",  # shared with the other tiny trainers' children
            EPATH_USE_TF="false",  # epath's gcsfs backend honours STORAGE_EMULATOR_HOST; TF's gfile would not
            STORAGE_EMULATOR_HOST=url,
            GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
            GOOGLE_CLOUD_PROJECT="test",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        argv = [str(TINY), str(ws["base"]), str(ws["photos"]), str(ws["encoders"]), BUCKET]
        done = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def lora(ws: dict[str, Path], run: str) -> dict[str, np.ndarray]:
    with np.load(ws["base"] / f"{run}.npz") as f:
        return {k: f[k] for k in f.files}


def assert_same_lora(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit


DATASET = "tfds/flux_jax_latent_cache/1.0.0"


@pytest.mark.slow  # `runs`: one child process, 6 cache builds and 4 tiny trainings
def test_a_bucket_cache_uploads_chunks_as_it_goes_and_cache_json_last(runs: dict) -> None:
    # A build killed after its first chunk leaves that whole chunk (and the work dir's fingerprint) in the bucket.
    assert sorted(runs["interrupted"]) == ["work/chunk-p000-000000.safetensors", "work/fingerprint.json"]
    # Another machine (an empty local copy) continues from the bucket: only the other 4 records are encoded.
    assert f"cached {RECORDS} records ({RECORDS - 8} encoded now" in runs["cache"]["stdout"]
    assert f"to gs://{BUCKET}/built;" in runs["cache"]["stdout"]
    objects = runs["cache"]["objects"]
    assert {"cache.json", "report.json", "empty_caption.safetensors", f"{DATASET}/dataset_info.json"} <= set(objects)
    assert not [name for name in objects if name.startswith("work/")]  # the chunks went into the dataset
    assert any(name.startswith(f"{DATASET}/flux_jax_latent_cache-train.array_record") for name in objects), objects
    # cache.json is created after every other object: the bucket cache is complete iff it exists.
    assert max(objects, key=objects.get) == "cache.json"


@pytest.mark.slow  # `runs`: one child process, 6 cache builds and 4 tiny trainings
def test_a_build_that_dies_uploading_leaves_an_incomplete_cache_that_the_next_run_finishes(runs: dict) -> None:
    died = runs["died_uploading"]
    assert "cache.json" not in died and f"{DATASET}/dataset_info.json" in died
    assert [name for name in died if name.startswith("work/chunk-")]  # kept until cache.json is up
    after = runs["after_dying"]
    assert f"cached {RECORDS} records (0 encoded now" in after["stdout"]  # from the bucket's chunks
    objects = after["objects"]
    assert max(objects, key=objects.get) == "cache.json" and not [n for n in objects if n.startswith("work/")]


@pytest.mark.slow  # `runs`: one child process, 6 cache builds and 4 tiny trainings
def test_a_second_cache_run_reuses_the_bucket_cache(runs: dict) -> None:
    again = runs["cache_again"]
    assert f"cache gs://{BUCKET}/built is up to date ({RECORDS} records)" in again["stdout"]
    assert again["objects"] == runs["cache"]["objects"]  # not one object rewritten
    assert any("the local copy" in m and "is complete and intact" in m for m in again["log"])


@pytest.mark.slow  # `runs`: one child process, 6 cache builds and 4 tiny trainings
def test_training_on_a_bucket_cache_is_training_on_a_local_cache(ws: dict[str, Path], runs: dict) -> None:
    train = runs["train"]
    assert not [m for m in train["log"] if "encoded now" in m or "no complete latent cache" in m]
    mirrored = [m for m in train["log"] if "mirroring" in m]
    assert len(mirrored) == 1 and "which needs that much local disk" in mirrored[0], mirrored
    assert train["objects"] == runs["cache"]["objects"]
    assert_same_lora(lora(ws, "gs-run"), lora(ws, "local-run"))


@pytest.mark.slow  # `runs`: one child process, 6 cache builds and 4 tiny trainings
def test_train_builds_a_missing_bucket_cache_then_a_second_run_reuses_it(ws: dict[str, Path], runs: dict) -> None:
    auto = runs["autocache_train"]
    assert any(m.startswith(f"no complete latent cache in gs://{BUCKET}/auto: caching") for m in auto["log"])
    assert any(f"cached {RECORDS} records ({RECORDS} encoded now" in m for m in auto["log"])
    objects = auto["objects"]
    assert max(objects, key=objects.get) == "cache.json" and not [n for n in objects if n.startswith("work/")]
    assert_same_lora(lora(ws, "auto-run"), lora(ws, "local-run"))

    again = runs["train_again"]
    assert not [m for m in again["log"] if "encoded now" in m or "no complete latent cache" in m or "mirroring" in m]
    assert again["objects"] == objects
    assert_same_lora(lora(ws, "again-run"), lora(ws, "local-run"))


def test_a_bucket_cache_dir_resolves_to_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = load_config(TINY, ["data.synthetic=false", "data.path=photos", "data.cache_dir=gs://b/caches/cats/"])
    assert resolve_cache_dir(cfg) == tmp_path / "xdg" / "flux_jax" / "caches" / "gs" / "b" / "caches" / "cats"
    assert default_local_root() == tmp_path / "xdg" / "flux_jax" / "caches"
    cfg = load_config(
        TINY,
        ["data.synthetic=false", "data.path=photos", "data.cache_dir=gs://b/c", f"data.cache_local_dir={tmp_path}/c"],
    )
    assert resolve_cache_dir(cfg) == tmp_path / "c"
    # A local cache_dir is what it always was.
    assert resolve_cache_dir(
        load_config(TINY, ["data.synthetic=false", "data.path=photos", "data.cache_dir=my/cache"])
    ) == Path("my/cache")
    with pytest.raises(ConfigError, match="cache_local_dir: is the local copy of a gs:// cache_dir"):
        load_config(
            TINY,
            ["data.synthetic=false", "data.path=photos", "data.cache_dir=my/cache", f"data.cache_local_dir={tmp_path}"],
        )


WORKER = r"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
process, port, cfg_path, base = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
from flux_jax.data.cache_remote import remote_cache
from flux_jax.data.inputs import prepare_train_data
from flux_jax.run_config import load_config
# Each host its own local copy, as on a pod: the other host's chunks reach process 0 only through the bucket.
cfg = load_config(cfg_path, [f"data.cache_local_dir={base}/host{process}"])
summary = prepare_train_data(cfg, progress=False)
print("BUILT", None if summary is None else (summary.records, summary.encoded))
remote_cache(cfg).mirror()  # what the trainer does on every host before it reads
"""


@pytest.mark.slow  # two fresh processes, each importing JAX and TensorFlow and compiling the encoders
def test_two_hosts_build_one_bucket_cache_equal_to_the_one_host_cache(ws: dict[str, Path], runs: dict) -> None:
    import socket

    from flux_jax.data.cache_reader import LatentCacheReader

    base = ws["base"]
    overrides = ["data.synthetic=false", f"data.path={ws['photos']}", f"data.cache_dir=gs://{BUCKET}/pod",
                 "data.resolution=64", "data.flip=true", f"encoders.root={ws['encoders']}", "encoders.dtype=fp32",
                 "encoders.t5_max_length=16", "encoders.batch_size=8", f"output_dir={base / 'pod-run'}"]  # fmt: skip
    cfg_path = base / "pod.yaml"
    cfg_path.write_text(load_config(TINY, overrides).to_yaml())
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    with fake_gcs(BUCKET) as url:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "EPATH_USE_TF": "false",
               "STORAGE_EMULATOR_HOST": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
               "GOOGLE_CLOUD_PROJECT": "test"}  # fmt: skip
        env.pop("XLA_FLAGS", None)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(p), port, str(cfg_path), str(base)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for p in range(2)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert f"BUILT ({RECORDS}, {RECORDS})" in out, out[-3000:]
    fields = ("latents", "t5", "clip", "height", "width", "bucket", "group", "repeats", "flipped", "caption", "source")
    one_host = LatentCacheReader(base / "local-cache")
    want = one_host.read_many(range(len(one_host)))
    for host in ("host0", "host1"):
        reader = LatentCacheReader(base / host)
        got = reader.read_many(range(len(reader)))
        assert len(got) == len(want) == RECORDS
        for x, y in zip(got, want, strict=True):
            for field in fields:
                np.testing.assert_array_equal(np.asarray(x[field]), np.asarray(y[field]), err_msg=f"{host} {field}")
