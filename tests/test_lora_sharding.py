"""LoRA params, their optimizer state and EMA are split over fsdp (rule ``lora_feature``), on 8 fake CPU devices.

Per-chip bytes of a real initialised TrainState of the tiny run drop to about 1/fsdp of the replicated state (and the
planner counts the same from shapes); train steps (a toy with the trainer's step) compute the same state as with
everything replicated; a checkpoint written with the old layout (adapters whole on their tensor-/un-sharded side,
optimizer state replicated) restores into the new shardings; every optimizer's params-shaped state follows its param.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flux_jax.axes import DEFAULT_RULES
from flux_jax.model.config import preset
from flux_jax.model.layers import Linear
from flux_jax.model.lora import LoRAMask, apply_lora, set_lora_training
from flux_jax.run_config import OptimConfig, load_config
from flux_jax.sharding import make_mesh, state_shardings
from flux_jax.train import build
from flux_jax.train.abstract import abstract_step
from flux_jax.train.checkpointing import Checkpointer
from flux_jax.train.objective import Objective
from flux_jax.train.optim import build_optimizer
from flux_jax.train.state import (
    abstract_like,
    flat_params,
    init_train_state,
    split_trainable,
    state_bytes,
    state_shardings_for,
)
from flux_jax.train.step import StepCompiler

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# Before this change: adapters followed their kernel only (lora_feature unmapped, so B of qkv was whole per chip).
KERNEL_ONLY_RULES = tuple((name, None if name == "lora_feature" else target) for name, target in DEFAULT_RULES)
REPLICATED_RULES = tuple((name, None) for name, _ in DEFAULT_RULES)


pytestmark = pytest.mark.usefixtures("train_compile_cache")  # conftest.py


@dataclasses.dataclass
class Run:
    compiler: StepCompiler
    frozen: nnx.State
    state: object
    mesh: jax.sharding.Mesh


CFG = load_config(TINY, ["optim.ema_decay=0.9", "log.tensorboard=false"])


@functools.cache
def host_model() -> tuple[nnx.GraphDef, nnx.State]:
    """The tiny run's model (fp32, LoRA rank 4 on all blocks) with host values: its structure and logical axes from
    the trainer's builder (traced for shapes), its numbers from numpy (a random init under jit would compile for
    longer than the whole test runs)."""
    adapters = build.Adapters.from_config(CFG.lora)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build.lora_model(preset("tiny"), CFG.model, adapters,
                                                                           seed=0)[0]))  # fmt: skip
    rng = np.random.default_rng(0)

    def value(path: tuple, var: nnx.Variable) -> nnx.Variable:
        shape, name = var.get_value().shape, path[-1]
        if isinstance(var, LoRAMask) or name == "scale":
            x = np.ones(shape)
        elif name == "lora_b":
            x = np.zeros(shape)  # as at init: training starts at the base
        elif name == "lora_a":
            x = rng.uniform(-0.125, 0.125, shape)
        else:
            x = rng.normal(0.0, 0.05, shape)
        return var.replace(x.astype(np.float32))

    return graphdef, nnx.from_flat_state([(p, value(p, v)) for p, v in nnx.to_flat_state(abstract)])


def tiny_run(mesh_shape: tuple[int, int, int], rules) -> Run:
    """The tiny model placed on a mesh by ``rules``, its AdamW + EMA TrainState and step compiler."""
    mesh = make_mesh(*mesh_shape)
    graphdef, state = host_model()
    model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))
    graphdef, lora_state, frozen = split_trainable(model)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state)
    tx = build_optimizer(CFG.optim, CFG.train.steps)
    state, shardings = init_train_state(flat_params(lora_state), tx, seed=CFG.train.seed, ema=True, mesh=mesh)
    compiler = StepCompiler(graphdef=graphdef, template=template, frozen=frozen, state_shardings=shardings, tx=tx,
                            objective=Objective.from_config(CFG.train), ema_decay=CFG.optim.ema_decay,
                            mesh=mesh)  # fmt: skip
    return Run(compiler, frozen, state, mesh)


def chip_bytes(tree, device) -> int:
    """Bytes ``device`` holds of a tree of real arrays, from their addressable shards."""
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def spec_axes(x: jax.Array) -> set[str]:
    return {a for e in x.sharding.spec if e is not None for a in ((e,) if isinstance(e, str) else e)}


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1)])
def test_per_chip_state_bytes_drop_to_one_over_fsdp(mesh_shape):
    fsdp = mesh_shape[1]
    run = tiny_run(mesh_shape, DEFAULT_RULES)
    state = run.state
    # Every LoRA param is split over fsdp along its feature dim (the tiny model's dims all divide 4 and 8), never
    # along its rank dim, and its moments and EMA copy follow it.
    for k, x in state.lora.items():
        assert "fsdp" in spec_axes(x), k
        rank_dim = -1 if k.endswith("lora_a") else -2
        assert x.addressable_shards[0].data.shape[rank_dim] == 4, k  # rank 4 (configs/tiny.yaml), whole
        assert state.ema[k].sharding == x.sharding, k
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # AdamW's mu and nu
    assert len(moments) == 2 * len(state.lora) and all("fsdp" in spec_axes(x) for x in moments)

    replicated = jax.device_put(state, NamedSharding(run.mesh, PartitionSpec()))
    full = {d: chip_bytes(replicated, d) for d in run.mesh.devices.flat}
    split = {d: chip_bytes(state, d) for d in run.mesh.devices.flat}
    assert len(set(full.values())) == 1 and len(set(split.values())) == 1  # every chip holds the same share
    per_chip, whole = next(iter(split.values())), next(iter(full.values()))
    # What is left whole on every chip: the step, the key, Adam's and the schedule's counts (4 + 8 + 4 + 4 bytes).
    assert whole / fsdp < per_chip < whole / fsdp * 1.002, (per_chip, whole)
    assert per_chip - whole / fsdp == pytest.approx(20 * (1 - 1 / fsdp))
    assert dataclasses.astuple(state_bytes(state)) == (per_chip, whole)
    # The planner builds the same shardings from shapes alone (its own builder, no arrays), so its count is what
    # the chips hold.
    data, fsdp_, tensor = mesh_shape
    cfg = load_config(TINY, ["optim.ema_decay=0.9", f"mesh.data={data}", f"mesh.fsdp={fsdp_}", f"mesh.tensor={tensor}"])
    planned = abstract_step(cfg, run.mesh, model_config=preset("tiny")).state
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, planned)) == jax.tree.leaves(run.compiler.state_shardings)
    assert state_bytes(planned) == state_bytes(state)

    # The old layout (adapters following their kernel only) kept about half of every adapter whole per chip.
    old = tiny_run(mesh_shape, KERNEL_ONLY_RULES).state
    assert chip_bytes(old, run.mesh.devices.flat[0]) > 0.45 * whole


C = 16  # toy width: divisible by fsdp=4, so every adapter of the toy is split


class Toy(nnx.Module):
    """Flux's call signature and an MLP whose adapters face every kind of kernel axis: ``embed`` (fsdp), ``mlp``
    (tensor) and ``in_feat`` (replicated), so both old-layout halves (split / whole) are now split over fsdp."""

    def __init__(self, rngs: nnx.Rngs):
        self.vec = Linear(4, C, axes=("in_feat", "embed"), rngs=rngs)
        self.up = Linear(C, 4 * C, axes=("embed", "mlp"), rngs=rngs)
        self.down = Linear(4 * C, C, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        h = jax.nn.gelu(self.up(img + self.vec(y)[:, None, :] + txt.mean(1, keepdims=True)))
        return self.down(h) * (1 + timesteps[:, None, None]) + guidance[:, None, None]


def toy_run(mesh: jax.sharding.Mesh, rules, optim: OptimConfig) -> Run:
    model = Toy(nnx.Rngs(0))
    apply_lora(model, rank=4, alpha=8.0, targets="vec|up|down", rngs=nnx.Rngs(1))
    set_lora_training(model, True)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))
    graphdef, lora_state, frozen = split_trainable(model)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state)
    tx = build_optimizer(optim, 100)
    state, shardings = init_train_state(flat_params(lora_state), tx, seed=7, ema=True, mesh=mesh)
    compiler = StepCompiler(graphdef=graphdef, template=template, frozen=frozen, state_shardings=shardings, tx=tx,
                            objective=Objective(timestep_sampling="logit_normal", guidance=1.0), ema_decay=0.9,
                            mesh=mesh)  # fmt: skip
    return Run(compiler, frozen, state, mesh)


def toy_batch(seed: int, micro: int = 2, rows: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"latents": (6, C), "t5": (3, C), "clip": (4,), "img_ids": (6, 3)}
    return {k: rng.standard_normal((micro, rows, *s)).astype(np.float32) for k, s in shapes.items()}


def test_sharded_steps_equal_replicated_steps():
    # Data 2 x fsdp 4 with 2 micro-batches and the tiny run's AdamW: the LoRA side is split over fsdp (its
    # gradient reduce-scattered), the base over fsdp and tensor; the reference replicates every parameter and every
    # activation. A toy rather than the tiny Flux: the two compiles of its step would take most of a minute.
    mesh = make_mesh(2, 4, 1)
    runs = [toy_run(mesh, DEFAULT_RULES, CFG.optim), toy_run(mesh, REPLICATED_RULES, CFG.optim)]
    sharded = runs[0].state
    assert all("fsdp" in spec_axes(x) for x in jax.tree.leaves((sharded.lora, sharded.opt_state)) if x.ndim)
    assert not any(spec_axes(x) for x in jax.tree.leaves(runs[1].state))
    host = [None, None]
    metrics = [[], []]
    for i, r in enumerate(runs):
        state = r.state
        for step in range(4):
            state, m = r.compiler(r.frozen, state, toy_batch(seed=step))
            metrics[i].append((float(m["loss"]), float(m["grad_norm"])))
        host[i] = jax.tree.map(np.asarray, state)
    np.testing.assert_allclose(metrics[0], metrics[1], rtol=1e-6)
    leaves = [jax.tree_util.tree_leaves_with_path(h) for h in host]
    for (path, a), (_, b) in zip(*leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert np.abs(host[0].lora["up.lora.lora_b"]).max() > 1e-3  # it trained (B starts at zero)


def test_checkpoint_of_the_old_layout_restores_into_the_new(tmp_path):
    # A run checkpointed before adapters were split over fsdp has its arrays saved whole on their other side;
    # orbax restores each one into the target's (new) sharding.
    old = tiny_run((1, 8, 1), KERNEL_ONLY_RULES)
    new = tiny_run((1, 8, 1), DEFAULT_RULES)
    key = "double_blocks.img_attn.qkv.lora.lora_b"
    assert "fsdp" not in spec_axes(old.state.lora[key]) and "fsdp" in spec_axes(new.state.lora[key])
    # The old trainer also left the optimizer state replicated (the compiler's choice for tx.init's zeros).
    before = old.state.replace(
        step=old.state.step + 5, opt_state=jax.device_put(old.state.opt_state, NamedSharding(old.mesh, PartitionSpec()))
    )
    saved = jax.tree.map(np.asarray, old.state)
    checkpointer = Checkpointer(tmp_path, async_save=False, ema=True)
    try:
        checkpointer.save(before, data_state={"epoch": 0}, meta={})
        state, data_state, _ = checkpointer.restore(5, abstract_like(new.state, new.compiler.state_shardings))
    finally:
        checkpointer.close()
    assert int(state.step) == 5 and data_state == {"epoch": 0}
    restored = jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state.replace(step=saved.step)))
    for (path, got), want in zip(restored, jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(new.compiler.state_shardings), strict=True):
        assert got.sharding == want
    assert math.isclose(state_bytes(state).per_chip, state_bytes(new.state).per_chip)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_every_params_shaped_optimizer_leaf_takes_its_params_sharding(name, grad_accum):
    # From shapes only (the planner's case): moments, momentum, Adafactor's unfactored second moment and
    # MultiSteps' accumulator are split like their param; counters and factored statistics are replicated.
    mesh = make_mesh(1, 8, 1)
    lora = {
        "a": jax.ShapeDtypeStruct((3, 256, 16), np.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp"))),
        "b": jax.ShapeDtypeStruct(
            (3, 16, 512), np.float32, sharding=NamedSharding(mesh, PartitionSpec(None, None, "fsdp"))
        ),
    }
    tx = build_optimizer(dataclasses.replace(CFG.optim, name=name), 10, grad_accum=grad_accum)
    shardings = state_shardings_for(tx, lora, mesh, ema=False).opt_state
    shapes = jax.eval_shape(tx.init, lora)
    by_shape = {tuple(v.shape): v.sharding for v in lora.values()}
    pairs = list(zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True))
    assert sum(tuple(x.shape) in by_shape for x, _ in pairs) >= 2  # at least one params-shaped tree
    for x, sharding in pairs:
        assert sharding == by_shape.get(tuple(x.shape), NamedSharding(mesh, PartitionSpec())), (name, x.shape)
