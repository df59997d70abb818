"""Full fine-tuning (``train.mode: full``) on the tiny Flux over the 8 fake CPU devices: the loss falls, data 2 x
fsdp 4 trains the same params as one device, the params and optimizer state are split over fsdp (no chip holds a
full copy), ``train.trainable`` trains only what it matches, a stopped (or kill -9ed) run resumes bit-exactly, a
checkpoint of the other mode is refused in one line, masters other than ``optim.master_dtype`` are refused, bf16
masters train with fp32 optimizer state, and ``flux-jax plan``'s abstract step builds."""

from __future__ import annotations

import functools
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flux_jax.data.examples import collate
from flux_jax.errors import CheckpointError, ConfigError
from flux_jax.model.config import preset
from flux_jax.run_config import load_config
from flux_jax.sharding import make_mesh
from flux_jax.train.abstract import abstract_step
from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.loop import setup
from flux_jax.train.state import flat_params, per_device_bytes
from flux_jax.train.step import eval_loss
from tests.helpers.compile_cache import child_env

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FULL = ["train.mode=full", "optim.lr=3e-4", "log.tensorboard=false", "checkpoint.async_save=false"]
STEPS = 4

pytestmark = pytest.mark.usefixtures("train_compile_cache")  # conftest.py


def config(out: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={out}", *FULL, f"train.steps={STEPS}", *overrides])


def host(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree.items()}


@pytest.mark.slow
def test_sharded_full_training_lowers_the_loss_matches_one_device_and_splits_params_and_moments(tmp_path):
    trainer, state = setup(config(tmp_path / "sharded", "mesh.data=2", "mesh.fsdp=4"), progress=False)
    assert not any("lora" in k for k in state.lora)  # no adapters: the base's own params train
    assert {"double_blocks.img_attn.qkv.kernel", "final_layer.linear.kernel", "img_in.kernel"} <= set(state.lora)
    floats = [x for x in jax.tree.leaves((state.lora, state.opt_state)) if jax.numpy.issubdtype(x.dtype, np.floating)]
    assert all(x.dtype == np.float32 for x in floats)  # fp32 masters and moments (the counters are int32)

    # Params + Adam moments per chip: about 1/fsdp of their total (data replicates them; the small biases and norm
    # scales whose leading dim does not split over 4 stay whole, a few percent here).
    tree = (state.lora, state.opt_state)
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    per_chip = per_device_bytes(tree)
    assert per_chip <= 1.05 * total / 4, (per_chip, total)
    kernel = state.lora["double_blocks.img_attn.qkv.kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # the big ones really are split

    source = trainer.data.source
    everything = {k: jax.numpy.asarray(v) for k, v in collate([source.read(i) for i in range(len(source))]).items()}
    c = trainer.step
    loss = jax.jit(functools.partial(eval_loss, c.graphdef, c.template, objective=c.objective))

    def fixed_draw_loss(params) -> float:
        return float(np.mean([loss(trainer.frozen, params, everything, jax.random.key(k)) for k in range(4)]))

    before = fixed_draw_loss(state.lora)
    sharded = trainer.run(state)
    assert sharded.step == STEPS
    after = fixed_draw_loss(sharded.state.lora)
    assert after < 0.95 * before, (before, after)

    single_trainer, single_state = setup(
        config(tmp_path / "single", "mesh.data=1", "train.batch_size=8"), devices=jax.devices()[:1], progress=False
    )
    single = single_trainer.run(single_state)
    got, want = host(sharded.state.lora), host(single.state.lora)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_trainable_regex_trains_only_the_matching_params_and_their_sharded_ema(tmp_path):
    pattern = r"^double_blocks\.img_"
    cfg = config(tmp_path, f"train.trainable=['{pattern}']", "optim.ema_decay=0.9", "mesh.data=2", "mesh.fsdp=4")
    trainer, state = setup(cfg, progress=False)
    assert state.lora and all(re.search(pattern, k) for k in state.lora)
    assert {k: v.sharding for k, v in state.ema.items()} == {k: v.sharding for k, v in state.lora.items()}
    initial = host(state.lora)
    frozen = host(flat_params(trainer.frozen))
    assert "double_blocks.txt_attn.qkv.kernel" in frozen and "single_blocks.linear1.kernel" in frozen
    assert not any(re.search(pattern, k) for k in frozen)  # every matching param is in the trainable set
    result = trainer.run(state)
    trained, ema = host(result.state.lora), host(result.state.ema)
    assert all(not np.array_equal(trained[k], initial[k]) for k in trained if k.endswith(".kernel"))
    assert all(not np.array_equal(ema[k], trained[k]) for k in trained if k.endswith(".kernel"))
    for k, v in host(flat_params(trainer.frozen)).items():
        np.testing.assert_array_equal(v, frozen[k], err_msg=k)  # bit-identical


@pytest.mark.slow
def test_stop_then_resume_reproduces_the_uninterrupted_run_bit_exactly(tmp_path):
    # The first test's mesh (and program): restore puts every fsdp shard of the params and moments back in place.
    mesh = ["mesh.data=2", "mesh.fsdp=4"]
    whole = setup(config(tmp_path / "whole", *mesh), progress=False)
    want = host(whole[0].run(whole[1]).state.lora)

    out = tmp_path / "stopped"
    first = setup(config(out, "train.steps=2", *mesh), progress=False)
    assert first[0].run(first[1]).step == 2  # saves at its last step: the stop
    trainer, state = setup(config(out, *mesh), progress=False)
    kernel = state.lora["double_blocks.img_attn.qkv.kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # restored as shards, not whole
    assert int(state.step) == 2 and trainer.data.get_state() == first[0].data.get_state()
    got = host(trainer.run(state).state.lora)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # A full run's checkpoint is no LoRA: resuming it in lora mode, or exporting it, is refused in one line.
    with pytest.raises(CheckpointError, match=r"is a train\.mode: full run and the config says train\.mode: lora"):
        setup(load_config(TINY, [f"output_dir={out}", "log.tensorboard=false"]), progress=False)
    with pytest.raises(CheckpointError, match="holds no LoRA"):
        read_lora_weights(out)


def test_a_lora_checkpoint_is_refused_in_full_mode(tmp_path):
    trainer, state = setup(
        load_config(TINY, [f"output_dir={tmp_path}", "train.steps=1", "log.tensorboard=false"]), progress=False
    )
    trainer.run(state)
    with pytest.raises(CheckpointError, match=r"is a train\.mode: lora run and the config says train\.mode: full"):
        setup(config(tmp_path), progress=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.base_dtype=bf16"], r"model\.base_dtype: is 'bf16', but train\.mode: full .* \('fp32'\)"),
        (["optim.master_dtype=bf16"], r"model\.base_dtype: is 'fp32', .* set model\.base_dtype: bf16"),
        (["train.mode=lora", "optim.master_dtype=bf16"], r"lora\.dtype: is 'fp32', but optim\.master_dtype is bf16"),
        (["model.base_dtype=fp8"], r"model\.base_dtype: is 'fp8'"),
        (["train.mode=lora", "train.trainable=['x']"], r"train\.trainable: .*lora mode"),
        (["train.trainable=['(']"], r"train\.trainable\[0\]: '\(' is not a regular expression"),
        (["validation.base=elsewhere"], r"validation\.base: .*train\.mode: full trains the base itself"),
    ],
)
def test_bad_full_mode_settings_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *overrides)


def test_nothing_matching_train_trainable_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no parameter path matches train.trainable"):
        setup(config(tmp_path, "train.trainable=['^nothing$']"), progress=False)


def test_plan_builds_the_full_mode_step(tmp_path):
    cfg = config(tmp_path, "mesh.data=2", "mesh.fsdp=4")
    step = abstract_step(cfg, make_mesh(*cfg.mesh.shape), model_config=preset("tiny"))
    assert step.adapted == () and "final_layer.linear.kernel" in step.state.lora
    compiled = step.compile(step.batch(batch_size=8, grad_accum=1, resolution=64, text_len=8))
    assert compiled is not None


@pytest.mark.slow
def test_kill9_mid_run_then_resume_reproduces_the_uninterrupted_params(tmp_path, tmp_path_factory):
    steps, every = 40, 4
    args = ["train.mode=full", "optim.lr=3e-4", f"train.steps={steps}", f"checkpoint.every={every}", "mesh.data=2",
            "mesh.fsdp=4", "log.tensorboard=false"]  # fmt: skip
    reference = setup(load_config(TINY, [f"output_dir={tmp_path / 'whole'}", *args]), progress=False)
    want = host(reference[0].run(reference[1]).state.lora)

    out = tmp_path / "killed"
    env = child_env(tmp_path_factory.getbasetemp() / "train-xla-cache")  # the conftest fixture's cache
    command = [sys.executable, "-m", "flux_jax.cli", "train", "--config", str(TINY), f"output_dir={out}", *args,
               "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, cwd=TINY.parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 2 * every for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach its second checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
    assert steps not in done  # killed mid-run

    trainer, state = setup(load_config(TINY, [f"output_dir={out}", *args]), progress=False)
    assert every <= int(state.step) < steps
    got = host(trainer.run(state).state.lora)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # bit-exact


@pytest.mark.slow
def test_bf16_masters_train_with_fp32_optimizer_state(tmp_path):
    # optim.master_dtype bf16 wired into the trainer: the base is stored (and trained) bf16, the optimizer state
    # stays fp32, every update is rounded in stochastically (flux_jax/train/rounding.py). That the rounding is
    # unbiased and that a bf16 + SR run tracks the fp32 run's loss (where round-to-nearest stalls) is shown on a toy
    # model in test_optim_rounding.py.
    trainer, state = setup(
        config(tmp_path, "mesh.data=2", "mesh.fsdp=4", "model.base_dtype=bf16", "optim.master_dtype=bf16"),
        progress=False,
    )
    initial = host(state.lora)
    result = trainer.run(state)
    assert result.step == STEPS
    trained = result.state.lora
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(trained))  # the masters
    moments = [x for x in jax.tree.leaves(result.state.opt_state) if jax.numpy.issubdtype(x.dtype, np.floating)]
    assert moments and all(x.dtype == np.float32 for x in moments)
    moved = [k for k, v in host(trained).items() if k.endswith(".kernel") and not np.array_equal(v, initial[k])]
    assert len(moved) == sum(k.endswith(".kernel") for k in initial)  # every kernel took its updates
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
