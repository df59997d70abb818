"""Whole LoRA files from other trainers: text-encoder parts (CLIP-L, T5) carried through every format and applied.

One tiny FLUX.1 pipeline directory (tests/helpers/tiny_pipeline.py: the demo CLIP-L / T5 and the tiny transformer)
and one kohya file written here by hand as sd-scripts writes one: `lora_unet_*` transformer parts, `lora_te1_*`
CLIP-L and `lora_te3_*` T5 parts, each with an alpha other than its rank. Checked: the text-encoder tensors survive
kohya -> comfy / diffusers -> kohya (bit for bit where alpha is stored, at fp32 rounding where diffusers folds it),
under ComfyUI's key rules (comfy/lora.py `model_lora_keys_clip`); diffusers' own `FluxPipeline.load_lora_weights`
applies the transformer and CLIP parts as flux-jax does (diffusers loads no T5 LoRA, so the T5 parts are checked
against transformers + peft attached by hand); `PromptEncoder`, `flux-jax sample` and validation encode with them;
`lora.init_from` accepts the file with one note; DoRA, LyCORIS and unknown text-encoder keys are refused in one line.
All at 1e-4 in fp32 against PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import pathlib

import jax
import numpy as np
import pytest

from flux_jax import cli
from flux_jax.data.encoding import check_text_encoder_lora, read_clip
from flux_jax.errors import CheckpointError
from flux_jax.lora_io.adapters import apply_lora_weights
from flux_jax.lora_io.combine import combine_text_encoder_loras
from flux_jax.lora_io.export import convert_lora_file
from flux_jax.lora_io.import_ import read_lora_file
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.sampling.loading import encoder_paths, load_transformer
from flux_jax.sampling.prompts import PromptEncoder
from flux_jax.sharding import make_mesh
from flux_jax.weights import flux_keys
from flux_jax.weights.safetensors_file import SafetensorsFile, save_file
from tests.helpers.lora_reference import jit_forward, quiet_diffusers
from tests.helpers.tiny_pipeline import TINY, build_tiny_pipeline, load_torch_pipeline
from tests.helpers.torch_reference import diffusers_forward, forward_inputs

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TOL = 1e-4  # fp32 parity with PyTorch; never loosen
PROMPTS = ["a photo of a red fox in the snow", "a watercolor painting of a lighthouse"]
# (rank, alpha) of each part: alpha != rank, so a dropped alpha / rank factor shows.
RANKS = {"clip": (4, 3.0), "t5": (2, 5.0), "transformer": (4, 6.0)}
# Strong enough to move the outputs far beyond the tolerance, weak enough that fp32 stays within it of fp64 (a T5
# with up_std 0.5 drifts 2e-4 from its float64 self in PyTorch alone).
UP_STD = {"clip": 0.5, "t5": 0.05}
# The transformer modules diffusers' kohya converter reads at the tiny width (it splits single-block linear1 by
# Flux's real 3072 / 12288 rows, and drops the top-level layers).
KOHYA_SAFE = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "linear2")


def _random(rng, rows: int, cols: int, rank: int, alpha: float, up_std: float) -> LoraWeights:
    return LoraWeights(
        rng.standard_normal((rank, cols)) / np.sqrt(cols), up_std * rng.standard_normal((rows, rank)), alpha
    )


def text_encoder_lora(root: pathlib.Path, seed: int = 0) -> dict[str, dict[str, LoraWeights]]:
    """A random LoRA on every Linear of the pipeline's CLIP-L and T5 (shapes from their checkpoints' headers)."""
    rng = np.random.default_rng(seed)
    out = {}
    linears = {
        "clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        "t5": ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "wi_0", "wi_1", "wo"),
    }
    for component, folder in (("clip", "text_encoder"), ("t5", "text_encoder_2")):
        rank, alpha = RANKS[component]
        with SafetensorsFile(root / folder / "model.safetensors") as f:
            shapes = {k: f.info(k).shape for k in f.keys()}
        out[component] = {
            key.removesuffix(".weight"): _random(rng, *shape, rank, alpha, up_std=UP_STD[component])
            for key, shape in sorted(shapes.items())
            if key.removesuffix(".weight").endswith(tuple("." + m for m in linears[component]))
        }
    return out


def transformer_lora(seed: int = 1) -> dict[str, LoraWeights]:
    rng = np.random.default_rng(seed)
    rank, alpha = RANKS["transformer"]
    out = {}
    for entry in flux_keys.entries(TINY):
        if entry.kind == "linear" and entry.stack is not None and entry.bfl.endswith(KOHYA_SAFE):
            rows, cols = flux_keys.module_shapes(TINY, entry)["weight"]
            for i in flux_keys.layer_indices(TINY, entry):
                out[flux_keys.fill(entry.bfl, i)] = _random(rng, rows, cols, rank, alpha, up_std=0.2)
    return out


def kohya_tensors(transformer: dict, text: dict) -> dict[str, np.ndarray]:
    """The kohya (sd-scripts lora_flux) names, spelled out here rather than taken from the library's tables."""
    names = {f"lora_unet_{p.replace('.', '_')}": w for p, w in transformer.items()}
    names |= {f"lora_te1_text_model_{m.replace('.', '_')}": w for m, w in text["clip"].items()}
    names |= {f"lora_te3_{m.replace('.', '_')}": w for m, w in text["t5"].items()}
    out = {}
    for name, w in names.items():
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = w.down, w.up
        out[f"{name}.alpha"] = np.asarray(w.alpha, np.float32)
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoder_lora")
    pipe = build_tiny_pipeline(root / "FLUX.1-tiny")
    text, transformer = text_encoder_lora(pipe), transformer_lora()
    kohya = root / "whole_kohya.safetensors"
    save_file(kohya, kohya_tensors(transformer, text), {"ss_network_module": "networks.lora_flux"})
    return dict(pipe=pipe, text=text, transformer=transformer, kohya=kohya, root=root)


def raw(path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {k: np.array(f.array(k)) for k in f.keys()}


def same(a: dict[str, LoraWeights], b: dict[str, LoraWeights]) -> bool:
    return a.keys() == b.keys() and all(a[k].same_as(b[k]) for k in a)


def assert_same_deltas(got: dict[str, LoraWeights], want: dict[str, LoraWeights]) -> None:
    """Equal up to the float32 rounding of a folded alpha: down * (alpha / r * 2^k) rounds once per element
    (2^-24 relative) and the product is accumulated again, so a few ulp of the delta's scale."""
    assert got.keys() == want.keys()
    for k, w in want.items():
        d = w.delta()
        np.testing.assert_allclose(got[k].delta(), d, rtol=0, atol=1e-6 * np.abs(d).max(), err_msg=k)


def text_keys(path) -> list[str]:
    return sorted(k for k in raw(path) if not k.startswith(("lora_unet_", "transformer.", "diffusion_model.")))


# -- ComfyUI's rules ---------------------------------------------------------------------------------------------


def comfy_clip_key_map(clip_weights, t5_weights) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_clip` for Flux's clip_l + t5xxl (comfy/lora.py): LoRA module name -> weight."""
    out = {}
    for key in clip_weights:  # ComfyUI names them clip_l.transformer.text_model.<transformers < 5 key>
        module = f"clip_l.transformer.text_model.{key.removesuffix('.weight')}"
        out[f"text_encoders.{module}"] = key  # its generic format
        if ".layers." in key and key.endswith(("_proj.weight", "fc1.weight", "fc2.weight")):
            b, c = key.split(".")[2], ".".join(key.split(".")[3:-1])
            out[f"lora_te_text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = key
            out[f"lora_te1_text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = key
            out[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = key  # diffusers
    for key in t5_weights:
        module = key.removesuffix(".weight")
        out[f"text_encoders.t5xxl.transformer.{module}"] = key
        for t5_index in (2, 3):  # clip_l present, no clip_g: "lora_te2_" (OneTrainer Flux) and "lora_te3_"
            out[f"lora_te{t5_index}_{module.replace('.', '_')}"] = key
    return out


def comfy_loads(path, pipe) -> set[str]:
    """The text-encoder keys of a file ComfyUI's `load_lora` consumes (lora_up/down or lora_B/A, alpha)."""
    clip = raw(pipe / "text_encoder" / "model.safetensors")
    t5 = raw(pipe / "text_encoder_2" / "model.safetensors")
    key_map = comfy_clip_key_map([k for k, v in clip.items() if v.ndim == 2], [k for k, v in t5.items() if v.ndim == 2])
    tensors, loaded = raw(path), set()
    for name in key_map:
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if name + up in tensors:
                loaded |= {name + up, name + down} | ({name + ".alpha"} & tensors.keys())
    return loaded


# -- conversions --------------------------------------------------------------------------------------------------


def test_kohya_text_encoder_parts_convert_to_comfy_and_diffusers_and_back(case, tmp_path):
    src, pipe = case["kohya"], case["pipe"]
    lora = read_lora_file(src)
    assert lora.format == "kohya"
    assert same(lora.text_encoders["clip"], case["text"]["clip"]) and same(lora.text_encoders["t5"], case["text"]["t5"])
    assert same(lora.weights, case["transformer"])
    assert comfy_loads(src, pipe) == set(text_keys(src))  # ComfyUI reads every lora_te1_ / lora_te3_ key

    # A kohya file names no model config, and the tiny width is not one Flux's can be inferred from: given here.
    comfy = convert_lora_file(src, tmp_path / "comfy.safetensors", "comfy", config=TINY)
    keys = text_keys(comfy)
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight" in keys
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.alpha" in keys
    assert len(keys) == 3 * (len(case["text"]["clip"]) + len(case["text"]["t5"]))
    assert comfy_loads(comfy, pipe) == set(keys)  # ... and every key of the comfy file
    back = convert_lora_file(comfy, tmp_path / "back.safetensors", "kohya")
    want, got = raw(src), raw(back)
    assert text_keys(back) == text_keys(src)
    for k in text_keys(src):  # bit for bit, alpha included
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k].view(np.uint32), want[k].view(np.uint32)), k

    diffusers = convert_lora_file(src, tmp_path / "diffusers.safetensors", "diffusers", config=TINY)
    keys = text_keys(diffusers)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "text_encoder_2.encoder.block.1.layer.0.SelfAttention.o.lora_B.weight" in keys
    assert len(keys) == 2 * (len(case["text"]["clip"]) + len(case["text"]["t5"]))  # alpha folded: no .alpha
    # ComfyUI reads the CLIP part of a diffusers file, not its text_encoder_2 (T5) part.
    assert comfy_loads(diffusers, pipe) == {k for k in keys if k.startswith("text_encoder.")}
    folded = read_lora_file(diffusers)
    assert folded.format == "diffusers"
    for component in ("clip", "t5"):
        assert {w.alpha for w in folded.text_encoders[component].values()} == {RANKS[component][0]}
        assert_same_deltas(folded.text_encoders[component], case["text"][component])
    again = read_lora_file(convert_lora_file(diffusers, tmp_path / "again.safetensors", "kohya"))
    assert text_keys(tmp_path / "again.safetensors") == text_keys(src)
    for component in ("clip", "t5"):
        assert_same_deltas(again.text_encoders[component], case["text"][component])


def test_a_diffusers_saved_clip_lora_reads_its_alpha_from_the_adapter_metadata(case, tmp_path):
    """The file diffusers' own `save_lora_weights` writes for a peft-trained CLIP (transformers >= 5 module names,
    alpha only in `lora_adapter_metadata`, as its training scripts save the peft LoraConfig)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig

    want = case["text"]["clip"]
    rank, alpha = RANKS["clip"]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    )
    layers = {k.replace(".default.", "."): v for k, v in peft_state(want).items()}  # get_peft_model_state_dict's
    FluxPipeline.save_lora_weights(
        tmp_path, text_encoder_lora_layers=layers, text_encoder_lora_adapter_metadata=config.to_dict()
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight" in raw(path)
    lora = read_lora_file(path)
    assert not lora.weights and lora.format == "diffusers"
    assert same(lora.text_encoders["clip"], want)  # alpha 3 from the metadata, not rank 4


def peft_state(weights: dict[str, LoraWeights], adapter: str = "default") -> dict:
    """peft's parameter names for our modules: `<module>.lora_A.<adapter>.weight`."""
    out = {}
    for module, w in weights.items():
        out[f"{module}.lora_A.{adapter}.weight"] = torch.from_numpy(w.down.copy())
        out[f"{module}.lora_B.{adapter}.weight"] = torch.from_numpy(w.up.copy())
    return out


# -- applying them ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_pipe(case):
    return load_torch_pipeline(case["pipe"], vae=False)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@contextlib.contextmanager
def loaded(pipe, path):
    with quiet_diffusers():
        pipe.load_lora_weights(str(path), adapter_name="under_test")
    try:
        yield
    finally:
        pipe.unload_lora_weights()


def clip_ids(pipe) -> np.ndarray:
    return pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


def torch_clip(pipe, ids) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = pipe.text_encoder(torch.from_numpy(ids))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_diffusers_load_lora_weights_applies_the_transformer_and_clip_parts_as_flux_jax(
    case, torch_pipe, mesh, tmp_path
):
    ids = clip_ids(torch_pipe)
    inputs = forward_inputs(TINY, batch=1, h=2, w=3, txt_len=4, seed=2)
    plain_clip, plain_out = torch_clip(torch_pipe, ids), diffusers_forward(torch_pipe.transformer, inputs)

    # flux-jax: the CLIP part merged into the JAX CLIP, the transformer part attached to the JAX transformer.
    lora = read_lora_file(case["kohya"])
    hidden, pooled = read_clip(case["pipe"] / "text_encoder", "fp32", lora=lora.text_encoders["clip"])(ids)
    model = load_transformer(str(case["pipe"] / "transformer"), dtype="fp32", compute_dtype="fp32", mesh=mesh)
    apply_lora_weights(model, lora.weights)
    want_out = jit_forward(model, inputs)

    diffusers_file = convert_lora_file(case["kohya"], tmp_path / "d.safetensors", "diffusers", config=TINY)
    for path in (case["kohya"], diffusers_file):  # diffusers' kohya converter, then its PEFT path
        with loaded(torch_pipe, path):
            got_hidden, got_pooled = torch_clip(torch_pipe, ids)
            got_out = diffusers_forward(torch_pipe.transformer, inputs)
        np.testing.assert_allclose(np.asarray(pooled), got_pooled, atol=TOL, rtol=0, err_msg=path.name)
        np.testing.assert_allclose(np.asarray(hidden), got_hidden, atol=TOL, rtol=0, err_msg=path.name)
        np.testing.assert_allclose(want_out, got_out, atol=TOL, rtol=0, err_msg=path.name)
        # Both parts took effect in diffusers (the comparison above is not two unchanged models agreeing).
        assert np.abs(got_pooled - plain_clip[1]).max() > 100 * TOL and np.abs(got_out - plain_out).max() > 100 * TOL


@contextlib.contextmanager
def t5_with_peft(pipe, weights: dict[str, LoraWeights]):
    """diffusers' FluxPipeline loads no T5 LoRA: attach the T5 part with peft by hand, on a copy of the T5."""
    from peft import LoraConfig, inject_adapter_in_model

    rank, alpha = RANKS["t5"]
    original = pipe.text_encoder_2
    t5 = copy.deepcopy(original)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"])
    inject_adapter_in_model(config, t5)
    missing = set(peft_state(weights)) - set(t5.state_dict())
    assert not missing, sorted(missing)[:3]
    t5.load_state_dict(peft_state(weights), strict=False)
    pipe.text_encoder_2 = t5.eval()
    try:
        yield
    finally:
        pipe.text_encoder_2 = original


def test_prompt_encoder_with_the_lora_matches_diffusers_and_peft(case, torch_pipe, mesh):
    """flux-jax's prompt conditioning (T5 states padded to 512, pooled CLIP) with the file's text-encoder parts =
    diffusers' `encode_prompt` after `load_lora_weights` (CLIP) and peft (T5)."""
    with torch.no_grad():
        plain_t5, plain_clip, _ = torch_pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
    with loaded(torch_pipe, case["kohya"]), t5_with_peft(torch_pipe, case["text"]["t5"]), torch.no_grad():
        want_t5, want_clip, _ = torch_pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
    lora = read_lora_file(case["kohya"])
    encoder = PromptEncoder.load(encoder_paths(case["pipe"]), mesh=mesh, dtype="fp32", loras=lora.text_encoders)
    got = encoder.encode(PROMPTS)
    np.testing.assert_allclose(np.asarray(got.t5), want_t5.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got.clip), want_clip.numpy(), atol=TOL, rtol=0)
    assert (want_t5 - plain_t5).abs().max() > 100 * TOL and (want_clip - plain_clip).abs().max() > 100 * TOL


def torch_merged(pipe, text: dict[str, dict[str, LoraWeights]], scale: float):
    """Copies of the pipeline's CLIP and T5 with W += scale * alpha / r * up @ down, merged in PyTorch."""
    models = {"clip": copy.deepcopy(pipe.text_encoder), "t5": copy.deepcopy(pipe.text_encoder_2)}
    for component, model in models.items():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for module, w in text[component].items():
                up, down = torch.from_numpy(w.up.copy()), torch.from_numpy(w.down.copy())
                params[f"{module}.weight"] += scale * w.alpha / w.rank * (up @ down)
    return models


def test_sample_applies_the_text_encoder_parts_at_the_lora_scale(case, torch_pipe, tmp_path, monkeypatch, capsys):
    """`flux-jax sample --lora FILE:0.5`: the conditioning its sampler gets is the PyTorch encoders' with the
    text-encoder parts merged at 0.5 (the transformer loading and the sampler are stand-ins; the real sampler with
    LoRAs is tests/test_sample_cli.py's)."""
    from flux_jax.lora_io import adapters
    from flux_jax.sampling import loading, sampler

    got, applied = [], []

    class Sampler:
        def images(self, cond, settings, *, negative=None, noise=None, extra=()):
            got.append(cond)
            return np.zeros((cond.t5.shape[0], settings.height, settings.width, 3), np.uint8)

    monkeypatch.setattr(loading, "load_transformer", lambda *a, **k: object())
    monkeypatch.setattr(loading, "load_vae_for", lambda *a, **k: object())
    monkeypatch.setattr(adapters, "apply_lora_weights", lambda model, weights, *a, **k: applied.append(weights))
    monkeypatch.setattr(sampler.FluxSampler, "from_model", classmethod(lambda cls, *a, **k: Sampler()))
    out = tmp_path / "out"
    argv = ["sample", "--base", str(case["pipe"]), "--lora", f"{case['kohya']}:0.5", "--prompt", PROMPTS[0],
            "--width", "32", "--height", "32", "--steps", "1", "--dtype", "fp32", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    (cond,) = got
    assert applied and set(applied[0]) == set(case["transformer"])
    assert json.loads((out / "samples.json").read_text())["images"][0]["text_encoder_lora"] == "clip+t5"

    models = torch_merged(torch_pipe, case["text"], 0.5)
    length = cond.t5.shape[1]  # 512: the tiny base has a guidance embedding (dev)
    assert length == 512
    t5_ids = torch_pipe.tokenizer_2(
        PROMPTS[:1], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        want_t5 = models["t5"](t5_ids).last_hidden_state.numpy()
        want_clip = models["clip"](torch.from_numpy(clip_ids(torch_pipe)[:1])).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(cond.t5), want_t5, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(cond.clip), want_clip, atol=TOL, rtol=0)


def test_lora_init_from_a_whole_file_trains_the_transformer_and_validates_with_the_text_encoders(
    case, tmp_path, tmp_path_factory, caplog
):
    """`lora.init_from` with text-encoder parts: the adapters start from the transformer parts as from any file,
    one note says the text-encoder parts are not trained, and validation encodes its prompts with them."""
    from flux_jax.data.encoding import resolve_encoder_paths
    from flux_jax.train.loop import setup
    from tests.helpers.compile_cache import persistent_compile_cache
    from tests.helpers.tiny_lora import config

    file_weights = case["transformer"]  # rank 4 like the tiny run's; the layers it lacks start fresh
    path = tmp_path / "whole.safetensors"
    save_file(path, kohya_tensors(file_weights, case["text"]))
    cfg = config(tmp_path / "run", f"lora.init_from={path}", "validation.every=100", "validation.prompts=['a red cat']",
                 "validation.width=32", "validation.height=32", "validation.steps=1", "validation.lora_scale=0.5",
                 "encoders.dtype=fp32")  # fmt: skip
    # The cache tests/test_lora_init.py fills when both run in one process.
    with persistent_compile_cache(tmp_path_factory.getbasetemp() / "train-xla-cache"), caplog.at_level(logging.INFO):
        trainer, state = setup(cfg, progress=False)
    notes = [r.getMessage() for r in caplog.records if "text-encoder LoRA parts" in r.getMessage()]
    assert len([n for n in notes if "not trained" in n]) == 1, notes
    assert "CLIP-L: 12 modules, T5: 14 modules" in notes[0] and "exports hold the transformer LoRA alone" in notes[0]
    lora = {k: np.asarray(v) for k, v in state.lora.items()}
    a, b = lora["double_blocks.img_attn.qkv.lora.lora_a"][0], lora["double_blocks.img_attn.qkv.lora.lora_b"][0]
    w = file_weights["double_blocks.0.img_attn.qkv"]
    np.testing.assert_allclose((8.0 / w.rank * (a @ b)).T, w.delta(), rtol=1e-5, atol=1e-6)  # the run's alpha is 8

    (validation,) = [h for h, _ in trainer.hooks if type(h).__name__ == "Validation"]
    assert validation.describe()["text_encoder_lora"] == "whole.safetensors"
    paths, _ = resolve_encoder_paths(cfg, tmp_path / "demo")
    half = combine_text_encoder_loras([(case["text"], 0.5)])  # validation.lora_scale applies to them too
    want = PromptEncoder.load(paths, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]), dtype="fp32", loras=half)
    want = want.encode(["a red cat"])
    got = validation.calls[0].prompts
    np.testing.assert_allclose(np.asarray(got.clip)[:1], np.asarray(want.clip), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got.t5)[:1], np.asarray(want.t5), atol=TOL, rtol=0)
    trainer.close()


# -- refused ------------------------------------------------------------------------------------------------------


def _kohya_clip(name: str = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", rank: int = 2) -> dict:
    return {f"{name}.lora_down.weight": np.ones((rank, 32), np.float32), f"{name}.lora_up.weight": np.ones((32, rank))}


REFUSED = {
    "DoRA": ({**_kohya_clip(), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": np.ones((1, 32))},
             "(DoRA is not supported)", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"),
    "LyCORIS": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": np.ones((2, 2)),
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_b": np.ones((2, 2))},
                "(LyCORIS LoHa/LoKr are not supported)", "lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a"),
    "unknown CLIP module": (_kohya_clip("lora_te1_text_model_encoder_layers_0_self_attn_qkv"),
                            "text-encoder LoRA keys must name a Linear",
                            "lora_te1_text_model_encoder_layers_0_self_attn_qkv"),
    "T5 embedding": ({"text_encoders.t5xxl.transformer.shared.lora_A.weight": np.ones((2, 8)),
                      "text_encoders.t5xxl.transformer.shared.lora_B.weight": np.ones((8, 2))},
                     "must name a Linear", "text_encoders.t5xxl.transformer.shared.lora_A.weight"),
    "given twice": ({**_kohya_clip("lora_te2_encoder_block_0_layer_0_SelfAttention_q"),
                     **_kohya_clip("lora_te3_encoder_block_0_layer_0_SelfAttention_q")},
                    "is given more than once", "lora_te2_encoder_block_0_layer_0_SelfAttention_q"),
    "NaN": ({**_kohya_clip(), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
             np.full((32, 2), np.nan)}, "NaN or Inf", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up"),
    "alpha 0": ({**_kohya_clip(), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": np.zeros(())},
                "alpha = 0", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"),
}  # fmt: skip


@pytest.mark.parametrize("case_name", list(REFUSED))
def test_refused_in_one_line_naming_the_key(case_name, tmp_path, capsys):
    tensors, problem, key = REFUSED[case_name]
    path = tmp_path / "bad.safetensors"
    save_file(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()})
    with pytest.raises(CheckpointError) as e:
        read_lora_file(path)
    assert problem in str(e.value) and key in str(e.value) and str(path) in str(e.value)
    out = tmp_path / "out.safetensors"
    assert cli.main(["convert", str(path), str(out), "--format", "comfy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and not out.exists()


def test_parts_that_do_not_fit_the_encoders_are_named_before_loading(case):
    lora = read_lora_file(case["kohya"]).text_encoders
    w = lora["clip"]["encoder.layers.0.mlp.fc1"]
    wrong = {"clip": {"encoder.layers.0.mlp.fc2": w, "encoder.layers.5.mlp.fc1": w}, "t5": lora["t5"]}
    with pytest.raises(CheckpointError) as e:
        check_text_encoder_lora(encoder_paths(case["pipe"]), wrong, "--lora x.safetensors")
    msg = str(e.value)
    assert msg.startswith("--lora x.safetensors on ") and "CLIP-L LoRA parts do not fit" in msg
    assert (
        "encoder.layers.0.mlp.fc2 is [64, 32] (the weight is [32, 64])" in msg
        and "encoder.layers.5.mlp.fc1 (no such Linear" in msg
    )
    check_text_encoder_lora(encoder_paths(case["pipe"]), lora, "fits")  # the file's own parts fit
