"""`lora.init_from`: a run starts from an existing LoRA (file or run) with exactly that LoRA's effect."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from flux_jax.errors import ConfigError
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.train.loop import setup
from tests.helpers.compile_cache import persistent_compile_cache
from tests.helpers.tiny_lora import FILE_ALPHA, config, lora_file, random_lora


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """Each setup() builds the same tiny model: compile its initialiser once (shared with test_train_loop.py)."""
    with persistent_compile_cache(tmp_path_factory.getbasetemp() / "train-xla-cache"):
        yield


@pytest.fixture(scope="module")
def file_weights() -> dict[str, LoraWeights]:
    return random_lora()


def deltas(state_lora: dict, alpha: float) -> dict[str, np.ndarray]:
    """Every adapted layer's delta W [out, in] from a run's flat LoRA state."""
    out = {}
    for key, a in state_lora.items():
        if not key.endswith("lora_a"):
            continue
        a, b = np.asarray(a), np.asarray(state_lora[key[: -len("lora_a")] + "lora_b"])
        module = key[: -len(".lora.lora_a")]
        rank = a.shape[-1]
        if a.ndim == 3:
            stack, rest = module.split(".", 1)
            for i in range(a.shape[0]):
                out[f"{stack}.{i}.{rest}"] = (alpha / rank * (a[i] @ b[i])).T
        else:
            out[module] = (alpha / rank * (a @ b)).T
    return out


def test_a_run_starts_with_the_files_lora_exactly(tmp_path, file_weights):
    path = lora_file(tmp_path / "start.safetensors", file_weights)
    _, state = setup(config(tmp_path / "run", f"lora.init_from={path}"), progress=False)
    got = deltas(state.lora, alpha=8.0)
    assert got.keys() == file_weights.keys()
    for name, w in file_weights.items():
        want = FILE_ALPHA / w.rank * (w.up @ w.down)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_layers_the_file_lacks_start_fresh_and_a_run_directory_is_a_source(tmp_path, file_weights, caplog):
    doubles = {k: w for k, w in file_weights.items() if k.startswith("double_blocks.")}
    path = lora_file(tmp_path / "doubles.safetensors", doubles, fmt="diffusers")
    with caplog.at_level(logging.WARNING):
        trainer, state = setup(config(tmp_path / "run", f"lora.init_from={path}"), progress=False)
    assert "start fresh" in caplog.text
    got = deltas(state.lora, alpha=8.0)
    for name, delta in got.items():
        if name in doubles:
            w = doubles[name]
            np.testing.assert_allclose(delta, FILE_ALPHA / w.rank * (w.up @ w.down), rtol=1e-5, atol=1e-6)
        else:
            assert not delta.any(), name  # B is zero: a fresh adapter
    assert np.asarray(state.lora["single_blocks.linear1.lora.lora_a"]).any()  # ... with its random A

    # That run's checkpoint as the source of a new run.
    trainer.checkpointer.save(state, data_state=trainer.data.get_state(), meta=trainer.meta)
    trainer.checkpointer.wait()
    _, again = setup(config(tmp_path / "next", f"lora.init_from={tmp_path / 'run'}"), progress=False)
    for name, delta in deltas(again.lora, alpha=8.0).items():
        if name in doubles:
            np.testing.assert_allclose(delta, got[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_rank_mismatch_is_refused(tmp_path, file_weights):
    path = lora_file(tmp_path / "rank.safetensors", file_weights)
    with pytest.raises(ConfigError, match=r"rank differs from lora.rank=2 .*double_blocks\.0\.img_attn\.proj") as e:
        setup(config(tmp_path / "run", f"lora.init_from={path}", "lora.rank=2"), progress=False)
    assert e.value.key == "lora.init_from"


def test_modules_the_run_does_not_adapt_are_refused(tmp_path, file_weights):
    path = lora_file(tmp_path / "all.safetensors", file_weights)
    with pytest.raises(ConfigError, match=r"does not adapt .*double_blocks\.1\.img_attn\.proj"):
        setup(config(tmp_path / "run", f"lora.init_from={path}", "lora.blocks=[0]"), progress=False)


def test_a_missing_source_fails_before_the_model_is_built(tmp_path):
    with pytest.raises(ConfigError, match="no such LoRA file or training run"):
        setup(config(tmp_path / "run", f"lora.init_from={tmp_path / 'nope.safetensors'}"), progress=False)
