"""`flux-jax extract-lora`: the truncated SVD of (tuned - base) on every Linear, written by the LoRA exporters.

The "fine-tune" is the tiny reference model plus, on every Linear but two, a random rank-4 delta and small dense
noise (there is no full fine-tuning mode), written as BFL checkpoints. Checked: full rank reproduces the delta;
rank r leaves exactly the SVD tail; --energy picks the smallest rank meeting it; the files load under ComfyUI's
rules and diffusers' load_lora_weights; merged into the base through flux-jax's merge path, the output error is the
tail's first-order effect on the tuned model; bias / norm changes are reported; bad input is one line, exit 2.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch

from flux_jax import cli
from flux_jax.lora_io.extract import extract_lora
from flux_jax.lora_io.import_ import read_lora_file
from flux_jax.lora_io.merge import merge_lora
from flux_jax.lora_io.weights import LINEAR_ENTRIES
from flux_jax.model.config import CONFIG_METADATA_KEY, config_metadata
from flux_jax.weights import flux_keys
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.safetensors_file import SafetensorsFile, save_file
from flux_jax.weights.sources import read_all
from tests.helpers.lora_reference import (
    bfl_state,
    comfy_patch,
    diffusers_lora_forward,
    load_bfl_into_diffusers,
    merged_forward,
    pipeline,
)
from tests.helpers.torch_reference import diffusers_flux, exact_timestep_frequencies, forward_inputs, tiny_config

TRUE_RANK, NOISE = 4, 1e-3
UNCHANGED = ("guidance_in.in_layer", "single_blocks.1.linear2")
MODEL_TOL = 1e-4


def _save(path, state, cfg):
    save_file(path, state, {"format": "pt", CONFIG_METADATA_KEY: config_metadata(cfg)})
    return path


def _linears(cfg) -> list[str]:
    return [
        flux_keys.fill(e.bfl, i)
        for e in LINEAR_ENTRIES
        if e in flux_keys.entries(cfg)
        for i in flux_keys.layer_indices(cfg, e)
    ]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    cfg = tiny_config()
    ref = diffusers_flux(cfg, seed=3)
    base = bfl_state(cfg, ref)
    rng = np.random.default_rng(0)
    tuned = dict(base)
    for path in _linears(cfg):
        if path in UNCHANGED:
            continue
        w = base[f"{path}.weight"]
        out, inp = w.shape
        # a decaying spectrum, steeper on some layers than others, so an energy threshold picks different ranks
        decay = rng.choice([0.2, 0.5, 1.0]) ** np.arange(TRUE_RANK)
        low = (rng.standard_normal((out, TRUE_RANK)) * decay) @ rng.standard_normal((TRUE_RANK, inp)) * 0.02
        noise = rng.standard_normal((out, inp)) * NOISE
        tuned[f"{path}.weight"] = (w + low + noise).astype(np.float32)
    d = tmp_path_factory.mktemp("ckpt")
    inputs = forward_inputs(cfg, batch=2, h=3, w=4, txt_len=5, seed=9)
    return dict(
        cfg=cfg, ref=ref, base=base, tuned=tuned, inputs=inputs,
        base_file=_save(d / "base.safetensors", base, cfg), tuned_file=_save(d / "tuned.safetensors", tuned, cfg),
    )  # fmt: skip


def _delta(case, path) -> np.ndarray:
    return case["tuned"][f"{path}.weight"].astype(np.float64) - case["base"][f"{path}.weight"]


def _s(delta) -> np.ndarray:
    return np.linalg.svd(delta, compute_uv=False)  # float64: an SVD independent of the one under test


def test_full_rank_reproduces_the_delta(case):
    ex = extract_lora(case["base_file"], case["tuned_file"], rank=10_000)
    assert sorted(r.path for r in ex.unchanged) == sorted(UNCHANGED)
    assert set(ex.weights) == set(_linears(case["cfg"])) - set(UNCHANGED)
    for path, w in ex.weights.items():
        delta = _delta(case, path)
        assert w.rank == min(delta.shape) and w.scale == 1.0
        np.testing.assert_allclose(w.delta(), delta, atol=1e-5, rtol=0, err_msg=path)
        assert np.linalg.norm(w.delta() - delta) <= 1e-5 * np.linalg.norm(delta), path


def test_rank_r_leaves_exactly_the_svd_tail(case):
    r = 3  # below the fine-tune's rank 4: the tail is large, not just the noise
    ex = extract_lora(case["base_file"], case["tuned_file"], rank=r)
    for report in ex.changed:
        delta = _delta(case, report.path)
        s = _s(delta)
        tail = np.sqrt((s[r:] ** 2).sum())
        w = ex.weights[report.path]
        assert w.rank == r == report.rank
        err = np.linalg.norm(delta - w.delta().astype(np.float64))
        assert abs(err - tail) <= 1e-5 * tail, (report.path, err, tail)
        assert abs(report.error - tail) <= 1e-5 * tail
        assert abs(report.energy - (s[:r] ** 2).sum() / (s**2).sum()) <= 1e-6


@pytest.mark.parametrize(("energy", "cap"), [(0.9995, None), (0.5, None), (0.9995, 2)])
def test_energy_picks_the_smallest_rank_that_meets_it(case, energy, cap):
    ex = extract_lora(case["base_file"], case["tuned_file"], rank=cap, energy=energy)
    ranks = set()
    for report in ex.changed:
        s = _s(_delta(case, report.path))
        kept = np.cumsum(s**2) / (s**2).sum()
        k = report.rank
        ranks.add(k)
        if cap is not None:
            assert k == min(cap, int(np.argmax(kept >= energy)) + 1), report.path
            continue
        assert kept[k - 1] >= energy and (k == 1 or kept[k - 2] < energy), (report.path, k, kept[:k])
        assert abs(report.energy - kept[k - 1]) <= 1e-6
    assert len(ranks) > 1 or cap is not None  # per-layer ranks really differ (no constant passes by luck)


def _cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _file_tensors(path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {k: np.array(f.array(k)) for k in f.keys()}


@pytest.fixture(scope="module")
def files(case, tmp_path_factory):
    """The CLI's rank-4 extraction in every format (fp32), and what it printed."""
    d = tmp_path_factory.mktemp("lora")
    out = {}
    for fmt in ("kohya", "diffusers", "comfy"):
        path = d / f"{fmt}.safetensors"
        argv = ["extract-lora", "--base", str(case["base_file"]), "--tuned", str(case["tuned_file"]), "--rank", "4"]
        assert cli.main([*argv, "--format", fmt, str(path)]) == 0
        out[fmt] = path
    return out


def test_cli_prints_every_layer_and_a_summary(case, tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    argv = ["extract-lora", "--base", str(case["base_file"]), "--tuned", str(case["tuned_file"])]
    code, out, err = _cli([*argv, "--rank", "4", "--format", "comfy", str(path)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    linears = _linears(case["cfg"])
    assert len(lines) == len(linears) + 3  # a line per Linear, two summary lines, "wrote"
    for line, module in zip(lines, linears, strict=False):
        assert line.split()[0] == module
        assert ("unchanged (skipped)" in line) == (module in UNCHANGED), line
        assert module in UNCHANGED or " rank    4 " in line
    n = len(linears)
    assert lines[n].startswith(f"extracted {n - 2} of {n} linear layers (2 unchanged, skipped); rank 4-4")
    assert lines[n + 1].startswith("retained energy 0.99")
    assert lines[-1] == f"wrote {path}" and "warning" not in err
    assert read_lora_file(path).format == "comfy"


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_bfl_named_files_under_comfyui_rules(case, files, fmt):
    """ComfyUI's patch (W += alpha / r * up @ down) of the base gives the tuned weights up to the printed tail."""
    ex = extract_lora(case["base_file"], case["tuned_file"], rank=4)
    patched = comfy_patch(case["base"], _file_tensors(files[fmt]))
    for report in ex.layers:
        key = f"{report.path}.weight"
        err = np.linalg.norm(patched[key].astype(np.float64) - case["tuned"][key])
        assert abs(err - report.error) <= 1e-4 * max(report.error, 1e-3), (key, err, report.error)


def test_diffusers_file_through_diffusers_load_lora_weights(case, files):
    lora = read_lora_file(files["diffusers"]).weights
    want = merged_forward(case["cfg"], case["ref"], lora, case["inputs"])  # base + our reading of the file
    got = diffusers_lora_forward(pipeline(case["ref"]), files["diffusers"], case["inputs"])
    np.testing.assert_allclose(got, want, atol=MODEL_TOL, rtol=0)
    # and our reading of it is the extraction: every format holds the same LoRA
    ex = extract_lora(case["base_file"], case["tuned_file"], rank=4)
    for fmt in ("kohya", "comfy", "diffusers"):
        read = read_lora_file(files[fmt]).weights
        assert set(read) == set(ex.weights)
        for p, w in ex.weights.items():
            np.testing.assert_allclose(read[p].delta(), w.delta(), atol=1e-6, rtol=0, err_msg=f"{fmt} {p}")


# -- the tuned model's output ------------------------------------------------------------------------------------


def _torch_model(case, bfl):
    model = copy.deepcopy(case["ref"])
    load_bfl_into_diffusers(case["cfg"], model, bfl)
    return model


def _forward_fn(model, inputs):
    from torch.func import functional_call

    kw = dict(
        hidden_states=torch.from_numpy(inputs["img"]), encoder_hidden_states=torch.from_numpy(inputs["txt"]),
        pooled_projections=torch.from_numpy(inputs["y"]), timestep=torch.from_numpy(inputs["timesteps"]),
        img_ids=torch.from_numpy(inputs["img_ids"]), txt_ids=torch.from_numpy(inputs["txt_ids"]),
        guidance=torch.from_numpy(inputs["guidance"]), return_dict=False,
    )  # fmt: skip
    return lambda params: functional_call(model, params, (), kw)[0]


def _merged(case, lora_file, out):
    merge_lora(case["base_file"], read_lora_file(lora_file).weights, out)  # flux-jax's import + merge path
    with open_checkpoint(out) as ckpt:
        return {k: read_all(v) for k, v in ckpt.tensors.items()}


def test_lora_on_the_base_gives_the_tuned_output_within_the_tail(case, files, tmp_path):
    """Merged at strength 1, the rank-4 LoRA leaves per layer the residual R = delta - up @ down (Frobenius norm =
    the printed tail); the output then differs from the tuned model's by J R + O(|R|^2), J the tuned model's
    Jacobian in its weights. Bound checked: |f(merged) - f(tuned) - J R| <= 10% of |J R| (J R by forward-mode AD),
    with |J R| far above float noise. At full rank R ~ 0 and the outputs agree to float32 precision."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    merged = _merged(case, files["kohya"], tmp_path / "merged.safetensors")
    ex = extract_lora(case["base_file"], case["tuned_file"], rank=4)
    for report in ex.layers:
        key = f"{report.path}.weight"
        err = np.linalg.norm(merged[key].astype(np.float64) - case["tuned"][key])
        assert abs(err - report.error) <= 1e-4 * max(report.error, 1e-3), (key, err, report.error)

    tuned_model = _torch_model(case, case["tuned"])
    f = _forward_fn(tuned_model, case["inputs"])
    params = {k: v.detach() for k, v in tuned_model.named_parameters()}
    merged_params = dict(_torch_model(case, merged).named_parameters())
    tangent = {k: merged_params[k].detach() - params[k] for k in params}
    # the math kernel: the fused CPU attention kernel has no forward-mode derivative
    with torch.no_grad(), exact_timestep_frequencies(), sdpa_kernel(SDPBackend.MATH):
        tuned_out, predicted = torch.func.jvp(f, (params,), (tangent,))
        actual = f({k: params[k] + tangent[k] for k in params}) - tuned_out
    tuned_out, predicted, actual = tuned_out.detach(), predicted.numpy(), actual.numpy()
    assert np.linalg.norm(predicted) > 1e-2  # the tail moves the output well beyond float noise
    assert np.linalg.norm(actual - predicted) <= 0.1 * np.linalg.norm(predicted)

    full = tmp_path / "full.safetensors"
    argv = ["extract-lora", "--base", str(case["base_file"]), "--tuned", str(case["tuned_file"]), "--rank", "64"]
    assert cli.main([*argv, "--format", "kohya", str(full)]) == 0
    full_params = dict(_torch_model(case, _merged(case, full, tmp_path / "m_full.safetensors")).named_parameters())
    with torch.no_grad(), exact_timestep_frequencies():
        np.testing.assert_allclose(f(full_params).numpy(), tuned_out.numpy(), atol=MODEL_TOL, rtol=0)


# -- other inputs ------------------------------------------------------------------------------------------------


def test_biases_and_norms_that_changed_are_reported(case, tmp_path, capsys):
    tuned = dict(case["tuned"])
    for key in ("double_blocks.0.img_mod.lin.bias", "single_blocks.0.norm.key_norm.scale"):
        tuned[key] = tuned[key] + np.float32(0.01)
    src = _save(tmp_path / "tuned_b.safetensors", tuned, case["cfg"])
    out = tmp_path / "l.safetensors"
    argv = ["extract-lora", "--base", str(case["base_file"]), "--tuned", str(src), "--rank", "4", "--format", "kohya"]
    code, _, err = _cli([*argv, str(out)], capsys)
    assert code == 0 and out.exists()
    other = 0.01**2 * (case["base"]["double_blocks.0.img_mod.lin.bias"].size + case["cfg"].head_dim)
    linear = sum((_delta(case, p) ** 2).sum() for p in _linears(case["cfg"]))
    (line,) = err.strip().splitlines()
    assert "warning: 2 bias / norm tensor(s) changed and cannot be expressed by a LoRA" in line
    assert f"({other / (linear + other):.4%} of the delta's energy)" in line
    assert "double_blocks.0.img_mod.lin.bias" in line and "single_blocks.0.norm.key_norm.scale" in line


def test_fp8_and_diffusers_inputs(case, tmp_path):
    """fp8 checkpoints are dequantized before the difference; a diffusers directory reads like its BFL file."""
    fp8 = ml_dtypes.float8_e4m3fn
    base8 = {k: v.astype(fp8) for k, v in case["base"].items()}
    tuned8 = {k: v.astype(fp8) for k, v in case["tuned"].items()}
    b, t = (
        _save(tmp_path / "b8.safetensors", base8, case["cfg"]),
        _save(tmp_path / "t8.safetensors", tuned8, case["cfg"]),
    )
    ex = extract_lora(b, t, rank=10_000)
    for path, w in ex.weights.items():
        key = f"{path}.weight"
        want = tuned8[key].astype(np.float32) - base8[key].astype(np.float32)
        np.testing.assert_allclose(w.delta(), want, atol=1e-5, rtol=0, err_msg=path)

    directory = tmp_path / "base_diffusers"
    case["ref"].save_pretrained(directory)
    a = extract_lora(directory, case["tuned_file"], rank=3)
    c = extract_lora(case["base_file"], case["tuned_file"], rank=3)
    assert [(r.path, r.rank) for r in a.layers] == [(r.path, r.rank) for r in c.layers]
    for p, w in c.weights.items():
        np.testing.assert_allclose(a.weights[p].delta(), w.delta(), atol=1e-6, rtol=0)


def test_bad_inputs_are_one_line_exit_2(case, tmp_path, capsys):
    other_cfg = tiny_config(depth_single_blocks=2)
    other = _save(tmp_path / "other.safetensors", bfl_state(other_cfg, diffusers_flux(other_cfg)), other_cfg)
    out = tmp_path / "out.safetensors"
    base, tuned = str(case["base_file"]), str(case["tuned_file"])
    ok = ["--base", base, "--tuned", tuned]
    cases = [
        (["--base", base, "--tuned", str(other), "--rank", "4", "--format", "kohya"], "not the architecture"),
        ([*ok, "--rank", "4", "--format", "xlabs"], "unknown LoRA format 'xlabs'"),
        ([*ok, "--rank", "0", "--format", "kohya"], "--rank must be at least 1"),
        ([*ok, "--energy", "0", "--format", "kohya"], "--energy must be in (0, 1]"),
        ([*ok, "--energy", "1.5", "--format", "kohya"], "--energy must be in (0, 1]"),
        ([*ok, "--format", "kohya"], "give --rank R, --energy F, or both"),
        (["--base", base, "--tuned", base, "--rank", "4", "--format", "kohya"], "no LoRA to extract"),
        (["--base", base, "--tuned", str(tmp_path / "missing"), "--rank", "4", "--format", "kohya"], "no such file"),
    ]
    for argv, message in cases:
        code, _, err = _cli(["extract-lora", *argv, str(out)], capsys)
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)
        assert not out.exists()
    out.write_bytes(b"keep")
    code, _, err = _cli(["extract-lora", *ok, "--rank", "4", "--format", "kohya", str(out)], capsys)
    assert code == 2 and "already exists" in err and out.read_bytes() == b"keep"
