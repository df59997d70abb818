"""Every checkpoint layout on a tiny random Flux: outputs equal the diffusers reference, round trips are bit-exact,
fp8 loads equal the torch model whose weights went through the same fp8 cast, and sharded loads put each
parameter where the rules say with the values of the unsharded load."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors.torch import load_file, save_file

from flux_jax import load_flux
from flux_jax.axes import DEFAULT_RULES
from flux_jax.errors import CheckpointError
from flux_jax.sharding import logical_to_spec, make_mesh, state_shardings
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.convert import convert_checkpoint
from flux_jax.weights.flax_checkpoint import META_FILE, write_flax_checkpoint
from flux_jax.weights.flax_layout import abstract_model, flax_sources
from flux_jax.weights.fp8 import cast
from flux_jax.weights.load import load_state_into
from flux_jax.weights.writers import write_flux_bfl, write_flux_diffusers
from tests.helpers.checkpoint_files import (
    FP8,
    bfl_state_dict,
    config_metadata,
    diffusers_state_dict,
    fp8_roundtrip,
    save_bfl,
    scaled_fp8,
)
from tests.helpers.torch_reference import diffusers_flux, diffusers_forward, forward_inputs, tiny_config

MODEL_TOL = 1e-4
F32, BF16 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)
ARGS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")


@nnx.jit
def _forward(model, *args):
    return model(*args)


def forward(model, inputs) -> np.ndarray:
    """Jitted: compiled once per (config, dtypes), however many models are loaded."""
    return np.asarray(_forward(model, *(jnp.asarray(inputs[k]) for k in ARGS)))


def reference_with(ref, bfl_sd: dict, cfg):
    """A copy of the diffusers reference whose weights are the given (BFL-keyed, fp32) values."""
    model = diffusers_flux(cfg)
    model.load_state_dict(diffusers_state_dict(bfl_sd, cfg))
    return model


def tensors_equal_bitwise(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config()
    ref = diffusers_flux(cfg, seed=0)
    inputs = forward_inputs(cfg, batch=2, h=3, w=4, txt_len=5, seed=1)
    root = tmp_path_factory.mktemp("layouts")
    sd = {k: v.detach() for k, v in ref.state_dict().items()}
    bfl = bfl_state_dict(sd, cfg)
    paths = {
        "diffusers_sharded": root / "diffusers_sharded",
        "diffusers_single": root / "diffusers_single",
        "bfl_torch": save_bfl(root / "bfl_torch.safetensors", bfl, cfg),
        "bfl_comfy_prefix": save_bfl(root / "comfy.safetensors", bfl, cfg, prefix="model.diffusion_model."),
    }
    ref.save_pretrained(paths["diffusers_sharded"], max_shard_size="200KB")
    ref.save_pretrained(paths["diffusers_single"])
    with open_checkpoint(paths["diffusers_sharded"]) as ckpt:
        paths["bfl_writer"] = write_flux_bfl(ckpt, root / "bfl_writer.safetensors")
        paths["flax"] = write_flax_checkpoint(ckpt, root / "flax", dtype=F32)
    return dict(cfg=cfg, ref=ref, sd=sd, bfl=bfl, inputs=inputs, want=diffusers_forward(ref, inputs), paths=paths)


def test_torch_literal_bfl_equals_our_writer(setup):
    """Our key table and writer agree bit for bit with the hand-written torch conversion."""
    tensors_equal_bitwise(load_file(setup["paths"]["bfl_writer"]), load_file(setup["paths"]["bfl_torch"]))


@pytest.mark.parametrize(
    "layout", ["diffusers_sharded", "diffusers_single", "bfl_torch", "bfl_comfy_prefix", "bfl_writer", "flax"]
)
def test_every_layout_matches_diffusers(setup, layout):
    model = load_flux(setup["paths"][layout])
    np.testing.assert_allclose(forward(model, setup["inputs"]), setup["want"], atol=MODEL_TOL, rtol=0)


def test_diffusers_keyed_single_file(setup):
    """A bare diffusers-keyed file (no config.json beside it): the config comes from the caller (head_dim 16)."""
    path = setup["paths"]["diffusers_single"] / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match="pass config="):
        open_checkpoint(path)
    model = load_flux(path, config=setup["cfg"])
    np.testing.assert_allclose(forward(model, setup["inputs"]), setup["want"], atol=MODEL_TOL, rtol=0)


def test_layout_detection(setup):
    expected = {"diffusers_sharded": "diffusers", "bfl_torch": "bfl", "bfl_comfy_prefix": "bfl", "flax": "flax"}
    for name, layout in expected.items():
        with open_checkpoint(setup["paths"][name]) as ckpt:
            assert ckpt.layout == layout
            assert ckpt.config == setup["cfg"]
            assert ckpt.stored_dtype == F32


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_dev_vs_schnell_detected_from_keys(tmp_path, guidance):
    """Without any config metadata, the config (guidance embedder included) comes from the keys and shapes."""
    cfg = tiny_config(
        hidden_size=256, num_heads=2, axes_dim=(16, 56, 56), depth=1, depth_single_blocks=1, guidance_embed=guidance
    )  # fmt: skip  (head_dim 128: RoPE axes inferable)
    ref = diffusers_flux(cfg, seed=3)
    path = save_bfl(tmp_path / "m.safetensors", bfl_state_dict(ref.state_dict(), cfg), None)
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == cfg
        assert ("guidance_in.in_layer.weight" in ckpt.tensors) == guidance


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_bfl_equals_torch_cast(setup, tmp_path, dtype):
    """A BFL file saved by torch in bf16/fp16 loads to exactly the torch model with the same rounding."""
    cfg = setup["cfg"]
    torch_dtype, jax_dtype = {"bf16": (torch.bfloat16, jnp.bfloat16), "fp16": (torch.float16, jnp.float16)}[dtype]
    half = {k: v.to(torch_dtype) for k, v in setup["bfl"].items()}
    path = save_bfl(tmp_path / "half.safetensors", half, cfg)
    ref = reference_with(setup["ref"], {k: v.float() for k, v in half.items()}, cfg)
    want = diffusers_forward(ref, setup["inputs"])
    np.testing.assert_allclose(forward(load_flux(path), setup["inputs"]), want, atol=MODEL_TOL, rtol=0)
    stored = load_flux(path, dtype=jax_dtype)
    kernel = np.asarray(stored.double_blocks.img_mlp[0].kernel[...])  # [layers, in, out], stored as in the file
    file_bits = half["double_blocks.1.img_mlp.0.weight"].view(torch.int16).numpy()
    assert np.array_equal(kernel[1].T.view(np.int16), file_bits)


@pytest.fixture(scope="module")
def fp8_file(setup, tmp_path_factory):
    """Plain-cast fp8 BFL file (every tensor F8_E4M3, biases and norm scales included), written by torch."""
    path = tmp_path_factory.mktemp("fp8") / "flux-fp8.safetensors"
    save_bfl(path, {k: v.to(FP8) for k, v in setup["bfl"].items()}, setup["cfg"])
    ref = reference_with(setup["ref"], fp8_roundtrip(setup["bfl"]), setup["cfg"])
    return path, diffusers_forward(ref, setup["inputs"])


def test_fp8_loads_equal_torch_fp8_model(setup, fp8_file):
    path, want = fp8_file
    np.testing.assert_allclose(forward(load_flux(path), setup["inputs"]), want, atol=MODEL_TOL, rtol=0)


def test_fp8_reading_needs_no_torch(fp8_file, tmp_path):
    """safetensors' numpy API cannot read F8_E4M3; ours reads, loads and converts fp8 without importing torch."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from flux_jax.weights.checkpoint import open_checkpoint\n"
        "from flux_jax.weights.convert import convert_checkpoint\n"
        f"with open_checkpoint({str(fp8_file[0])!r}) as c:\n"
        "    w = next(iter(c.tensors.values())); assert w.dtype.name == 'float8_e4m3fn'\n"
        "    w.read(tuple(slice(0, n) for n in w.shape))\n"
        f"convert_checkpoint({str(fp8_file[0])!r}, {str(tmp_path / 'flax')!r}, dtype='bf16')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_fp8_storage_keeps_kernel_bits_biases_bf16(setup, fp8_file):
    path, want = fp8_file
    model = load_flux(path, dtype=jnp.float8_e4m3fn, compute_dtype=jnp.float32)
    kernel = model.single_blocks.linear1.kernel[...]
    assert kernel.dtype == jnp.float8_e4m3fn
    assert model.single_blocks.linear1.bias[...].dtype == jnp.bfloat16
    assert model.double_blocks.img_attn.norm.query_norm.scale[...].dtype == jnp.bfloat16
    file_bits = load_file(path)["single_blocks.2.linear1.weight"].view(torch.uint8).numpy()
    assert np.array_equal(np.asarray(kernel)[2].T.view(np.uint8), file_bits)
    # fp8 values are exact in bf16 and fp32, so the fp8-stored model computes the same function.
    np.testing.assert_allclose(forward(model, setup["inputs"]), want, atol=MODEL_TOL, rtol=0)


def _scaled_file(setup, path: pathlib.Path, form: str):
    stored, real, scales = scaled_fp8(setup["bfl"])
    tensors = dict(stored)
    metadata = config_metadata(setup["cfg"])
    if form == "scale_weight":  # original ComfyUI scaled fp8
        tensors["scaled_fp8"] = torch.empty(0, dtype=FP8)
        for layer, s in scales.items():
            tensors[f"{layer}.scale_weight"] = s.reshape(1)
            tensors[f"{layer}.scale_input"] = torch.ones(())
    else:  # ComfyUI's renamed form, with per-layer JSON tensors or one metadata JSON
        for layer, s in scales.items():
            tensors[f"{layer}.weight_scale"] = s
            tensors[f"{layer}.input_scale"] = torch.tensor(0.5)
        confs = {layer: {"format": "float8_e4m3fn", "full_precision_matrix_mult": True} for layer in scales}
        if form == "comfy_quant":
            for layer, conf in confs.items():
                tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        else:
            metadata["_quantization_metadata"] = json.dumps(
                {"format_version": "1.0", "layers": {"model.diffusion_model." + k: v for k, v in confs.items()}}
            )
    save_file({"model.diffusion_model." + k: v for k, v in tensors.items()}, str(path), metadata=metadata)
    return path, real


@pytest.mark.parametrize("form", ["scale_weight", "comfy_quant", "quantization_metadata"])
def test_scaled_fp8_loads_equal_dequantized_torch_model(setup, tmp_path, form):
    path, real = _scaled_file(setup, tmp_path / "scaled.safetensors", form)
    with open_checkpoint(path) as ckpt:
        assert len(ckpt.scaled_layers) == sum(
            1 for k in setup["bfl"] if k.endswith(".weight") and setup["bfl"][k].ndim == 2
        )
    want = diffusers_forward(reference_with(setup["ref"], real, setup["cfg"]), setup["inputs"])
    np.testing.assert_allclose(forward(load_flux(path), setup["inputs"]), want, atol=MODEL_TOL, rtol=0)
    if form == "scale_weight":  # converted, dequantised weights default to bf16 (not fp8 values any more)
        convert_checkpoint(path, tmp_path / "flax")
        assert json.loads((tmp_path / "flax" / META_FILE).read_text())["dtype"] == "bfloat16"
        bf16 = {k: v.to(torch.bfloat16) for k, v in real.items()}
        convert_checkpoint(tmp_path / "flax", tmp_path / "out.safetensors")
        tensors_equal_bitwise(load_file(tmp_path / "out.safetensors"), bf16)


@pytest.mark.parametrize(
    "marker,message",
    [
        ({"format": "nvfp4"}, "format 'nvfp4'"),
        ({"format": "float8_e4m3fn", "group_size": 128}, "options ['group_size']"),
        ("weight_scale_2", "weight_scale_2"),
        ("per_channel", "per-channel or block scales"),
    ],
    ids=["nvfp4", "block", "double_scale", "per_channel"],
)
def test_scaled_fp8_markers_that_cannot_be_applied_raise(setup, tmp_path, marker, message):
    stored, _, scales = scaled_fp8(setup["bfl"])
    tensors = dict(stored)
    layer = "double_blocks.0.img_attn.qkv"
    tensors[f"{layer}.weight_scale"] = scales[layer]
    if marker == "weight_scale_2":
        tensors[f"{layer}.weight_scale_2"] = torch.tensor(1.0)
    elif marker == "per_channel":
        tensors[f"{layer}.weight_scale"] = torch.ones(stored[f"{layer}.weight"].shape[0])
    else:
        tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(marker).encode()), dtype=torch.uint8)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=config_metadata(setup["cfg"]))
    with pytest.raises(CheckpointError, match="cannot|not supported|only per-tensor") as e:
        open_checkpoint(path)
    assert str(path) in str(e.value) and message in str(e.value)


# -- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp8"])
def test_bfl_flax_bfl_roundtrip_is_bit_exact(setup, tmp_path, dtype):
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": FP8}[dtype]
    original = save_bfl(
        tmp_path / "in.safetensors", {k: v.to(torch_dtype) for k, v in setup["bfl"].items()}, setup["cfg"]
    )
    convert_checkpoint(original, tmp_path / "flax")  # keeps the stored dtype
    # fp8 Flax checkpoints keep biases / norm scales in bf16 (exactly), so the way back asks for fp8 explicitly.
    convert_checkpoint(tmp_path / "flax", tmp_path / "out.safetensors", dtype="fp8" if dtype == "fp8" else None)
    tensors_equal_bitwise(load_file(tmp_path / "out.safetensors"), load_file(original))


def test_diffusers_flax_diffusers_roundtrip_is_bit_exact_and_loads_in_diffusers(setup, tmp_path):
    from diffusers import FluxTransformer2DModel

    convert_checkpoint(setup["paths"]["diffusers_sharded"], tmp_path / "flax")
    out = tmp_path / "diffusers"
    convert_checkpoint(tmp_path / "flax", out, layout="diffusers", max_shard_bytes=300_000)
    assert len(json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]) == len(
        setup["sd"]
    )
    loaded = FluxTransformer2DModel.from_pretrained(out).eval()
    tensors_equal_bitwise({k: v.detach() for k, v in loaded.state_dict().items()}, setup["sd"])
    np.testing.assert_array_equal(diffusers_forward(loaded, setup["inputs"]), setup["want"])


def test_model_to_pytorch_writers(setup, tmp_path):
    """A live (sharded) Flax model writes the same bytes as the files it came from."""
    model = load_flux(setup["paths"]["bfl_torch"], mesh=make_mesh(2, 4, 1))
    write_flux_bfl(model, tmp_path / "model.safetensors")
    tensors_equal_bitwise(load_file(tmp_path / "model.safetensors"), load_file(setup["paths"]["bfl_torch"]))
    write_flux_diffusers(model, tmp_path / "model_diffusers")
    tensors_equal_bitwise(load_file(tmp_path / "model_diffusers" / "diffusion_pytorch_model.safetensors"), setup["sd"])


# -- the Flax checkpoint is an orbax checkpoint --------------------------------------------------------------------


def _target(cfg, mesh, dtype=jnp.float32):
    graphdef, abstract = nnx.split(abstract_model(cfg, param_dtype=dtype))
    shardings = state_shardings(abstract, mesh, DEFAULT_RULES)
    return jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        abstract.to_pure_dict(),
        shardings.to_pure_dict(),
    )


def test_flax_checkpoint_restores_with_orbax_into_a_sharded_state(setup):
    import orbax.checkpoint as ocp

    mesh = make_mesh(2, 4, 1)
    target = _target(setup["cfg"], mesh)
    restored = ocp.StandardCheckpointer().restore(setup["paths"]["flax"], target)
    loaded = nnx.state(load_flux(setup["paths"]["flax"])).to_pure_dict()
    leaves = jax.tree_util.tree_leaves_with_path(restored)
    for (path, got), want, tgt in zip(
        leaves, jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(target), strict=True
    ):
        assert got.sharding == tgt.sharding, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    assert restored["single_blocks"]["linear1"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")


def test_flax_metadata_is_what_orbax_writes(setup, tmp_path):
    """Our `_METADATA` is the one orbax writes for the same tree (non-OCDBT, zarr v2)."""
    import orbax.checkpoint as ocp

    state = nnx.state(load_flux(setup["paths"]["flax"])).to_pure_dict()
    ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=False).save(tmp_path / "orbax", state)
    ours = json.loads((setup["paths"]["flax"] / "_METADATA").read_text())
    theirs = json.loads((tmp_path / "orbax" / "_METADATA").read_text())
    assert ours == theirs


def test_reads_an_orbax_default_checkpoint(setup, tmp_path):
    """A checkpoint orbax itself wrote (OCDBT, its defaults) plus our description file reads like ours."""
    import orbax.checkpoint as ocp

    state = nnx.state(load_flux(setup["paths"]["flax"])).to_pure_dict()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", state)
    assert (tmp_path / "orbax" / "manifest.ocdbt").exists()  # orbax's default layout, not ours
    shutil.copy(setup["paths"]["flax"] / META_FILE, tmp_path / "orbax" / META_FILE)
    np.testing.assert_allclose(
        forward(load_flux(tmp_path / "orbax"), setup["inputs"]), setup["want"], atol=MODEL_TOL, rtol=0
    )
    convert_checkpoint(tmp_path / "orbax", tmp_path / "out.safetensors")
    tensors_equal_bitwise(load_file(tmp_path / "out.safetensors"), load_file(setup["paths"]["bfl_torch"]))


# -- sharded, streaming loads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1), (1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["bfl_torch", "flax", "diffusers_sharded"])
def test_sharded_load_follows_rules_and_equals_unsharded(setup, layout, shape):
    mesh = make_mesh(*shape)
    sharded = nnx.state(load_flux(setup["paths"][layout], mesh=mesh))
    single = dict(nnx.state(load_flux(setup["paths"][layout])).flat_state())
    n_sharded = 0
    for path, var in sharded.flat_state():
        value = var.get_value()
        want_spec = logical_to_spec(var.get_metadata()["logical_axes"], value.shape, DEFAULT_RULES, mesh)
        assert value.sharding.mesh == mesh and value.sharding.spec == want_spec, path
        n_sharded += any(s is not None for s in want_spec)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(single[path].get_value()), err_msg=str(path))
    assert n_sharded > 20  # the rules do shard the big kernels on these meshes


class _Recorder:
    def __init__(self, src):
        self.src, self.shape, self.dtype, self.reads = src, src.shape, src.dtype, []

    def read(self, index):
        self.reads.append(tuple((s.start, s.stop) for s in index))
        return self.src.read(index)


def test_each_device_reads_only_its_shard(setup):
    """make_array_from_callback asks for exactly the addressable shards; no read covers more than one shard."""
    cfg, mesh = setup["cfg"], make_mesh(1, 8, 1)
    with open_checkpoint(setup["paths"]["bfl_torch"]) as ckpt:
        sources = {p: _Recorder(s) for p, s in flax_sources(cfg, ckpt.tensors).items()}
        model = load_state_into(
            abstract_model(cfg), sources, dtype=jnp.float32, mesh=mesh, rules=DEFAULT_RULES, where="t"
        )
    for path, var in nnx.state(model).flat_state():
        value = var.get_value()
        shards = {
            tuple((s.start or 0, value.shape[d] if s.stop is None else s.stop) for d, s in enumerate(idx))
            for idx in value.sharding.addressable_devices_indices_map(value.shape).values()
        }
        assert sources[path].reads and set(sources[path].reads) <= shards, path


def test_flax_conversion_reads_each_layer_once(setup, tmp_path):
    """The PyTorch -> Flax conversion streams: every read is one whole per-layer tensor, read exactly once."""
    with open_checkpoint(setup["paths"]["bfl_torch"]) as ckpt:
        ckpt.tensors = {k: _Recorder(s) for k, s in ckpt.tensors.items()}
        write_flax_checkpoint(ckpt, tmp_path / "flax", dtype=BF16)
        for key, rec in ckpt.tensors.items():
            assert rec.reads == [tuple((0, n) for n in rec.shape)], key
    assert json.loads((tmp_path / "flax" / META_FILE).read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "src,dst",
    [("float8_e4m3fn", "bfloat16"), ("float8_e4m3fn", "float32"), ("float8_e5m2", "float16"),
     ("bfloat16", "float32"), ("float32", "bfloat16"), ("float32", "float8_e4m3fn")],
)  # fmt: skip
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_cast_is_numpy_cast_with_saturating_fp8(src, dst, transposed):
    """Every cast path (lookup table, tiled transpose, saturation) gives numpy's own values, bit for bit."""
    src, dst = np.dtype(getattr(ml_dtypes, src, None) or src), np.dtype(getattr(ml_dtypes, dst, None) or dst)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(1536, 1000 * src.itemsize), dtype=np.uint8)  # > 1M elements: tiled path
    block = raw.view(src) if src.itemsize == 1 else (rng.standard_normal((1536, 1000)) * 300).astype(src)
    block = block.T if transposed else block
    want = block.astype(np.float32)
    if dst.itemsize == 1:  # saturate like torch's .to(float8), which ml_dtypes' astype does not
        limit = float(ml_dtypes.finfo(dst).max)
        want = np.clip(want, -limit, limit)
    want = want.astype(dst)
    got = cast(block, dst)
    assert got.flags.c_contiguous and got.dtype == dst and got.shape == block.shape
    assert np.array_equal(got.view(f"u{dst.itemsize}"), want.view(f"u{dst.itemsize}"))
    assert np.array_equal(cast(block, dst, out=np.empty(block.shape, dst)).view(np.uint8), got.view(np.uint8))


def test_file_reads_release_their_pages(tmp_path):
    """Reading through FileTensor leaves (almost) nothing of the file in the process's resident set."""
    smaps = pathlib.Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("needs /proc/self/smaps")
    from flux_jax.weights.handle import FileTensor
    from flux_jax.weights.safetensors_file import SafetensorsFile

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.ones(4096, 4096)}, str(path))  # 64 MiB
    f = SafetensorsFile(path)
    tensor = FileTensor(f, f.info("w"))
    data = tensor.read((slice(0, 4096), slice(0, 4096)))
    assert data.sum() == 4096 * 4096
    rss_kb = 0
    lines = smaps.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(str(path)):
            rss_kb += next(int(x.split()[1]) for x in lines[i + 1 :] if x.startswith("Rss:"))
    assert rss_kb < 1024, f"{rss_kb} kB of the file still resident"
