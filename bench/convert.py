"""Benchmark: a full-size random Flux-dev fp8 BFL checkpoint (~12 GB) -> a bf16 Flax checkpoint (~24 GB).

    .venv/bin/python bench/convert.py [--workdir /tmp] [--keep]

Steps: (1) write a random Flux-dev checkpoint in the BFL layout, every tensor F8_E4M3 like Kijai's plain-cast fp8
files (random bytes, never the NaN patterns 0x7F / 0xFF); (2) the plain baseline: read that file once and write a
file of the conversion's output size once; (3) `flux-jax convert IN OUT --dtype bf16` in a child process, whose own
peak RSS is taken from `wait4`. Prints seconds, GB/s (input + output bytes per second) and peak RSS side by side.

Page cache: the input was just written, so before each timed read it is flushed and evicted with
`posix_fadvise(POSIX_FADV_DONTNEED)` (reads come from the disk, not from RAM); timed writes include the fsync that
makes them durable (the converter fsyncs every chunk file itself). Outputs are deleted at the end unless --keep.
Targets (issue #3): conversion peak RSS < 4 GiB, conversion time within 2x of read + write.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flux_jax.model.config import PRESETS  # noqa: E402
from flux_jax.weights import flux_keys  # noqa: E402
from flux_jax.weights.safetensors_file import write_safetensors  # noqa: E402

GB = 1e9
BLOCK = 64 * 2**20


def random_fp8_pool(nbytes: int, seed: int = 0) -> np.ndarray:
    """Random valid float8_e4m3fn bytes: 0x00-0x7E and 0x80-0xFE (0x7F / 0xFF are the NaNs)."""
    raw = np.random.default_rng(seed).integers(0, 254, size=nbytes, dtype=np.uint8)
    raw[raw >= 0x7F] += 1
    return raw


def evict(path: pathlib.Path) -> None:
    """Flush and drop a file's pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_input(path: pathlib.Path) -> int:
    """The BFL fp8 checkpoint; each tensor is a view into one shared random pool (cheap, streaming)."""
    import ml_dtypes

    shapes = flux_keys.bfl_shapes(PRESETS["dev"])
    largest = max(math.prod(s) for s in shapes.values())
    pool = random_fp8_pool(largest + 2**20)
    fp8 = np.dtype(ml_dtypes.float8_e4m3fn)
    offsets = {name: (i * 4099) % 2**20 for i, name in enumerate(shapes)}  # different bytes per tensor

    def produce(name: str) -> np.ndarray:
        n = math.prod(shapes[name])
        return pool[offsets[name] : offsets[name] + n].view(fp8).reshape(shapes[name])

    write_safetensors(path, [(n, "F8_E4M3", s) for n, s in shapes.items()], produce)
    return path.stat().st_size


@dataclasses.dataclass
class Step:
    """Wall seconds, CPU seconds (user + system, all threads) and the 1-minute load average when it ended.

    The CPU seconds tell how much of the wall time the machine's other load can explain: on a shared 2-core
    machine a CPU-heavy step slows down with the load, an I/O-bound one much less.
    """

    seconds: float
    cpu: float
    load: float
    rss: int | None = None


@contextlib.contextmanager
def measure(out: list[Step]):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    yield
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    out.append(Step(time.perf_counter() - t0, cpu, os.getloadavg()[0]))


def timed_read(path: pathlib.Path) -> Step:
    evict(path)
    buf = bytearray(BLOCK)
    out: list[Step] = []
    with measure(out), open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    evict(path)
    return out[0]


def timed_write(path: pathlib.Path, nbytes: int) -> Step:
    block = random_fp8_pool(BLOCK, seed=1).tobytes()
    out: list[Step] = []
    with measure(out), open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, BLOCK)])
        os.fsync(f.fileno())
    path.unlink()
    return out[0]


def run_conversion(src: pathlib.Path, dst: pathlib.Path) -> tuple[Step, int]:
    """(measurements incl. the child's own peak RSS, exit code) of `flux-jax convert SRC DST --dtype bf16`."""
    evict(src)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "flux_jax.cli", "convert", str(src), str(dst), "--dtype", "bf16", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    seconds = time.perf_counter() - start
    step = Step(seconds, usage.ru_utime + usage.ru_stime, os.getloadavg()[0], usage.ru_maxrss * 1024)  # KiB on Linux
    return step, os.waitstatus_to_exitcode(status)


def dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def spot_check(src: pathlib.Path, dst: pathlib.Path) -> None:
    """A few converted layers equal the input, cast and transposed (a benchmark of a wrong conversion is moot)."""
    import ml_dtypes
    import tensorstore as ts

    from flux_jax.weights.safetensors_file import SafetensorsFile

    with SafetensorsFile(src) as f:
        for bfl, leaf, layer in [
            ("single_blocks.37.linear1.weight", "single_blocks.linear1.kernel", 37),
            ("double_blocks.3.img_mlp.2.weight", "double_blocks.img_mlp.2.kernel", 3),
            ("final_layer.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.1.bias", None),
        ]:
            want = f.array(bfl).astype(ml_dtypes.bfloat16)
            want = want.T if want.ndim == 2 else want
            store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(dst / leaf)}}).result()
            got = (store[layer] if layer is not None else store).read().result()
            if not np.array_equal(got.view(np.uint16), np.ascontiguousarray(want).view(np.uint16)):
                raise SystemExit(f"spot check failed: {leaf}[{layer}] differs from {bfl}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp"))
    parser.add_argument("--keep", action="store_true", help="keep the input and output checkpoints")
    args = parser.parse_args()
    work = args.workdir / f"flux_jax_convert_bench_{os.getpid()}"
    work.mkdir(parents=True)
    src, dst = work / "flux1-dev-random-fp8.safetensors", work / "flux1-dev-random-bf16-flax"
    try:
        t = time.perf_counter()
        in_bytes = write_input(src)
        print(f"wrote random fp8 input: {in_bytes / GB:.2f} GB in {time.perf_counter() - t:.1f} s", flush=True)

        params = sum(math.prod(s) for s in flux_keys.bfl_shapes(PRESETS["dev"]).values())
        out_bytes = 2 * params  # bf16
        read = timed_read(src)
        write = timed_write(work / "baseline.bin", out_bytes)
        base = Step(read.seconds + write.seconds, read.cpu + write.cpu, write.load)
        print(f"baseline: read {read.seconds:.1f} s, write {write.seconds:.1f} s", flush=True)

        conv, code = run_conversion(src, dst)
        if code != 0:
            raise SystemExit(f"conversion failed with exit code {code}")
        written = dir_bytes(dst)
        spot_check(src, dst)

        rows = [
            ("plain read (input)", read, in_bytes),
            ("plain write (output size)", write, out_bytes),
            ("plain read + write", base, in_bytes + out_bytes),
            ("flux-jax convert fp8 BFL -> bf16 Flax", conv, in_bytes + written),
        ]
        print(f"\nFlux-dev {params / 1e9:.2f}B params; input {in_bytes / GB:.2f} GB fp8, output {written / GB:.2f} GB")
        print(f"{'step':<40} {'seconds':>8} {'GB/s':>6} {'CPU s':>7} {'load':>5} {'peak RSS':>10}")
        for name, step, n in rows:
            rss_text = f"{step.rss / 2**30:.2f} GiB" if step.rss is not None else "-"
            print(
                f"{name:<40} {step.seconds:8.1f} {n / GB / step.seconds:6.2f} {step.cpu:7.1f} {step.load:5.1f} "
                f"{rss_text:>10}"
            )
        ratio = conv.seconds / base.seconds
        ok = conv.rss < 4 * 2**30 and ratio <= 2.0
        verdict = "met" if ok else "MISSED"
        print(f"\nconversion / (read + write) = {ratio:.2f}x (target <= 2x), peak RSS < 4 GiB: targets {verdict}")
        print(f"(load = 1-minute load average of this {os.cpu_count()}-CPU machine at the end of each step)")
        print(
            json.dumps(
                {
                    "params": params,
                    "input_bytes": in_bytes,
                    "output_bytes": written,
                    "read": dataclasses.asdict(read),
                    "write": dataclasses.asdict(write),
                    "convert": dataclasses.asdict(conv),
                    "ratio": round(ratio, 3),
                }
            )
        )
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
