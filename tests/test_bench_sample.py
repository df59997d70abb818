"""`bench/sample.py --preset tiny` (the sampler benchmark's CI smoke run) and its PyTorch peer's `--tiny` run work."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_bench_tiny_preset_times_the_sampler(capsys) -> None:
    # Two images with true CFG (both branches in one call), one step, on the 8 fake CPU devices (FSDP over them).
    results = _bench("sample").main(["--preset", "tiny", "--steps", "1", "--batch", "2", "--cfg", "2.0",
                                     "--repeats", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "RESULTS " + json.dumps(results)
    (r,) = results
    assert (r["preset"], r["width"], r["height"], r["steps"], r["batch"], r["cfg"]) == ("tiny", 64, 64, 1, 2, 2.0)
    assert r["devices"] == 8 and r["dtype"] == "bf16"
    assert r["traces"] == 1  # the first call compiled the loop; the timed calls reused it
    assert r["s_per_image"] > 0 and r["denoise_s_per_image"] > 0 and r["decode_s_per_image"] > 0
    assert abs(r["s_per_image"] - r["denoise_s_per_image"] - r["decode_s_per_image"]) <= 2e-4  # each rounded
    assert r["compile_s"] >= 0 and r["useful_tflop_per_image"] >= 0 and r["mfu"] is None  # no peak on a CPU


def test_torch_peer_sample_runs_tiny_on_cpu() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "torch_peer_sample.py"), "--tiny", "--steps", "1",
                          "--dtype", "fp32", "--cfg", "2.0", "--repeats", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    (r,) = json.loads(run.stdout.strip().splitlines()[-1].removeprefix("RESULTS "))
    assert (r["width"], r["height"], r["steps"], r["batch"], r["cfg"], r["device"]) == (64, 64, 1, 1, 2.0, "cpu")
    assert r["s_per_image"] > 0 and "error" not in r
