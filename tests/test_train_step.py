"""The pure train step on a toy model with Flux's call signature: accumulation, EMA, keys, donation, compile-once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax.model.layers import Linear
from flux_jax.model.lora import apply_lora, set_lora_training
from flux_jax.run_config import OptimConfig
from flux_jax.sharding import make_mesh
from flux_jax.train.memory import memory_summary
from flux_jax.train.objective import Objective
from flux_jax.train.optim import build_optimizer
from flux_jax.train.state import abstract_like, flat_params, init_train_state, split_trainable
from flux_jax.train.step import StepCompiler, eval_loss
from tests.helpers.compile_cache import persistent_compile_cache

C = 8  # latent channels = text width


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """The tests below build the same toy step again and again: compile it once."""
    with persistent_compile_cache(tmp_path_factory.getbasetemp() / "train-xla-cache"):
        yield


class Toy(nnx.Module):
    """Flux's signature, a few parameters: pred = proj(x_t) * (1 + t) + mean text + guidance."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj = Linear(C, C, axes=("embed", "embed"), rngs=rngs)

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        return self.proj(img) * (1 + timesteps[:, None, None]) + txt.mean(1, keepdims=True) + guidance[:, None, None]


def toy_step(*, ema_decay=None, clip_norm=1.0, dropout=0.0):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = Toy(nnx.Rngs(0))
    apply_lora(model, rank=2, alpha=4.0, targets="proj", rngs=nnx.Rngs(1), dropout=dropout)
    set_lora_training(model, True)
    graphdef, lora_state, frozen = split_trainable(model)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state)
    tx = build_optimizer(OptimConfig(lr=0.05, clip_norm=clip_norm), 100)
    lora = {k: jnp.copy(v) for k, v in flat_params(lora_state).items()}
    state, shardings = init_train_state(lora, tx, seed=7, ema=ema_decay is not None, mesh=mesh)
    objective = Objective(timestep_sampling="logit_normal", guidance=1.0)
    compiler = StepCompiler(graphdef=graphdef, template=template, frozen=frozen, state_shardings=shardings, tx=tx,
                            objective=objective, ema_decay=ema_decay, mesh=mesh)  # fmt: skip
    return compiler, frozen, state


def toy_batch(micro: int, rows: int, seed: int = 0, tokens: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = micro * rows
    batch = {
        "latents": rng.standard_normal((n, tokens, C)).astype(np.float32),
        "t5": rng.standard_normal((n, 3, C)).astype(np.float32),
        "clip": rng.standard_normal((n, 4)).astype(np.float32),
        "img_ids": np.zeros((n, tokens, 3), np.float32),
    }
    return {k: v.reshape(micro, rows, *v.shape[1:]) for k, v in batch.items()}


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_accumulation_equals_one_big_batch():
    # Per-sample randomness is keyed by the sample's position in the global batch, so 2 micro-batches of 4 see
    # exactly the noise, t and guidance of one batch of 8: same loss, same gradient, same update.
    compiler, frozen, state = toy_step()
    one = toy_batch(1, 8)
    two = {k: v.reshape(2, 4, *v.shape[2:]) for k, v in one.items()}
    start = host(state)
    s1, m1 = compiler(frozen, jax.device_put(start, compiler.state_shardings), one)
    s2, m2 = compiler(frozen, jax.device_put(start, compiler.state_shardings), two)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for k in s1.lora:
        np.testing.assert_allclose(np.asarray(s2.lora[k]), np.asarray(s1.lora[k]), rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(s1.lora["proj.lora.lora_b"]), 0)  # it did train
    assert int(s1.step) == int(s2.step) == 1


def test_ema_follows_its_recurrence():
    d = 0.9
    compiler, frozen, state = toy_step(ema_decay=d)
    init = host(state.lora)
    np.testing.assert_array_equal(host(state.ema)["proj.lora.lora_a"], init["proj.lora.lora_a"])
    seen = []
    for i in range(2):
        state, _ = compiler(frozen, state, toy_batch(1, 4, seed=i))
        seen.append(host(state.lora))
    for k in init:
        want = d * (d * init[k] + (1 - d) * seen[0][k]) + (1 - d) * seen[1][k]
        np.testing.assert_allclose(np.asarray(state.ema[k]), want, rtol=1e-6, atol=1e-7)


def test_steps_draw_fresh_randomness_deterministically():
    compiler, frozen, state = toy_step()
    start = host(state)
    batch = toy_batch(1, 4)
    run = []
    for _ in range(2):
        s = jax.device_put(start, compiler.state_shardings)
        losses = []
        for _ in range(3):
            s, m = compiler(frozen, s, batch)
            losses.append(float(m["loss"]))
        run.append((losses, host(s.lora)))
    assert len(set(run[0][0])) == 3  # the same batch, a new noise/t draw each step
    assert run[0][0] == run[1][0]  # and the same draws for the same seed and step
    for k in run[0][1]:
        np.testing.assert_array_equal(run[0][1][k], run[1][1][k])


def test_state_is_donated_and_base_is_not():
    compiler, frozen, state = toy_step()
    old = state.lora["proj.lora.lora_b"]
    state, _ = compiler(frozen, state, toy_batch(1, 4))
    assert old.is_deleted()
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
    assert set(state.lora) == {"proj.lora.lora_a", "proj.lora.lora_b"}  # only the adapters are trained


def test_compiles_once_per_batch_shape():
    compiler, frozen, state = toy_step()
    for i in range(4):
        state, _ = compiler(frozen, state, toy_batch(1, 4, seed=i))
    assert compiler.traces == 1 and len(compiler.executables) == 1
    state, _ = compiler(frozen, state, toy_batch(1, 4, tokens=9))  # another bucket: one more executable
    assert compiler.traces == 2 and len(compiler.executables) == 2
    compiled = next(iter(compiler.executables.values()))
    mem = memory_summary(compiled)
    assert mem is not None and mem["total"] > 0
    # The AOT executable refuses other shapes instead of silently recompiling.
    with pytest.raises(Exception):  # noqa: B017 - jax raises TypeError or ValueError depending on the mismatch
        compiled(frozen, state, toy_batch(1, 4, tokens=7))


def test_eval_loss_is_a_fixed_draw():
    compiler, frozen, state = toy_step()
    batch = {k: v[0] for k, v in toy_batch(1, 4).items()}
    f = jax.jit(lambda lora, key: eval_loss(compiler.graphdef, compiler.template, frozen, lora, batch, key,
                                            objective=compiler.objective))  # fmt: skip
    a = float(f(state.lora, jax.random.key(3)))
    assert a == float(f(state.lora, jax.random.key(3))) and a != float(f(state.lora, jax.random.key(4)))
    abstract_like(state, compiler.state_shardings)  # the abstract state used for compiling matches the real one


def test_lora_dropout_trains_with_fresh_masks_and_evaluates_without():
    compiler, frozen, state = toy_step(dropout=0.5)
    plain, plain_frozen, plain_state = toy_step()
    batch = toy_batch(1, 4)
    state, m = compiler(frozen, state, batch)
    _, m_plain = plain(plain_frozen, plain_state, batch)
    # Step 1 starts from B = 0, so dropout cannot change the loss yet, only the gradient of B.
    assert float(m["loss"]) == pytest.approx(float(m_plain["loss"]), rel=1e-6)
    assert float(m["grad_norm"]) != pytest.approx(float(m_plain["grad_norm"]), rel=1e-3)
    losses = set()
    for _ in range(3):
        state, m = compiler(frozen, state, batch)
        losses.add(float(m["loss"]))
    assert len(losses) == 3 and all(np.isfinite(list(losses)))
    # Evaluation switches dropout off: the dropout model scores its weights exactly like the plain model does.
    single = {k: v[0] for k, v in batch.items()}

    def score(c, fz):
        return float(
            eval_loss(c.graphdef, c.template, fz, state.lora, single, jax.random.key(0), objective=c.objective)
        )

    assert score(compiler, frozen) == pytest.approx(score(plain, plain_frozen), rel=1e-6)
