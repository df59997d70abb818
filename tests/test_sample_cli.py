"""`flux-jax sample` on a tiny FLUX.1 pipeline directory built locally (tests/helpers/tiny_pipeline.py).

The real sampler runs end to end (tiny sizes, fp32 on CPU): PNGs carrying their settings, the grid and the
sidecar; a transformer file plus --encoders; LoRAs at a scale (several at once); the same seed twice. Bad input
exits 2 with one line before any weight is loaded (the loaders are replaced by ones that fail the test). The
batch and seed bookkeeping and the all-or-nothing output are checked with a stand-in sampler, which is instant.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flux_jax import __version__, cli
from flux_jax.commands import sample
from flux_jax.commands.sample import LoraSpec, batches, parse_lora_spec, read_prompts
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.export import write_lora_file
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.model.config import FluxConfig
from flux_jax.sampling.images import read_png_text
from flux_jax.weights import flux_keys
from tests.helpers.compile_cache import persistent_compile_cache
from tests.helpers.tiny_pipeline import TINY, build_tiny_pipeline, write_tiny_transformer_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = ["--width", "32", "--height", "48", "--steps", "2", "--dtype", "fp32", "--no-progress"]


# A few Linears of each kind of block (fewer adapters compile faster; these already change the image a lot).
LORA_MODULES = ("img_in", "img_attn.qkv", "txt_mlp.2", "linear2", "final_layer.linear")


def random_lora(cfg: FluxConfig, rank: int = 2, seed: int = 0) -> dict[str, LoraWeights]:
    """A LoRA on the LORA_MODULES Linears of every block of ``cfg``, large enough to change a tiny model's image."""
    rng = np.random.default_rng(seed)
    out = {}
    for entry in flux_keys.entries(cfg):
        if entry.kind != "linear" or not entry.bfl.endswith(LORA_MODULES):
            continue
        rows, cols = flux_keys.module_shapes(cfg, entry)["weight"]
        for i in flux_keys.layer_indices(cfg, entry):
            down = rng.standard_normal((rank, cols)) / np.sqrt(cols)
            out[flux_keys.fill(entry.bfl, i)] = LoraWeights(down, rng.standard_normal((rows, rank)), float(rank))
    return out


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """Every run builds a new sampler for the same shapes: compile each program once for the module."""
    with persistent_compile_cache(tmp_path_factory.getbasetemp() / "sample-xla-cache"):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("sample")
    pipeline = build_tiny_pipeline(root / "FLUX.1-tiny")
    encoders = root / "encoders-only"  # a pipeline directory without transformer/
    shutil.copytree(pipeline, encoders, ignore=lambda d, names: ["transformer"] if pathlib.Path(d) == pipeline else [])
    rank2 = random_lora(TINY, rank=2)
    # The rank-2 LoRA as two rank-1 LoRAs (alpha 1 each: the same alpha / rank), whose sum it is.
    first = {k: LoraWeights(w.down[:1], w.up[:, :1], 1.0) for k, w in rank2.items()}
    second = {k: LoraWeights(w.down[1:], w.up[:, 1:], 1.0) for k, w in rank2.items()}
    deeper = dataclasses.replace(TINY, depth=4)  # another model: two more double blocks

    def lora_file(name: str, weights: dict[str, LoraWeights], cfg: FluxConfig = TINY) -> pathlib.Path:
        return write_lora_file(root / name, weights, "comfy", config=cfg, dtype="fp32")

    return {
        "pipeline": pipeline,
        "encoders": encoders,
        "transformer": write_tiny_transformer_file(root / "flux-tiny.safetensors"),  # the pipeline's weights
        "lora": lora_file("lora.safetensors", rank2),
        "lora_first": lora_file("first.safetensors", first),
        "lora_second": lora_file("second.safetensors", second),
        "other_lora": lora_file("deeper.safetensors", random_lora(deeper), deeper),
    }


def pixels(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def sample_ok(capsys, *argv: str) -> str:
    code = cli.main(["sample", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


# ---------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("lora.safetensors", LoraSpec("lora.safetensors", 1.0)),
        ("lora.safetensors:0.5", LoraSpec("lora.safetensors", 0.5)),
        ("runs/a:-1.5", LoraSpec("runs/a", -1.5)),
        ("runs/a:1e-1", LoraSpec("runs/a", 0.1)),
        ("runs/a:0", LoraSpec("runs/a", 0.0)),
        ("gs://bucket/run", LoraSpec("gs://bucket/run", 1.0)),
        ("gs://bucket/run:0.8", LoraSpec("gs://bucket/run", 0.8)),
        ("odd:name:here", LoraSpec("odd:name:here", 1.0)),  # no number after the last ':': all of it is the path
        ("odd:2:name", LoraSpec("odd:2:name", 1.0)),
        ("trailing:", LoraSpec("trailing:", 1.0)),
        (":0.5", LoraSpec(":0.5", 1.0)),
    ],
)
def test_lora_spec(spec, expected):
    assert parse_lora_spec(spec) == expected


@pytest.mark.parametrize("spec", ["a.safetensors:inf", "a.safetensors:nan"])
def test_lora_spec_with_a_non_finite_scale(spec):
    with pytest.raises(FluxJaxError, match=f"--lora {spec}: the scale .* is not a finite number"):
        parse_lora_spec(spec)


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n   \n  a dog on a sofa  \r\n猫\n", encoding="utf-8")
    assert read_prompts(None, str(path)) == ["a cat", "a dog on a sofa", "猫"]
    assert read_prompts(["x", ""], None) == ["x", ""]  # --prompt values as given, the empty prompt included
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(FluxJaxError, match=r"--prompts .*empty\.txt: the file holds no prompt"):
        read_prompts(None, str(tmp_path / "empty.txt"))
    with pytest.raises(FluxJaxError, match=r"--prompts .*missing\.txt: no such file"):
        read_prompts(None, str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(FluxJaxError, match=r"latin1\.txt: not UTF-8 text"):
        read_prompts(None, str(tmp_path / "latin1.txt"))


def test_batches_and_matches():
    assert batches(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert batches(["a"], 4) == [["a"]]
    from flux_jax.sampling.schedules import MATCHES

    assert sample.MATCHES == MATCHES  # the parser's copy of the choices


def test_registered_in_the_cli():
    assert sample in cli.COMMANDS
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--help"])
    assert e.value.code == 0


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any weights (or building a sampler) fails the test: bad input must be caught before."""
    from flux_jax.sampling import loading, prompts, sampler

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(loading, "load_transformer", loaded)
    monkeypatch.setattr(loading, "load_vae_for", loaded)
    monkeypatch.setattr(prompts.PromptEncoder, "load", classmethod(loaded))
    monkeypatch.setattr(sampler.FluxSampler, "from_model", classmethod(loaded))


def bad_cases(files: dict[str, pathlib.Path], tmp: pathlib.Path) -> dict[str, tuple[list[str], str]]:
    pipe, prompt = str(files["pipeline"]), ["--prompt", "a cat"]
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "neither").mkdir()
    (tmp / "neither" / "notes.txt").write_text("not a checkpoint")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.png").write_bytes(b"x")
    return {
        "missing base": (["--base", str(tmp / "nowhere"), *prompt], "nowhere"),
        "neither pipeline nor checkpoint": (
            ["--base", str(tmp / "neither"), *prompt],
            "neither: neither a FLUX.1 pipeline directory (no transformer/) nor a transformer checkpoint (not a "
            "checkpoint directory",
        ),
        "not a checkpoint, with encoders": (
            ["--base", str(tmp / "neither"), "--encoders", str(files["encoders"]), *prompt],
            "neither: neither a FLUX.1 pipeline directory (no transformer/) nor a transformer checkpoint (not a "
            "checkpoint directory",
        ),
        "encoders not a pipeline": (
            ["--base", str(files["transformer"]), "--encoders", str(tmp / "neither"), *prompt],
            "neither: not a FLUX.1 pipeline directory: no vae/",
        ),
        "transformer without encoders": (["--base", str(files["transformer"]), *prompt], "encoders"),
        "LoRA for another model": (
            ["--base", pipe, "--lora", f"{files['other_lora']}:0.5", *prompt],
            "deeper.safetensors: LoRA does not fit the model: double_blocks.2",
        ),
        "missing LoRA": (["--base", pipe, "--lora", str(tmp / "nope.safetensors"), *prompt], "nope.safetensors"),
        "width": (["--base", pipe, *prompt, "--width", "40"], "--width 40 must be a positive multiple of 16"),
        "height": (["--base", pipe, *prompt, "--height", "0"], "--height 0 must be a positive multiple of 16"),
        "empty prompt file": (["--base", pipe, "--prompts", str(tmp / "empty.txt")], "empty.txt: the file holds no"),
        "steps": (["--base", pipe, *prompt, "--steps", "0"], "--steps 0 must be at least 1"),
        "cfg": (["--base", pipe, *prompt, "--cfg", "0"], "--cfg 0.0 must be a positive number"),
        "negative cfg": (["--base", pipe, *prompt, "--cfg", "-2"], "--cfg -2.0 must be a positive number"),
        "batch": (["--base", pipe, *prompt, "--batch", "0"], "--batch 0 must be at least 1"),
        "seed": (["--base", pipe, *prompt, "--seed", "-1"], "--seed -1 must be in [0, 2**64 - 1]"),
        "last seed": (
            ["--base", pipe, *prompt, "--prompt", "b", "--seed", str(2**64 - 1)],
            f"--seed {2**64 - 1}: the last batch's seed {2**64} would pass 2**64 - 1",
        ),
        "non-empty out": (["--base", pipe, *prompt, "--out", str(tmp / "full")], "exists and is not empty"),
    }


CASES = [
    "missing base",
    "neither pipeline nor checkpoint",
    "not a checkpoint, with encoders",
    "encoders not a pipeline",
    "transformer without encoders",
    "LoRA for another model",
    "missing LoRA",
    "width",
    "height",
    "empty prompt file",
    "steps",
    "cfg",
    "negative cfg",
    "batch",
    "seed",
    "last seed",
    "non-empty out",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2_before_loading(case, files, tmp_path, capsys, no_loading):
    argv, expected = bad_cases(files, tmp_path)[case]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    assert cli.main(["sample", *SIZE, *argv]) == 2  # the case's own --width etc. come last and win
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("flux-jax sample: error: ") and expected in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no temporary left
    if case == "non-empty out":
        assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.png"]


def test_bad_input_in_a_child_process(files, tmp_path):
    """The installed entry point's path: exit code 2 and one line on stderr, no traceback."""
    argv = [sys.executable, "-m", "flux_jax.cli", "sample", "--base", str(files["pipeline"]), "--prompt", "a cat",
            "--width", "50", "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "flux-jax sample: error: --width 50 must be a positive multiple of 16"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- the real sampler


# Every real run samples one image per batch at 32 x 48 px, so all but the LoRA runs share one compiled loop
# (through the persistent compile cache) and the LoRA runs another (the combined LoRA always has rank 2 here).
PROMPT = "a ginger tabby cat"


@pytest.fixture(scope="module")
def happy(files, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("happy") / "samples"
    argv = ["sample", "--base", str(files["pipeline"]), "--prompt", PROMPT, "--prompt", "猫 on a road", "--seed", "7",
            "--guidance", "4", "--out", str(out), *SIZE]  # fmt: skip
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def plain(happy) -> np.ndarray:
    """The reference image: PROMPT, seed 7, guidance 4, no LoRA."""
    return pixels(happy / "000_seed7.png")


def test_pngs_carry_their_settings_with_a_grid_and_a_sidecar(happy, files):
    names = ["000_seed7.png", "001_seed8.png"]  # batches of one: seed 7, then 8
    assert sorted(p.name for p in happy.iterdir()) == sorted([*names, "grid.png", "samples.json"])
    assert [p.name for p in happy.parent.iterdir()] == ["samples"]  # no temporary beside it
    images = []
    for name, prompt, seed in zip(names, [PROMPT, "猫 on a road"], [7, 8], strict=True):
        image = pixels(happy / name)
        assert image.shape == (48, 32, 3)
        images.append(image)
        assert read_png_text(happy / name) == {
            "prompt": prompt,
            "negative": "",
            "seed": str(seed),
            "batch_size": "1",
            "batch_index": "0",
            "steps": "2",
            "guidance": "4.0",
            "cfg": "1.0",
            "width": "32",
            "height": "48",
            "match": "diffusers",
            "base": str(files["pipeline"]),
            "encoders": "",
            "loras": "[]",
            "dtype": "fp32",
            "base_dtype": "fp32",
            "schnell": "false",
            "Software": f"flux-jax {__version__}",
        }
    assert np.abs(images[0].astype(int) - images[1]).mean() > 2  # another prompt and seed: another image
    grid = pixels(happy / "grid.png")
    assert grid.shape == (48, 2 * 32 + 2, 3)  # 2 images: 2 columns, 2 px between
    np.testing.assert_array_equal(grid[:, :32], images[0])
    np.testing.assert_array_equal(grid[:, 34:], images[1])
    sidecar = json.loads((happy / "samples.json").read_text(encoding="utf-8"))
    assert sidecar["grid"] == "grid.png" and sidecar["version"] == f"flux-jax {__version__}"
    assert [e["file"] for e in sidecar["images"]] == names
    for entry, name in zip(sidecar["images"], names, strict=True):
        text = read_png_text(happy / name)
        assert {k: v for k, v in entry.items() if k != "file"} == {
            **{k: v for k, v in text.items() if k != "Software"},
            "seed": int(text["seed"]), "batch_size": 1, "batch_index": 0, "steps": 2, "guidance": 4.0, "cfg": 1.0,
            "width": 32, "height": 48, "encoders": None, "loras": [], "schnell": False,
        }  # fmt: skip


def one_image(capsys, files, out: pathlib.Path, *extra: str, base: list[str] | None = None) -> np.ndarray:
    """Sample PROMPT at seed 7 (guidance 4) into ``out``: the pixels of its one image."""
    base = base or ["--base", str(files["pipeline"])]
    argv = [*base, "--prompt", PROMPT, "--seed", "7", "--guidance", "4", "--out", str(out), *SIZE, *extra]
    sample_ok(capsys, *argv)
    return pixels(out / "000_seed7.png")


def test_same_seed_gives_the_same_pixels_and_force_replaces_out(plain, files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    np.testing.assert_array_equal(one_image(capsys, files, out, "--force"), plain)
    assert sorted(p.name for p in out.iterdir()) == ["000_seed7.png", "grid.png", "samples.json"]


def test_transformer_file_with_encoders_samples_the_same_base(plain, files, tmp_path, capsys):
    base = ["--base", str(files["transformer"]), "--encoders", str(files["encoders"])]
    image = one_image(capsys, files, tmp_path / "split", base=base)
    np.testing.assert_array_equal(image, plain)  # the same weights in another layout and directory
    text = read_png_text(tmp_path / "split" / "000_seed7.png")
    assert text["base"] == str(files["transformer"]) and text["encoders"] == str(files["encoders"])


def test_lora_at_a_scale_and_several_at_once(plain, files, tmp_path, capsys):
    lora = str(files["lora"])
    half = one_image(capsys, files, tmp_path / "half", "--lora", f"{lora}:0.5")
    assert np.abs(half.astype(int) - plain).mean() > 2  # the LoRA changes the picture
    assert json.loads(read_png_text(tmp_path / "half" / "000_seed7.png")["loras"]) == [{"path": lora, "scale": 0.5}]
    np.testing.assert_array_equal(one_image(capsys, files, tmp_path / "zero", "--lora", f"{lora}:0"), plain)
    # Two LoRAs at once add their deltas: the rank-2 LoRA's two rank-1 halves, each at 0.5, are that LoRA at 0.5.
    halves = ["--lora", f"{files['lora_first']}:0.5", "--lora", f"{files['lora_second']}:0.5"]
    np.testing.assert_array_equal(one_image(capsys, files, tmp_path / "halves", *halves), half)


# ---------------------------------------------------------------------------------------------------- stand-in sampler


@dataclasses.dataclass
class FakeText:
    prompts: list[str]

    @property
    def batch(self) -> int:
        return len(self.prompts)


class FakeSampler:
    """Images that encode (seed, prompt, row) so the test can read back what was sampled with what."""

    calls: list[tuple[list[str], int, str | None]] = []
    fail_at: int | None = None

    def images(self, prompts, settings, *, negative=None, noise=None, extra=()):
        FakeSampler.calls.append((prompts.prompts, settings.seed, None if negative is None else negative.prompts[0]))
        if FakeSampler.fail_at is not None and len(FakeSampler.calls) > FakeSampler.fail_at:
            raise RuntimeError("the accelerator fell over")
        out = np.zeros((prompts.batch, settings.height, settings.width, 3), np.uint8)
        for j in range(prompts.batch):
            out[j, ..., 0], out[j, ..., 1], out[j, ..., 2] = settings.seed % 256, len(prompts.prompts[j]), j
        return out


@pytest.fixture
def fake_sampler(monkeypatch):
    from flux_jax.sampling import loading, prompts, sampler

    class Encoder:
        def encode(self, texts, *, match="diffusers", schnell=False):
            return FakeText(list(texts))

        def encode_with_negative(self, texts, negative, *, match="diffusers", schnell=False):
            return FakeText(list(texts)), None if negative is None else FakeText([negative])

    monkeypatch.setattr(loading, "load_transformer", lambda *a, **k: object())
    monkeypatch.setattr(loading, "load_vae_for", lambda *a, **k: object())
    monkeypatch.setattr(prompts.PromptEncoder, "load", classmethod(lambda cls, *a, **k: Encoder()))
    monkeypatch.setattr(sampler.FluxSampler, "from_model", classmethod(lambda cls, *a, **k: FakeSampler()))
    FakeSampler.calls, FakeSampler.fail_at = [], None
    return FakeSampler


def test_batches_use_seed_plus_k_and_the_negative_with_cfg(fake_sampler, files, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("one\ntwo\n\nthree\nfour\nfive\n")
    out = tmp_path / "out"
    sample_ok(capsys, "--base", str(files["pipeline"]), "--prompts", str(tmp_path / "prompts.txt"), "--batch", "2",
              "--seed", "100", "--cfg", "3.5", "--guidance", "1", "--negative", "blurry", "--out", str(out),
              *SIZE)  # fmt: skip
    assert fake_sampler.calls == [(["one", "two"], 100, "blurry"), (["three", "four"], 101, "blurry"),
                                  (["five"], 102, "blurry")]  # fmt: skip
    names = ["000_seed100.png", "001_seed100.png", "002_seed101.png", "003_seed101.png", "004_seed102.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "grid.png", "samples.json"])
    for name, prompt, row in zip(names, ["one", "two", "three", "four", "five"], [0, 1, 0, 1, 0], strict=True):
        image = pixels(out / name)
        assert (image[0, 0] == [int(name[8:11]) % 256, len(prompt), row]).all()  # its seed, prompt and row
        text = read_png_text(out / name)
        assert (text["prompt"], text["negative"], text["cfg"], text["guidance"]) == (prompt, "blurry", "3.5", "1.0")
    assert pixels(out / "grid.png").shape == (2 * 48 + 2, 3 * 32 + 2 * 2, 3)  # 5 images: 3 columns


def test_no_negative_branch_without_cfg(fake_sampler, files, tmp_path, capsys, caplog):
    sample_ok(capsys, "--base", str(files["pipeline"]), "--prompt", "a", "--negative", "ignored", "--out",
              str(tmp_path / "out"), *SIZE)  # fmt: skip
    assert fake_sampler.calls == [(["a"], 0, None)]
    assert "--negative is used only with true CFG" in caplog.text
    sample_ok(capsys, "--base", str(files["pipeline"]), "--prompt", "a", "--cfg", "2", "--out",
              str(tmp_path / "cfg"), *SIZE)  # fmt: skip
    assert fake_sampler.calls[-1] == (["a"], 0, "")  # true CFG against the empty prompt by default


def test_a_failed_run_leaves_no_output(fake_sampler, files, tmp_path):
    fake_sampler.fail_at = 1  # the second batch fails, after the first batch's PNGs were written
    out = tmp_path / "out"
    argv = ["sample", "--base", str(files["pipeline"]), "--prompt", "a", "--prompt", "b", "--out", str(out), *SIZE]
    with pytest.raises(RuntimeError, match="fell over"):  # a bug, not bad input: it keeps its traceback
        cli.main(argv)
    assert len(fake_sampler.calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary
    out.mkdir()  # an existing empty --out is used (and left as it was by a failure)
    with pytest.raises(RuntimeError, match="fell over"):
        cli.main(argv)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list(out.iterdir()) == []


def test_progress_bar_counts_images(fake_sampler, files, tmp_path, capsys):
    argv = ["sample", "--base", str(files["pipeline"]), "--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch",
            "2", "--out", str(tmp_path / "out"), *[a for a in SIZE if a != "--no-progress"]]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "sampling" in err and "3/3" in err and "image" in err
