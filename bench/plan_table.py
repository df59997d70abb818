"""The README's TPU fit table, produced by `flux-jax plan` (every figure comes from an ahead-of-time compile).

    .venv/bin/python bench/plan_table.py [--results runs/plan_table.jsonl] [--only v5e-8:1024:bf16 ...]

For each row (slice x resolution x base dtype) it runs `flux-jax plan --config configs/dev2pro_lora.yaml
--mesh configs/mesh/<slice>.yaml --topology <slice> --resolution PX model.base_dtype=DTYPE` in a child process
and prints a markdown table of: the mesh and batch per chip (from the slice's mesh config), per-chip HBM of the run
(one step, and validation's when the config has it on) against capacity, the step's own HBM, fits or not, the
step's matmul FLOPs per chip (every scanned layer counted) and those FLOPs at the chip's peak FLOP/s (a floor for
s/step: 100% MFU), the planner's time estimate (max(compute, HBM traffic) + exposed collectives, per chip) and the
bytes a chip sends over ICI per step.
Results are appended to --results as JSON lines and reused on the next run, so an interrupted table resumes
(full-size compiles take minutes each); --fresh ignores them. Rows planned before the estimate existed show "-".
Needs libtpu (the tpu extra); no TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

SLICES = ("v4-8", "v5e-4", "v5e-8", "v5p-8", "v6e-8", "v5e-256")
RESOLUTIONS = (512, 1024)
DTYPES = ("bf16", "fp8")
# The rows the goal is about first, then 1024 px before 512 px and bf16 before fp8, so an interrupted
# run has the most telling rows; the table itself is printed in a fixed order.
FIRST = (("v5e-8", 1024, "bf16"), ("v6e-8", 1024, "bf16"), ("v5e-8", 512, "bf16"), ("v6e-8", 512, "bf16"))


def table_rows() -> list[tuple[str, int, str]]:
    return [(s, r, d) for s in SLICES for r in RESOLUTIONS for d in DTYPES]


def rows() -> list[tuple[str, int, str]]:
    """Planning order (see FIRST)."""
    rest = sorted(table_rows(), key=lambda row: (-row[1], DTYPES.index(row[2]), SLICES.index(row[0])))
    return [*FIRST, *(row for row in rest if row not in FIRST)]


def key(row: tuple[str, int, str]) -> str:
    return ":".join(map(str, row))


def run_plan(row: tuple[str, int, str], config: str, extra: list[str]) -> dict:
    slice_name, resolution, dtype = row
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "flux_jax.cli", "plan", "--config", config, "--topology", slice_name,
               "--mesh", str(REPO / "configs" / "mesh" / f"{slice_name}.yaml"), "--resolution", str(resolution),
               "--json", str(out), "--remat-first-fit", f"model.base_dtype={dtype}", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode not in (0, 1) or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"row": key(row), "error": " | ".join(tail), "rc": proc.returncode, "wall_s": wall}
        plan = json.loads(out.read_text())
    return {"row": key(row), "rc": proc.returncode, "wall_s": wall, "plan": plan}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def markdown(results: dict[str, dict]) -> str:
    head = ("| slice | px | base | mesh (data x fsdp x tensor) | batch / chip | remat | attention | "
            "HBM / chip (GiB) | step alone (GiB) | fits | TFLOP / chip / step | s/step at peak (floor) | "
            "s/step estimate | ICI GB / chip / step | compile (s) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in table_rows():
        r = results.get(key(row))
        slice_name, resolution, dtype = row
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {slice_name} | {resolution} | {dtype} | | | | | | error: {r['error'][:80]} | | | | | | |")
            continue
        p = r["plan"]
        mesh = " x ".join(str(v) for v in p["mesh"].values())
        per_chip = p["batch_size"] / p["target"]["chips"]
        mem = p["memory"]
        total = p.get("total", mem["total"])  # results from before validation planning have no run total
        used = f"{_gib(total)} / {_gib(p['capacity'])}" + (" (compiler)" if mem["from_compiler_error"] else "")
        step_alone = _gib(mem["total"])  # the step's own compile; the run adds validation's memory when it is on
        fits = "yes" if p["fits"] else "**no**"
        tflop = "-" if p["flops"] is None else f"{p['flops'] / 1e12:.0f}"
        # Results from before the time estimate lack its fields.
        estimate = f"{_s(p.get('estimate_seconds'))} | {_gb(p.get('ici_bytes'))}"
        times = f"{tflop} | {_s(p['seconds_at_peak'])} | {estimate} | {p['compile_seconds']:.0f}"
        remat = p.get("remat", "-") + (" (auto)" if p.get("remat_options") else "")
        kernel = f"{p.get('attention', '-')}"
        lines.append(f"| {slice_name} | {resolution} | {dtype} | {mesh} | {per_chip:g} | {remat} | {kernel} | {used} | "
                     f"{step_alone} | {fits} | {times} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/dev2pro_lora.yaml")
    parser.add_argument("--results", default="runs/plan_table.jsonl", help="JSON lines of finished rows (resumable)")
    parser.add_argument("--only", nargs="*", metavar="SLICE:PX:DTYPE", help="plan only these rows")
    parser.add_argument("--fresh", action="store_true", help="re-plan rows already in --results")
    parser.add_argument("extra", nargs="*", metavar="key=value", help="extra config overrides for every row")
    args = parser.parse_args(argv)

    results_path = pathlib.Path(args.results)
    results: dict[str, dict] = {}
    if results_path.exists() and not args.fresh:
        for line in results_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                results[r["row"]] = r
    wanted = [row for row in rows() if not args.only or key(row) in args.only]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for row in wanted:
        if key(row) in results and "error" not in results[key(row)]:
            continue
        print(f"planning {key(row)} ...", file=sys.stderr, flush=True)
        r = run_plan(row, args.config, args.extra)
        results[key(row)] = r
        with results_path.open("a") as f:  # one line per finished row: an interrupted table keeps its rows
            f.write(json.dumps(r) + "\n")
        status = r.get("error") or ("fits" if r["plan"]["fits"] else "does not fit")
        print(f"  {key(row)}: {status} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    print(markdown({k: v for k, v in results.items() if not args.only or k in args.only}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
