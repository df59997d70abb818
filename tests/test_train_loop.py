"""The trainer on the tiny Flux over the 8 fake CPU devices: the loss falls, sharding changes nothing, one compile,
NaN (in the loss or in the updated parameters) stops the run, resuming refuses a changed LoRA or optimizer in one
line, a run directory in use is refused before anything is built, and `read_lora_weights` gives export the trained
adapters."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file

from flux_jax.data.examples import BatchIterator, Example, collate, synthetic_examples, write_cached_examples
from flux_jax.errors import CheckpointError, ConfigError, FluxJaxError
from flux_jax.model.config import preset
from flux_jax.run_config import from_dict, load_config
from flux_jax.train import build
from flux_jax.train.build import BASE_PARAMS
from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.lease import RunDirBusyError
from flux_jax.train.loop import TrainingDivergedError, _optim_changes, setup, train
from flux_jax.train.lora_sources import export_lora
from flux_jax.train.objective import Objective, warn_about_guidance
from flux_jax.train.state import flat_params, split_trainable
from flux_jax.train.step import eval_loss
from tests.helpers.leases import a_dead_pid, live_owner, write_owner

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FAST = ["log.tensorboard=false", "checkpoint.async_save=false"]


pytestmark = pytest.mark.usefixtures("train_compile_cache")  # conftest.py


def config(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={tmp_path}", *FAST, *overrides])


def host_lora(state) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in state.lora.items()}


@pytest.mark.slow
def test_loss_falls_and_the_step_compiles_once(tmp_path):
    # data=2 x fsdp=4: the mesh of the sharded test below and of test_train_resume.py (one compile for all three).
    cfg = config(tmp_path, "log.tensorboard=true", "mesh.data=2", "mesh.fsdp=4")
    trainer, state = setup(cfg, progress=False)
    source = trainer.data.source
    everything = {k: jax.numpy.asarray(v) for k, v in collate([source.read(i) for i in range(len(source))]).items()}
    c = trainer.step
    loss = jax.jit(functools.partial(eval_loss, c.graphdef, c.template, objective=c.objective))

    def fixed_draw_loss(lora) -> float:  # the same noise and t for the whole synthetic set, before and after
        return float(np.mean([loss(trainer.frozen, lora, everything, jax.random.key(k)) for k in range(4)]))

    before = fixed_draw_loss(state.lora)
    result = trainer.run(state)
    after = fixed_draw_loss(result.state.lora)
    assert after < 0.92 * before, (before, after)

    assert trainer.step.traces == 1 and len(trainer.step.executables) == 1  # 30 steps, one trace, one compile
    # tiny.yaml's remat auto: "none" fits at once, so choosing cost no extra compile.
    assert trainer.step.remat_policy == "none" and [o.policy for o in trainer.step.remat_options] == ["none"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"loss", "grad_norm", "lr", "step_time", "samples_per_s", "tokens_per_s", "data_epoch"} <= set(records[-1])
    # The in-memory synthetic set keeps up: the loop spends a small share of each step waiting for its batch.
    waits = [r["data_wait_fraction"] for r in records[1:]]
    assert all(0 <= w <= 1 for w in waits) and np.median(waits) < 0.2, waits
    assert all(0 <= r["data_wait"] <= r["step_time"] for r in records[1:])
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < first, (first, last)  # the training loss falls too, through its per-step noise
    assert records[-1]["data_epoch"] == 14 and records[-1]["data_position"] == 2  # 16 examples, batch 8
    assert any((tmp_path / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [20, 30]  # every 10, keep 2
    assert result.step == 30 and result.checkpoint == tmp_path.absolute() / "checkpoints" / "30"


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    cfg = load_config(TINY, [f"output_dir={out}", *FAST, "train.steps=3", "mesh.data=1", "checkpoint.every=100"])
    return out, train(cfg, devices=jax.devices()[:1], progress=False)


@pytest.mark.slow
def test_data2_fsdp4_matches_single_device(tmp_path, single_device_run):
    _, single = single_device_run
    cfg = config(tmp_path, "train.steps=3", "mesh.data=2", "mesh.fsdp=4", "checkpoint.every=100")
    trainer, state = setup(cfg, progress=False)
    # The base and the adapters really are FSDP-sharded: no device holds a whole embed-wide weight.
    graphdef_kernel = trainer.frozen["double_blocks"]["img_attn"]["qkv"]["kernel"]
    assert graphdef_kernel.get_value().sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert state.lora["double_blocks.img_attn.qkv.lora.lora_a"].sharding.spec == PartitionSpec(None, "fsdp")
    qkv_b = PartitionSpec(None, None, ("tensor", "fsdp"))  # the side facing the tensor axis is split over fsdp too
    assert state.lora["double_blocks.img_attn.qkv.lora.lora_b"].sharding.spec == qkv_b
    sharded = trainer.run(state)
    assert sharded.last_loss == pytest.approx(single.last_loss, abs=1e-5)
    want, got = host_lora(single.state), host_lora(sharded.state)
    assert not np.allclose(want["double_blocks.img_attn.qkv.lora.lora_b"], 0)  # three updates happened
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)


def test_read_lora_weights_returns_the_trained_adapters(single_device_run):
    run_dir, single = single_device_run
    model, meta = read_lora_weights(run_dir)
    _, lora_state, _ = split_trainable(model)
    got = {k: np.asarray(v) for k, v in flat_params(lora_state).items()}
    want = host_lora(single.state)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # The base is abstract: export reads adapters only, never the base weights.
    base_params = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, BASE_PARAMS))]
    assert base_params and all(isinstance(x, jax.ShapeDtypeStruct) for x in base_params)
    assert model.config == preset("tiny")
    assert meta["step"] == 3 and (meta["rank"], meta["alpha"], meta["targets"]) == (4, 8.0, "all_blocks")
    assert meta["guidance"] == 1.0 and meta["timestep_sampling"] == "flux_shift" and meta["steps"] == 3
    assert meta["base"] == "random:tiny" and "synthetic" in meta["dataset"]
    assert meta["config"]["lora"]["rank"] == 4 and meta["config"]["output_dir"] == str(run_dir)
    again, _ = read_lora_weights(run_dir / "checkpoints" / "3")
    np.testing.assert_array_equal(
        np.asarray(again.double_blocks.img_attn.qkv.lora.lora_b[...]),
        want["double_blocks.img_attn.qkv.lora.lora_b"],
    )
    with pytest.raises(CheckpointError, match="no checkpoint for step 2"):
        read_lora_weights(run_dir, step=2)
    with pytest.raises(CheckpointError, match="not a training run"):
        read_lora_weights(run_dir / "tensorboard-nope")
    with pytest.raises(CheckpointError, match="kept no EMA"):
        read_lora_weights(run_dir, use_ema=True)


def test_an_older_run_exports_after_a_config_field_is_renamed(tmp_path, single_device_run):
    """Export rebuilds the adapters from the checkpoint meta's LoRA keys, not by re-parsing the saved run config
    with today's strict schema: a run saved before a field was renamed or removed still exports, unchanged."""
    run_dir, _ = single_device_run
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    meta_file = old / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    saved = meta["config"]
    saved["lora"]["lora_rank"] = saved["lora"].pop("rank")  # renamed, the way a future version might
    del saved["model"]["remat"]  # removed
    saved["train"]["new_option"] = True  # a field the saving version had and this one lacks
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(saved)  # the saved config no longer parses ...
    got = load_file(export_lora(old, tmp_path / "old.safetensors", "kohya"))  # ... and the run still exports
    want = load_file(export_lora(run_dir, tmp_path / "new.safetensors", "kohya"))
    assert got.keys() == want.keys() and len(want) > 0
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_resume_refuses_a_changed_lora_before_building_anything(single_device_run):
    run_dir, _ = single_device_run
    cfg = load_config(TINY, [f"output_dir={run_dir}", *FAST, "mesh.data=1", "lora.rank=8"])
    with pytest.raises(CheckpointError, match=r"rank: checkpoint 4, now 8"):
        setup(cfg, devices=jax.devices()[:1], progress=False)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg_model = preset("tiny")
    source = synthetic_examples(in_channels=64, context_dim=cfg_model.context_in_dim, vec_dim=cfg_model.vec_in_dim,
                                resolution=64)  # fmt: skip
    # Poison one example of the second batch of the plan: step 1 is fine, step 2 sees NaN latents.
    plan = BatchIterator(source, batch_size=8, seed=0).plan(0)
    bad = plan[1][0]
    examples = [source.read(i) for i in range(len(source))]
    poisoned = examples[bad].latents.copy()
    poisoned[0, 0] = np.nan
    examples[bad] = Example(poisoned, examples[bad].t5, examples[bad].clip, 4, 4)
    data = write_cached_examples(tmp_path / "data", examples)
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"output_dir={run}", *FAST, "mesh.data=1", "data.synthetic=false", f"data.path={data}",
                             "checkpoint.every=1", "train.steps=4"])  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"loss is nan .* at step 2; stopping\. Last good checkpoint: "
                                                    r"step 1"):  # fmt: skip
        train(cfg, devices=jax.devices()[:1], progress=False)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [1]
    model, meta = read_lora_weights(run)
    assert meta["step"] == 1
    assert all(np.isfinite(np.asarray(v)).all() for v in flat_params(split_trainable(model)[1]).values())


def test_batch_that_cannot_be_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size / train.grad_accum = 4 samples per micro-batch cannot "
                                          r"be split over mesh.data x mesh.fsdp = 8 devices"):  # fmt: skip
        setup(config(tmp_path, "train.grad_accum=2"), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_dataset_fails_before_the_model_is_built(tmp_path):
    # The trainer caches an uncached folder first (tests/test_train_autocache.py); a folder that is not there fails
    # in that step's first look, before anything is written or built.
    with pytest.raises(FluxJaxError, match=r"nope: dataset folder not found"):
        setup(config(tmp_path, "data.synthetic=false", f"data.path={tmp_path / 'nope'}"), progress=False)
    assert not (tmp_path / "nope_cache").exists() and not (tmp_path / "checkpoints").exists()


def test_guidance_warning_is_loud_for_dev_bases(caplog):
    dev, schnell = preset("tiny"), preset("schnell")
    with caplog.at_level(logging.WARNING):
        assert warn_about_guidance(Objective(guidance=3.5), base="ckpt/Flux-Dev2Pro", config=dev)
    assert "Flux-Dev2Pro base at guidance 3.5" in caplog.text and "!!!!" in caplog.text
    assert warn_about_guidance(Objective(guidance_range=(1.0, 4.0)), base="x", config=dev)
    assert not warn_about_guidance(Objective(guidance=1.0), base="ckpt/Flux-Dev2Pro", config=dev)
    assert not warn_about_guidance(Objective(guidance=3.5), base="schnell", config=schnell)  # no guidance embedding


@pytest.mark.slow
def test_trains_a_loaded_base(tmp_path):
    """model.base: a diffusers checkpoint is loaded (sharded, through flux_jax.load_flux) and trained on; the base
    the step sees is the checkpoint's, bit for bit."""
    from tests.helpers.torch_reference import diffusers_flux, tiny_config

    ref = diffusers_flux(tiny_config(), seed=3)
    ref.save_pretrained(tmp_path / "base")
    cfg = config(tmp_path / "run", "model.preset=null", f"model.base={tmp_path / 'base'}", "mesh.data=1",
                 "train.steps=2")  # fmt: skip
    trainer, state = setup(cfg, devices=jax.devices()[:1], progress=False)
    kernel = np.asarray(trainer.frozen["double_blocks"]["img_attn"]["proj"]["kernel"].get_value())
    want = ref.transformer_blocks[1].attn.to_out[0].weight.detach().numpy().T
    np.testing.assert_array_equal(kernel[1], want)
    result = trainer.run(state)
    assert result.step == 2 and np.isfinite(result.last_loss)
    assert not np.allclose(np.asarray(result.state.lora["single_blocks.linear2.lora.lora_b"]), 0)
    _, meta = read_lora_weights(tmp_path / "run")
    assert meta["base"] == str(tmp_path / "base") and meta["base_config"]["hidden_size"] == 64


def test_a_run_dir_in_use_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(build, "build_model", no_build)
    with live_owner(tmp_path) as owner, pytest.raises(RunDirBusyError) as e:
        setup(config(tmp_path), progress=False)
    assert f"{tmp_path} is in use by another trainer: host {owner.host} pid {owner.pid} since " in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lease.json"]  # nothing else touched


def test_a_stale_lease_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path, caplog):
    write_owner(tmp_path, pid=a_dead_pid(), heartbeat=time.time() - 3600)
    cfg = config(tmp_path, "mesh.data=1", "train.steps=1")
    with caplog.at_level(logging.WARNING):
        result = train(cfg, devices=jax.devices()[:1], progress=False)
    assert "taking over the lease of a trainer that is no longer running" in caplog.text
    assert result.step == 1 and not (tmp_path / "lease.json").exists()


def test_non_finite_parameters_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    """A huge learning rate makes the update itself overflow: the loss of that step is still finite (it is computed
    before the update), so only a check of the new parameters keeps the NaN LoRA from being saved as "good"."""
    run = tmp_path / "run"
    common = [*FAST, "mesh.data=1", "checkpoint.every=1", "checkpoint.keep=5"]
    train(load_config(TINY, [f"output_dir={run}", *common, "train.steps=2"]), devices=jax.devices()[:1],
          progress=False)  # fmt: skip
    cfg = load_config(TINY, [f"output_dir={run}", *common, "train.steps=4", "optim.lr=1.0e+39"])
    with pytest.raises(TrainingDivergedError, match=r"the LoRA parameters are not finite \(NaN/Inf\) after the update "
                                                    r"of step 3 .*Last good checkpoint: step 2"):  # fmt: skip
        train(cfg, devices=jax.devices()[:1], progress=False)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [1, 2]
    model, meta = read_lora_weights(run)
    assert meta["step"] == 2
    assert all(np.isfinite(np.asarray(v)).all() for v in flat_params(split_trainable(model)[1]).values())


def test_changing_the_optimizer_on_resume_is_one_clear_line(single_device_run):
    run_dir, _ = single_device_run
    cfg = load_config(TINY, [f"output_dir={run_dir}", *FAST, "train.steps=3", "mesh.data=1", "optim.name=lion"])
    with pytest.raises(CheckpointError) as e:
        setup(cfg, devices=jax.devices()[:1], progress=False)
    message = str(e.value)
    assert "\n" not in message and "partial_restore" not in message
    assert f"{run_dir / 'checkpoints' / '3'}: cannot resume: the optimizer settings changed since this checkpoint " \
           "(optim.name: checkpoint 'adamw', now 'lion')" in message  # fmt: skip


def test_an_optimizer_setting_newer_than_the_checkpoint_counts_as_its_default(tmp_path):
    # A checkpoint written before optim.master_dtype existed ran with its default (fp32): only what really
    # changed is named when its optimizer state does not fit.
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "optim.name=lion"])
    saved = {k: v for k, v in load_config(TINY, [f"output_dir={tmp_path}"]).to_dict()["optim"].items()}
    del saved["master_dtype"]
    assert _optim_changes({"config": {"optim": saved}}, cfg) == ["optim.name: checkpoint 'adamw', now 'lion'"]


def test_exporting_a_run_logs_no_read_only_notice(single_device_run, caplog):
    run_dir, _ = single_device_run
    with caplog.at_level(logging.INFO):
        read_lora_weights(run_dir)
    assert "read only" not in caplog.text


def test_a_run_with_nothing_left_to_do_leaves_its_config_yaml_alone(single_device_run):
    run_dir, _ = single_device_run
    before = os.stat(run_dir / "config.yaml")
    cfg = load_config(TINY, [f"output_dir={run_dir}", *FAST, "train.steps=3", "mesh.data=1", "checkpoint.every=100"])
    result = train(cfg, devices=jax.devices()[:1], progress=False)
    assert result.step == 3 and result.checkpoint == run_dir.absolute() / "checkpoints" / "3"
    after = os.stat(run_dir / "config.yaml")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_no_checkpoints_directory_appears_before_the_base_is_checked(tmp_path):
    run = tmp_path / "run"
    (tmp_path / "not_a_base").mkdir()
    cfg = config(run, "model.preset=null", f"model.base={tmp_path / 'not_a_base'}", "mesh.data=1")
    with pytest.raises(FluxJaxError):
        setup(cfg, devices=jax.devices()[:1], progress=False)
    assert not (run / "checkpoints").exists()
    assert not run.exists()  # not even the (empty) output_dir
