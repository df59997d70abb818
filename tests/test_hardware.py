"""The hardware table: every device kind JAX reports resolves to its chip's peak, whatever the table order."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

from flux_jax import hardware
from flux_jax.hardware import GENERATIONS, PEAK_FLOPS, SliceError, parse_slice, peak_flops
from flux_jax.tpu_launch import TpuLaunchError


def dev(kind: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(device_kind=kind)


def test_generation_peaks() -> None:
    assert {name: g.peak_flops for name, g in GENERATIONS.items()} == {
        "v4": 275e12,
        "v5e": 197e12,
        "v5p": 459e12,
        "v6e": 918e12,
    }


@pytest.mark.parametrize("name", sorted(GENERATIONS))
def test_every_device_kind_resolves_to_its_generation(name: str) -> None:
    g = GENERATIONS[name]
    assert g.device_kinds
    for kind in g.device_kinds:
        assert peak_flops(dev(kind)) == g.peak_flops, kind
        assert peak_flops(dev(kind.upper())) == g.peak_flops, kind  # case-insensitive, as before


@pytest.mark.parametrize(
    ("kind", "generation"),
    [
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),  # contains v5p's "TPU v5": the longer match wins
        ("TPU v5e", "v5e"),
        ("TPU v5", "v5p"),  # what v5p devices (and compile-only v5p topologies) report
        ("TPU v5p", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("TPU v6e", "v6e"),
    ],
)
def test_reported_tpu_kinds(kind: str, generation: str) -> None:
    assert peak_flops(dev(kind)) == GENERATIONS[generation].peak_flops


def test_gpus_cpu_and_override() -> None:
    assert peak_flops(dev("NVIDIA H200")) == 989e12
    assert peak_flops(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(dev("NVIDIA A100-SXM4-40GB")) == 312e12
    assert peak_flops(dev("NVIDIA L4")) == 121e12
    assert peak_flops(dev("cpu")) is None
    assert peak_flops(object()) is None  # no device_kind at all
    assert peak_flops(dev("cpu"), override_tflops=2.0) == 2e12
    assert peak_flops(dev("TPU v5 lite"), override_tflops=100.0) == 100e12


def test_match_does_not_depend_on_table_order(monkeypatch: pytest.MonkeyPatch) -> None:
    reversed_table = dict(reversed(list(PEAK_FLOPS.items())))
    monkeypatch.setattr(hardware, "PEAK_FLOPS", reversed_table)
    assert peak_flops(dev("TPU v5 lite")) == 197e12
    assert peak_flops(dev("TPU v5")) == 459e12
    assert peak_flops(dev("TPU v5p")) == 459e12


def test_slice_errors_are_launcher_errors() -> None:
    with pytest.raises(SliceError, match="unknown TPU generation"):
        parse_slice("v7x-8")
    with pytest.raises(TpuLaunchError, match="unknown TPU generation"):
        parse_slice("v7x-8")


def test_hardware_imports_only_the_standard_library_and_errors() -> None:
    # The lowest layer: the launcher, the planner and the trainer import it, it imports none of them (nor JAX).
    tree = ast.parse(Path(hardware.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported, "no imports found"
    for name in imported:
        assert name == "flux_jax.errors" or name.split(".")[0] in sys.stdlib_module_names, name
