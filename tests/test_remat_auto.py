"""``model.remat: auto``: the first remat policy (none, save_matmuls, full) whose compiled step fits the device.

The choice is made from the compiler's own memory analysis of the real train step (the tiny model on the fake CPU
devices here; a TPU slice in the planner), so the tests set the capacity around the measured figures and check the
rule: the cheapest-in-compute policy within capacity, the least-memory one (with a warning) when none is, and a
clear error when the compiler refuses every policy. configs/tiny.yaml is ``remat: auto``: every tiny training
test runs the trainer's choice (test_train_loop.py checks it picks "none" with one compile).
"""

from __future__ import annotations

import importlib.util
import json
import logging

import jax
import pytest

from flux_jax import cli
from flux_jax.model.config import PRESETS
from flux_jax.run_config import load_config
from flux_jax.sharding import make_mesh
from flux_jax.train.abstract import abstract_step
from flux_jax.train.memory import AUTO_ORDER, NoRematFits, RematSearch, choose, device_capacity
from tests.helpers.compile_cache import persistent_compile_cache

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (tpu extra) not installed")


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """The tests compile the same few programs (one per policy) again: compile each once."""
    with persistent_compile_cache(tmp_path_factory.getbasetemp() / "remat-xla-cache"):
        yield


def tiny_step(search: RematSearch, resolution: int = 64):
    cfg = load_config("configs/tiny.yaml", ["model.remat=auto", f"data.resolution={resolution}", "mesh.data=1"])
    step = abstract_step(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]), model_config=PRESETS["tiny"], remat=search)
    batch = step.batch(batch_size=8, grad_accum=1, resolution=resolution, text_len=16)
    return step, batch


@pytest.fixture(scope="module")
def measured() -> dict[str, int]:
    """Every policy's compiled per-device bytes for the tiny step at 64 px on one device (no capacity: all fit)."""
    step, batch = tiny_step(RematSearch(capacity=None, evaluate_all=True))
    step.compile(batch)
    assert [o.policy for o in step.compiler.remat_options] == list(AUTO_ORDER)
    assert step.compiler.remat_policy == "none"
    return {o.policy: o.total for o in step.compiler.remat_options}


def test_rematerialising_saves_memory_on_the_tiny_step(measured):
    assert measured["none"] > measured["full"] > 0
    assert measured["none"] >= measured["save_matmuls"] >= measured["full"]


def test_auto_takes_the_first_policy_within_capacity(measured, caplog):
    capacity = measured["none"] - 1  # "none" no longer fits; the next policy that does is chosen
    want = next(p for p in AUTO_ORDER if measured[p] <= capacity)
    step, batch = tiny_step(RematSearch(capacity=capacity))
    with caplog.at_level(logging.INFO, logger="flux_jax.train.memory"):
        compiled = step.compile(batch)
    assert step.compiler.remat_policy == want != "none"
    assert [o.policy for o in step.compiler.remat_options] == list(AUTO_ORDER[: AUTO_ORDER.index(want) + 1])
    assert f"remat auto: chose {want!r}" in caplog.text and "none" in caplog.text  # the alternatives are logged
    assert step.compiler.executables == {step.compiler.signature(batch): compiled}  # the chosen one is kept


def test_auto_falls_back_to_the_least_memory_when_nothing_fits(measured, caplog):
    step, batch = tiny_step(RematSearch(capacity=1))
    with caplog.at_level(logging.WARNING, logger="flux_jax.train.memory"):
        step.compile(batch)
    assert step.compiler.remat_policy == min(measured, key=measured.get)
    assert "no policy fits" in caplog.text


def test_every_policy_refused_by_the_compiler_is_a_clear_error():
    def refuse(policy):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. the total memory required for HLO "
            f"temporaries ({20 + AUTO_ORDER.index(policy)}.00G) exceeds available HBM (15.75G)."
        )

    with pytest.raises(NoRematFits, match="does not fit the device under any remat policy") as e:
        choose(refuse, RematSearch(capacity=15 * 2**30))
    assert [(o.policy, o.total, o.refused) for o in e.value.options] == [
        (p, (20 + i) * 2**30, True) for i, p in enumerate(AUTO_ORDER)
    ]


def test_other_compile_errors_propagate():
    def broken(policy):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        choose(broken, RematSearch(capacity=None))


def test_cpu_capacity_is_this_hosts_memory_shared_by_its_devices():
    capacity = device_capacity(jax.devices()[0])
    assert capacity is not None and 0 < capacity * jax.local_device_count() <= 2**50


@needs_libtpu
@pytest.mark.slow
def test_plan_prints_every_policy_and_uses_the_first_that_fits(capfd, tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", "--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--text-len", "8", "--json", str(out)]
    assert cli.main(args) == 0
    plan = json.loads(out.read_text())
    options = plan["remat_options"]
    assert [o["policy"] for o in options] == list(AUTO_ORDER) and plan["remat"] == "none"
    assert all(o["total"] > 0 and not o["refused"] for o in options)
    assert plan["memory"]["total"] == options[0]["total"]  # the plan's step is the chosen policy's
    report = capfd.readouterr().out
    assert "remat none (auto)" in report and "remat auto (the first policy that fits is used)" in report
    assert report.count("<- chosen") == 1 and all(f"  {p:<13}" in report for p in AUTO_ORDER)
