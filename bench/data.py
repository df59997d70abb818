"""Data throughput per host, on 1 process and on 2: cache-build images/s and training-read examples/s and MB/s.

    python bench/data.py                        # 96 synthetic 256 px photos, tiny demo encoders, CPU
    python bench/data.py --images 256 --size 512 --batch 8

Each configuration runs in fresh child processes on this machine (jax.distributed over gloo, 8 fake CPU devices
in all: 1 x 8 or 2 x 4, as the multi-process tests run), every process building the same cache dir from
scratch (`build_cache`: on 2 processes each scans, decodes and encodes its half), then reading ``--steps``
batches of ``--batch`` examples per host through the training iterator (`make_train_iterator`: grain over the
array_record cache, as the trainer reads it) after a warm-up batch. Printed per host: build images/s (records
this host encoded / encode wall time, and sources / whole build wall time, scan and compile included), read
examples/s and MB/s (the bytes of the batch arrays the trainer receives: latents, T5, CLIP, ids).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = """
import json, os, sys, time
process, processes, port, cfg_path, batch, steps = sys.argv[1:7]
process, processes, batch, steps = int(process), int(processes), int(batch), int(steps)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=processes, process_id=process)
import numpy as np
from flux_jax.data.cache import build_cache
from flux_jax.data.pipeline import make_train_iterator
from flux_jax.run_config import load_config

cfg = load_config(cfg_path)
start = time.perf_counter()
mine = []  # records this host encoded (summary.encoded counts every host's)
summary = build_cache(cfg, progress=False, on_batch=mine.append)
build = time.perf_counter() - start
it = make_train_iterator(cfg, process_index=process, process_count=processes, batch_size_per_host=batch)
next(it)  # warm-up: opens the shards, starts grain's threads
nbytes, start = 0, time.perf_counter()
for _ in range(steps):
    b = next(it)
    nbytes += sum(np.asarray(v).nbytes for v in b.values())
read = time.perf_counter() - start
print("RESULT " + json.dumps({"process": process, "encoded": sum(mine), "encode_s": summary.seconds,
      "build_s": build, "examples": batch * steps, "read_s": read, "bytes": nbytes}))
"""


def photos(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"a photo of a cat {i}")


def run(processes: int, cfg_path: Path, args: argparse.Namespace) -> list[dict]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    cmd = [str(processes), port, str(cfg_path), str(args.batch), str(args.steps)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(p), *cmd], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for p in range(processes)
    ]  # fmt: skip
    results = []
    for p in procs:
        out = p.communicate(timeout=3600)[0]
        if p.returncode != 0:
            raise SystemExit(out[-3000:])
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="examples per host and read step")
    parser.add_argument("--steps", type=int, default=20, help="timed read steps")
    args = parser.parse_args()

    from flux_jax.data.demo import build_demo_encoders
    from flux_jax.run_config import from_dict

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    photos(work / "photos", args.images, args.size)
    encoders = build_demo_encoders(work / "encoders")
    print(f"{args.images} photos of {args.size} px, tiny demo encoders, {os.cpu_count()} CPU cores")
    for processes in (1, 2):
        cfg = from_dict(
            {
                "model": {"preset": "tiny"},
                "data": {"path": str(work / "photos"), "cache_dir": str(work / f"cache{processes}"),
                         "resolution": args.size},
                "encoders": {"root": str(encoders), "dtype": "fp32", "t5_max_length": 64, "batch_size": 8},
            }
        )  # fmt: skip
        cfg_path = work / f"cache{processes}.yaml"
        cfg_path.write_text(cfg.to_yaml())
        start = time.perf_counter()
        for r in run(processes, cfg_path, args):
            print(
                f"{processes} process{'es' if processes > 1 else ''}, host {r['process']}: build "
                f"{r['encoded'] / r['encode_s']:.1f} images/s encoding "
                f"({r['encoded']} records in {r['encode_s']:.1f} s), "
                f"{args.images / processes / r['build_s']:.1f} own sources/s over the whole build "
                f"({r['build_s']:.1f} s); read {r['examples'] / r['read_s']:.0f} examples/s, "
                f"{r['bytes'] / r['read_s'] / 1e6:.1f} MB/s ({r['bytes'] / r['examples'] / 1e3:.1f} kB/example)"
            )
        print(f"  ({time.perf_counter() - start:.0f} s wall for the {processes}-process run)")


if __name__ == "__main__":
    main()
