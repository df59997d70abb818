"""Exported LoRAs do in PyTorch what they did in JAX: diffusers' own loader, ComfyUI's key rules, the CLI.

Tiny model (hidden 64), fp32, a LoRA with alpha != rank and random non-zero B on every Linear the table knows,
with some blocks masked out. The kohya file's diffusers loading needs the real width: test_lora_export_kohya.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from flux_jax import cli
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.export import export_metadata, write_lora_file
from flux_jax.lora_io.formats import FORMATS
from flux_jax.lora_io.import_ import read_lora_file
from flux_jax.weights import flux_keys
from flux_jax.weights.safetensors_file import SafetensorsFile, save_file
from tests.helpers.lora_reference import (
    TINY_ALPHA,
    TINY_RANK,
    bfl_state,
    comfy_key_map,
    comfy_patch,
    diffusers_lora_forward,
    load_bfl_into_diffusers,
    pipeline,
    quiet_diffusers,
    tiny_case,
)
from tests.helpers.torch_reference import diffusers_forward

MODEL_TOL = 1e-4
RANK, ALPHA = TINY_RANK, TINY_ALPHA


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    case = tiny_case()
    out = tmp_path_factory.mktemp("lora")
    case["files"] = {
        fmt: write_lora_file(out / f"{fmt}.safetensors", case["weights"], fmt, config=case["cfg"], dtype="fp32")
        for fmt in FORMATS
    }
    return case


def _tensors(path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {k: np.array(f.array(k)) for k in f.keys()}


def test_lora_covers_expected_modules(setup):
    weights, cfg = setup["weights"], setup["cfg"]
    assert "double_blocks.0.img_attn.qkv" in weights and "double_blocks.1.img_attn.qkv" not in weights
    assert {"single_blocks.0.linear1", "single_blocks.2.linear1"} <= set(weights)
    assert "single_blocks.1.linear1" not in weights
    assert {"img_in", "final_layer.adaLN_modulation.1", "guidance_in.out_layer"} <= set(weights)
    linears_per_double, linears_per_single = 10, 3
    top = sum(1 for e in flux_keys.entries(cfg) if e.kind == "linear" and e.stack is None)
    assert len(weights) == linears_per_double + 2 * linears_per_single + top


def test_diffusers_file_through_diffusers_load_lora_weights(setup):
    got = diffusers_lora_forward(pipeline(setup["ref"]), setup["files"]["diffusers"], setup["inputs"])
    np.testing.assert_allclose(got, setup["want"], atol=MODEL_TOL, rtol=0)


def test_diffusers_file_layout(setup):
    """PEFT keys on the diffusers modules; fused qkv / linear1 split by the table's sizes, A shared; no alpha."""
    cfg, tensors = setup["cfg"], _tensors(setup["files"]["diffusers"])
    assert not [k for k in tensors if "alpha" in k]
    shapes = flux_keys.diffusers_shapes(cfg)
    for key, t in tensors.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        out, inp = shapes[module + ".weight"]
        assert t.shape == ((RANK, inp) if kind == "A.weight" else (out, RANK)), key
    q, k, v, mlp = (
        "transformer.single_transformer_blocks.2." + m for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    )
    for other in (k, v, mlp):
        np.testing.assert_array_equal(tensors[f"{other}.lora_A.weight"], tensors[f"{q}.lora_A.weight"])
    # alpha / r folded in, as diffusers' kohya converter would: (A * s, B) for s = 0.75 >= 0.5.
    w = setup["weights"]["single_blocks.2.linear1"]
    np.testing.assert_array_equal(tensors[f"{q}.lora_A.weight"], w.down * np.float32(ALPHA / RANK))
    np.testing.assert_array_equal(tensors[f"{mlp}.lora_B.weight"], w.up[3 * cfg.hidden_size :])


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_bfl_named_files_under_comfyui_rules(setup, fmt):
    """Every key resolves through ComfyUI's key map to a BFL weight of the delta's shape, and the patched model
    (ComfyUI's W += alpha / r * up @ down) matches the JAX model with the LoRA."""
    cfg, ref = setup["cfg"], setup["ref"]
    tensors = _tensors(setup["files"][fmt])
    base = bfl_state(cfg, ref)
    key_map = comfy_key_map(base)
    modules = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors}
    assert modules <= set(key_map), sorted(modules - set(key_map))
    patched = comfy_patch(base, tensors)
    torch_model = copy.deepcopy(ref)
    load_bfl_into_diffusers(cfg, torch_model, patched)
    np.testing.assert_allclose(diffusers_forward(torch_model, setup["inputs"]), setup["want"], atol=MODEL_TOL, rtol=0)


def test_comfy_file_is_ignored_by_diffusers(setup):
    """Documents the README table: diffusers has no converter for BFL-named lora_A/lora_B files."""
    got = diffusers_lora_forward(pipeline(setup["ref"]), setup["files"]["comfy"], setup["inputs"])
    np.testing.assert_array_equal(got, setup["base"])


def test_alpha_is_float32_whatever_the_dtype(setup, tmp_path):
    path = write_lora_file(tmp_path / "k.safetensors", setup["weights"], "kohya", config=setup["cfg"], dtype="bf16")
    with SafetensorsFile(path) as f:
        dtypes = {k: f.info(k).dtype.name for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith(".alpha")} == {"float32"}
    assert {d for k, d in dtypes.items() if not k.endswith(".alpha")} == {"bfloat16"}
    lora = read_lora_file(path)
    for key, w in setup["weights"].items():
        assert lora.weights[key].alpha == ALPHA
        np.testing.assert_array_equal(lora.weights[key].up, w.up.astype("bfloat16").astype(np.float32))


RUN_META = {
    "step": 1500, "rank": RANK, "alpha": ALPHA, "targets": "all_blocks", "base": "ashen0209/Flux-Dev2Pro",
    "guidance": 1.0, "timestep_sampling": "logit_normal", "steps": 2000, "dataset": "42 images, 1024px",
    "config": {"train": {"steps": 2000}},
}  # fmt: skip


def test_kohya_metadata(setup):
    md = export_metadata("kohya", setup["weights"], setup["cfg"], RUN_META, title="my_lora", metadata="full")
    assert all(isinstance(v, str) for v in md.values())
    assert md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.title"] == "my_lora"
    assert md["ss_network_module"] == "networks.lora_flux"
    assert md["ss_base_model_version"] == "flux1"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("4", "3.0")
    assert md["ss_sd_model_name"] == "ashen0209/Flux-Dev2Pro"
    assert md["ss_guidance_scale"] == "1.0"
    assert md["ss_timestep_sampling"] == "logit_normal"
    assert (md["ss_steps"], md["ss_max_train_steps"]) == ("1500", "2000")
    assert md["ss_dataset"] == "42 images, 1024px"
    assert json.loads(md["flux_jax.meta"])["config"] == {"train": {"steps": 2000}}
    assert json.loads(md["flux_jax.config"])["hidden_size"] == setup["cfg"].hidden_size
    assert md["format"] == "pt"
    diffusers_md = export_metadata("diffusers", setup["weights"], setup["cfg"], RUN_META)
    assert not [k for k in diffusers_md if k.startswith("ss_")] and "lora_adapter_metadata" not in diffusers_md


PRIVATE_META = {
    **RUN_META,
    "base": "/home/me/models/flux1-dev.safetensors",
    "targets": [r"single_blocks\.\d+\.linear1", "double_blocks/img"],  # regexes: kept as they are
    "dataset": "latent cache /home/me/My Photos/cache (12 records, buckets 512x512)",
    "config": {"output_dir": "/home/me/runs/x", "data": {"path": "/home/me/My Photos"}},
    "extra": {"log": "~/logs/run.txt", "remote": "gs://my-bucket/runs/x"},  # a field this exporter does not know
}
CARRIED = {  # another tool's metadata
    "ss_output_name": "C:\\Users\\me\\loras\\style",
    "ss_training_comment": "trained on /home/me/photos, see https://example.com/a/b",
    "modelspec.author": "me",
}


def test_public_metadata_names_no_local_path(setup):
    md = export_metadata("kohya", setup["weights"], setup["cfg"], PRIVATE_META, title="t", carried=CARRIED)
    for key, value in md.items():
        assert "/home/me" not in value and "\\Users" not in value and "my-bucket/" not in value, key
        assert not value.startswith(("/", "~")), key
    meta = json.loads(md["flux_jax.meta"])
    assert "config" not in meta  # the run config names paths everywhere; `metadata="full"` keeps it
    assert meta["base"] == "flux1-dev.safetensors" and md["ss_sd_model_name"] == "flux1-dev.safetensors"
    assert meta["dataset"] == md["ss_dataset"] == "latent cache cache (12 records, buckets 512x512)"
    assert meta["targets"] == PRIVATE_META["targets"]
    assert meta["extra"] == {"log": "run.txt", "remote": "x"}
    assert (meta["step"], meta["rank"], meta["timestep_sampling"]) == (1500, RANK, "logit_normal")
    assert md["ss_output_name"] == "style" and md["modelspec.author"] == "me"
    assert md["ss_training_comment"] == "trained on photos, see https://example.com/a/b"
    assert "flux1-dev.safetensors" in md["modelspec.description"]

    full = export_metadata("kohya", setup["weights"], setup["cfg"], PRIVATE_META, carried=CARRIED, metadata="full")
    assert json.loads(full["flux_jax.meta"])["config"] == PRIVATE_META["config"]
    assert full["ss_sd_model_name"] == PRIVATE_META["base"] and full["ss_output_name"] == CARRIED["ss_output_name"]
    with pytest.raises(FluxJaxError, match="metadata mode"):
        export_metadata("kohya", setup["weights"], setup["cfg"], PRIVATE_META, metadata="private")


def test_metadata_written_to_file(setup, tmp_path):
    path = tmp_path / "k.safetensors"
    write_lora_file(path, setup["weights"], "kohya", config=setup["cfg"], meta=RUN_META)
    with SafetensorsFile(path) as f:
        assert f.metadata["ss_timestep_sampling"] == "logit_normal"
        assert f.metadata["modelspec.title"] == "k"


# -- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_converts_a_lora_file(setup, tmp_path):
    out = tmp_path / "out.safetensors"
    assert cli.main(["export", str(setup["files"]["kohya"]), str(out), "--format", "diffusers"]) == 0
    with quiet_diffusers():
        got = diffusers_lora_forward(pipeline(setup["ref"]), out, setup["inputs"])
    np.testing.assert_allclose(got, setup["want"], atol=MODEL_TOL, rtol=0)
    with SafetensorsFile(out) as f:
        assert {f.info(k).dtype.name for k in f.keys()} == {"float32"}  # the source's dtype


def test_cli_keeps_existing_output_unless_forced(setup, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    assert cli.main(["export", str(setup["files"]["kohya"]), str(out), "--format", "comfy"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert cli.main(["export", str(setup["files"]["kohya"]), str(out), "--format", "comfy", "--force"]) == 0
    assert read_lora_file(out).format == "comfy"


def test_cli_rejects_bad_input_without_output(tmp_path, capsys):
    bad = tmp_path / "not_a_lora.safetensors"
    save_file(
        bad,
        {
            "encoder.down.0.weight": np.zeros((2, 2), np.float32),
            "lora_te1_x.lora_down.weight": np.zeros((1, 2), np.float32),
        },
    )
    out = tmp_path / "out.safetensors"
    assert cli.main(["export", str(bad), str(out), "--format", "kohya"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "encoder.down.0.weight" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert cli.main(["export", str(bad), str(out)]) == 2
    assert "--format is required" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing"), str(out), "--format", "kohya"]) == 2
    assert "no such" in capsys.readouterr().err
