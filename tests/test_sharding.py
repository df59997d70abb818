"""Mesh construction and logical-axis sharding on the 8 fake CPU devices set up by conftest.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flux_jax import sharding
from flux_jax.axes import DEFAULT_RULES, ShardingError
from flux_jax.sharding import constrain, logical_to_spec, make_mesh


@pytest.fixture(scope="module", autouse=True)
def _need_8_devices() -> None:
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest.py forces 8 fake CPU devices)")


@pytest.mark.parametrize(
    ("sizes", "shape"),
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((1, -1, 1), (1, 8, 1)),
        ((2, -1, 1), (2, 4, 1)),
        ((2, 2, -1), (2, 2, 2)),
        ((2, 4, 1), (2, 4, 1)),
        ((2, 2, 2), (2, 2, 2)),
    ],
)
def test_make_mesh_shapes(sizes: tuple[int, int, int], shape: tuple[int, int, int]) -> None:
    mesh = make_mesh(*sizes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ((-1, -1, 1), "at most one mesh axis may be -1"),
        ((3, -1, 1), "not divisible"),
        ((2, 2, 1), "does not match the 8 devices"),
        ((0, 8, 1), "mesh.data must be a positive int or -1"),
        ((8, 1, -2), "mesh.tensor"),
    ],
)
def test_make_mesh_errors(sizes: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ShardingError, match=match):
        make_mesh(*sizes)


def test_make_mesh_on_a_device_subset() -> None:
    mesh = make_mesh(-1, 2, 1, devices=jax.devices()[:4])
    assert tuple(mesh.shape.values()) == (2, 2, 1)


def test_make_mesh_falls_back_to_device_order(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no topology")

    monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", refuse)
    mesh = make_mesh(2, 4, 1)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    assert tuple(mesh.shape.values()) == (2, 4, 1)


@pytest.fixture(scope="module")
def mesh_2x4() -> jax.sharding.Mesh:
    return make_mesh(2, 4, 1)


@pytest.fixture(scope="module")
def mesh_222() -> jax.sharding.Mesh:
    return make_mesh(2, 2, 2)


def test_logical_to_spec_default_rules(mesh_222: jax.sharding.Mesh) -> None:
    spec = lambda axes, shape: logical_to_spec(axes, shape, DEFAULT_RULES, mesh_222)
    assert spec(("embed", "mlp"), (64, 256)) == P("fsdp", "tensor")
    assert spec(("embed", "qkv"), (64, 192)) == P("fsdp", "tensor")
    assert spec(("layers", "embed", "mod"), (3, 64, 384)) == P(None, "fsdp", "tensor")
    assert spec(("in_feat", "embed"), (256, 64)) == P(None, "fsdp")
    assert spec(("embed", "lora_rank"), (64, 4)) == P("fsdp")
    assert spec(("head_dim",), (16,)) == P()
    assert spec(("act_batch", "act_seq", "act_embed"), (8, 32, 64)) == P(("data", "fsdp"))
    assert spec(("act_batch", "act_seq", "act_heads", None), (8, 32, 4, 16)) == P(("data", "fsdp"), None, "tensor")


def test_logical_to_spec_uses_each_mesh_axis_once(mesh_222: jax.sharding.Mesh) -> None:
    # A square [embed, embed] projection: the second dim cannot reuse fsdp.
    assert logical_to_spec(("embed", "embed"), (64, 64), DEFAULT_RULES, mesh_222) == P("fsdp")
    rules = (("a", ("data", "fsdp")), ("b", "fsdp"), ("c", ("fsdp", "tensor")))
    assert logical_to_spec(("a", "b"), (8, 8), rules, mesh_222) == P(("data", "fsdp"))
    assert logical_to_spec(("b", "c"), (8, 8), rules, mesh_222) == P("fsdp", "tensor")


def test_logical_to_spec_indivisible_dims(mesh_2x4: jax.sharding.Mesh, mesh_222: jax.sharding.Mesh) -> None:
    # 6 is not divisible by fsdp=4: replicate that dim rather than fail to compile.
    assert logical_to_spec(("embed", "mlp"), (6, 8), DEFAULT_RULES, mesh_2x4) == P(None, "tensor")
    # A batch of 2 on data=2 x fsdp=4 keeps only the axes whose running product divides it.
    assert logical_to_spec(("act_batch", "act_seq"), (2, 5), DEFAULT_RULES, mesh_2x4) == P("data")
    assert logical_to_spec(("act_batch",), (1,), DEFAULT_RULES, mesh_2x4) == P()
    assert logical_to_spec(("embed", "qkv"), (64, 3), DEFAULT_RULES, mesh_222) == P("fsdp")


def test_logical_to_spec_composite_dims(mesh_222: jax.sharding.Mesh, mesh_2x4: jax.sharding.Mesh) -> None:
    # A LoRA feature dim: its kernel's axes, then lora_feature's (fsdp), each mesh axis at most once.
    spec = lambda axes, shape, mesh=mesh_222: logical_to_spec(axes, shape, DEFAULT_RULES, mesh)
    assert spec(("layers", "lora_rank", ("qkv", "lora_feature")), (2, 4, 96)) == P(None, None, ("tensor", "fsdp"))
    assert spec(("layers", ("embed", "lora_feature"), "lora_rank"), (2, 64, 4)) == P(None, "fsdp")
    assert spec((("in_feat", "lora_feature"), "lora_rank"), (64, 4)) == P("fsdp")
    assert spec((("in_feat", "lora_feature"), "lora_rank"), (6, 4), mesh_2x4) == P()  # 6 rows: fsdp=4 left out
    assert spec(("lora_rank", ("mlp", "lora_feature")), (4, 6), mesh_2x4) == P(None, "tensor")
    # mesh.rules can send lora_feature elsewhere (None: adapters follow their kernel alone, as before).
    kernel_only = tuple((name, None if name == "lora_feature" else target) for name, target in DEFAULT_RULES)
    assert logical_to_spec(("lora_rank", ("qkv", "lora_feature")), (4, 96), kernel_only, mesh_222) == P(None, "tensor")
    with pytest.raises(ShardingError, match="unknown logical axis"):
        spec((("qkv", "lora_feture"), "lora_rank"), (96, 4))


def test_logical_to_spec_errors(mesh_222: jax.sharding.Mesh) -> None:
    with pytest.raises(ShardingError, match="rank"):
        logical_to_spec(("embed",), (4, 4), DEFAULT_RULES, mesh_222)
    with pytest.raises(ShardingError, match="unknown logical axis"):
        logical_to_spec(("embd",), (4,), DEFAULT_RULES, mesh_222)
    with pytest.raises(ShardingError, match="does not have"):
        logical_to_spec(("embed",), (4,), (("embed", "model"),), mesh_222)
    # A name outside the vocabulary is fine when the rules define it.
    assert logical_to_spec(("custom",), (4,), (("custom", "tensor"),), mesh_222) == P("tensor")


def test_validate_rules() -> None:
    sharding.validate_rules(DEFAULT_RULES)
    with pytest.raises(ShardingError, match="more than one"):
        sharding.validate_rules((("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ShardingError, match="unknown mesh axis"):
        sharding.validate_rules((("embed", ("fsdp", "model")),))


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.lecun_normal()
        self.w_in = nnx.Param(init(rngs.params(), (16, 64)), logical_axes=("in_feat", "embed"))
        self.w_mlp = nnx.Param(init(rngs.params(), (3, 64, 256)), logical_axes=("layers", "embed", "mlp"))
        self.bias = nnx.Param(jnp.zeros((256,)))  # no logical_axes: replicated
        self.lora_a = nnx.LoRAParam(jnp.zeros((64, 4)), logical_axes=("embed", "lora_rank"))
        self.odd = nnx.Param(jnp.zeros((6, 10)), logical_axes=("embed", "mlp"))


def test_state_shardings(mesh_2x4: jax.sharding.Mesh) -> None:
    abstract = nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh_2x4, DEFAULT_RULES)
    specs = {
        ".".join(map(str, path)): v.get_value().spec
        for path, v in nnx.to_flat_state(shardings)
        if isinstance(v.get_value(), NamedSharding)
    }
    assert specs == {
        "w_in": P(None, "fsdp"),
        "w_mlp": P(None, "fsdp", "tensor"),
        "bias": P(),
        "lora_a": P("fsdp"),
        "odd": P(None, "tensor"),  # 6 is not divisible by fsdp=4; tensor has size 1 and always divides
    }

    # Sharded init, the way the trainer builds the 12B base: jit with out_shardings.
    def init() -> nnx.State:
        return nnx.state(Tiny(nnx.Rngs(0)))

    state = jax.jit(init, out_shardings=shardings)()
    assert state["w_mlp"].get_value().sharding.spec == P(None, "fsdp", "tensor")
    assert state["w_mlp"].get_value().addressable_shards[0].data.shape == (3, 16, 256)
    # device_put also accepts the tree.
    placed = jax.device_put(nnx.state(Tiny(nnx.Rngs(1))), shardings)
    assert placed["w_in"].get_value().sharding.spec == P(None, "fsdp")
    model = nnx.merge(graphdef, state)
    assert isinstance(model.lora_a, nnx.LoRAParam)


def test_batch_sharding(mesh_2x4: jax.sharding.Mesh) -> None:
    s = sharding.batch_sharding(mesh_2x4)
    x = jax.device_put(np.zeros((16, 3, 5), np.float32), s)
    assert x.addressable_shards[0].data.shape == (2, 3, 5)


def test_constrain_is_a_noop_outside_use_mesh() -> None:
    x = jnp.ones((8, 4))
    assert constrain(x, ("act_batch", "act_embed")) is x
    assert sharding.active_mesh() is None


def test_constrain_inside_jit(mesh_2x4: jax.sharding.Mesh) -> None:
    def f(x: jax.Array) -> jax.Array:
        y = constrain(x * 2.0, ("act_batch", "act_seq", "act_embed"))
        return constrain(y + 1.0, (None, "act_seq", "act_embed"))

    x = jnp.ones((8, 4, 16))
    with sharding.use_mesh(mesh_2x4):
        assert sharding.active_mesh() is mesh_2x4
        lowered = jax.jit(f).lower(x)
        out = jax.jit(f)(x)
    assert sharding.active_mesh() is None
    hlo = lowered.as_text()
    assert hlo.count("sharding_constraint") + hlo.count("mhlo.sharding") >= 2
    np.testing.assert_allclose(np.asarray(out), 3.0)
    # The first constraint splits the batch over data x fsdp = 8 devices.
    y = jax.jit(lambda x: constrain(x, ("act_batch", "act_seq", "act_embed")))
    with sharding.use_mesh(mesh_2x4):
        out = y(x)
    assert out.sharding.spec == P(("data", "fsdp"))
    assert out.addressable_shards[0].data.shape == (1, 4, 16)


def test_use_mesh_overrides_rules(mesh_222: jax.sharding.Mesh) -> None:
    rules = (("act_batch", "data"), ("act_embed", "tensor"))
    f = jax.jit(lambda x: constrain(x, ("act_batch", "act_seq", "act_embed")))
    with sharding.use_mesh(mesh_222, rules):
        out = f(jnp.ones((4, 2, 8)))
    assert out.sharding.spec == P("data", None, "tensor")
    with (
        pytest.raises(ShardingError, match="unknown mesh axis"),
        sharding.use_mesh(mesh_222, (("a", "model"),)),
    ):
        pass


def test_jitted_outside_then_called_inside_is_retraced(mesh_2x4: jax.sharding.Mesh) -> None:
    # use_mesh enters jax.set_mesh, which is part of jit's cache key, so the no-op trace made outside
    # is not reused inside the mesh context.
    f = jax.jit(lambda x: constrain(x + 1.0, ("act_batch", "act_embed")))
    x = jnp.ones((8, 4))
    assert len(f(x).sharding.device_set) == 1
    with sharding.use_mesh(mesh_2x4):
        out = f(x)
    assert out.sharding.spec == P(("data", "fsdp"))
