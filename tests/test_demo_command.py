"""`flux-jax demo` finds its config and photos as package data, from any working directory, and ends with
pictures: the tiny base sampled with and without the LoRA, side by side, and the loss curve."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flux_jax.commands.demo import (
    DEMO_CONFIG,
    DEMO_PHOTOS,
    SAMPLE_PROMPTS,
    SAMPLE_STEPS,
    demo_config,
    demo_pictures,
    demo_prompts,
    sample_pair,
)

ROOT = Path(__file__).resolve().parents[1]


def test_assets_are_package_data() -> None:
    assert Path(str(DEMO_CONFIG)).is_file()
    photos = sorted(p.name for p in Path(str(DEMO_PHOTOS)).iterdir())
    stems = sorted({name.rsplit(".", 1)[0] for name in photos})
    assert len(stems) == 8 and photos == sorted([f"{s}.jpg" for s in stems] + [f"{s}.txt" for s in stems])
    # The wheel carries them: pyproject's package-data globs cover every asset.
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["flux_jax"]
    package = Path(str(DEMO_CONFIG)).parents[1]
    assets = {p for p in (package / "assets").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert assets and assets <= {p for pattern in globs for p in package.glob(pattern)}


def test_empty_data_path_means_the_packaged_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing is found relative to the working directory
    with demo_config(None) as cfg:
        assert Path(cfg.data.path) == Path(str(DEMO_PHOTOS)) and Path(cfg.data.path).is_absolute()
        assert len(list(Path(cfg.data.path).glob("*.jpg"))) == 8


def test_data_path_from_an_override_or_another_config_wins(tmp_path: Path) -> None:
    with demo_config(None, ["data.path=my_photos", "train.steps=3"]) as cfg:
        assert cfg.data.path == "my_photos" and cfg.train.steps == 3
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  path: elsewhere\nmodel:\n  preset: tiny\n")
    with demo_config(str(mine)) as cfg:
        assert cfg.data.path == "elsewhere"
    synthetic = tmp_path / "synthetic.yaml"
    synthetic.write_text("data:\n  synthetic: true\n")
    with demo_config(synthetic) as cfg:
        assert cfg.data.path == "" and cfg.data.synthetic


# --------------------------------------------------------------------------------------------------
# Step 6: the pictures (the base with and without the trained LoRA, and the loss curve)


def _tiny_base(path: Path) -> Path:
    """A random tiny base as a BFL single file, drawn with numpy (building the model would take longer): weights
    ~ N(0, 1/fan_in) so activations stay O(1), biases zero, norm scales one."""
    from flux_jax.model.config import CONFIG_METADATA_KEY, PRESETS, config_metadata
    from flux_jax.weights import flux_keys
    from flux_jax.weights.safetensors_file import save_file

    cfg, rng = PRESETS["tiny"], np.random.default_rng(0)
    tensors = {}
    for key, shape in flux_keys.bfl_shapes(cfg).items():
        leaf = key.rsplit(".", 1)[-1]
        value = rng.standard_normal(shape) / np.sqrt(shape[-1]) if leaf == "weight" else np.full(shape, leaf == "scale")
        tensors[key] = value.astype(np.float32)
    save_file(path, tensors, {CONFIG_METADATA_KEY: config_metadata(cfg)})
    return path


@pytest.fixture(scope="module")
def pictures_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A tiny base, a kohya LoRA with large random weights on a few modules, and the demo config at 64 px with its
    cache (where the generated demo encoders go) in a temporary folder."""
    from flux_jax.lora_io.export import write_lora_file
    from flux_jax.model.config import PRESETS
    from tests.helpers import lora_modules

    root = tmp_path_factory.mktemp("demo_pictures")
    lora = write_lora_file(root / "lora.safetensors", lora_modules.lora(alpha=4.0), "kohya", config=PRESETS["tiny"],
                           dtype="fp32")  # fmt: skip
    overrides = [f"data.cache_dir={root / 'cache'}", f"output_dir={root / 'run'}", "data.resolution=64"]
    with demo_config(None, overrides) as cfg:
        yield {"root": root, "base": _tiny_base(root / "base.safetensors"), "lora": lora, "cfg": cfg}


def test_demo_prompts_are_the_first_training_captions(tmp_path: Path) -> None:
    with demo_config(None) as cfg:
        prompts = demo_prompts(cfg)
    captions = [p.read_text().strip() for p in sorted(Path(str(DEMO_PHOTOS)).glob("*.txt"))]
    assert prompts == captions[:SAMPLE_PROMPTS] and len(prompts) == 4
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "b.txt").write_text("second\n")
    (mine / "a.txt").write_text("first")
    with demo_config(None, [f"data.path={mine}"]) as cfg:
        assert demo_prompts(cfg) == ["first", "second"]
    with demo_config(None, [f"data.path={tmp_path / 'nothing here'}"]) as cfg:
        assert demo_prompts(cfg) == captions[:SAMPLE_PROMPTS]  # no captions there: the packaged ones


def test_sample_pair_samples_the_base_and_the_base_with_the_lora(pictures_setup: dict) -> None:
    cfg = pictures_setup["cfg"]
    settings, plain, adapted = sample_pair(cfg, base=pictures_setup["base"], lora=pictures_setup["lora"],
                                           prompts=demo_prompts(cfg))  # fmt: skip
    assert (settings.width, settings.height, settings.steps, settings.seed) == (64, 64, SAMPLE_STEPS, cfg.train.seed)
    assert settings.guidance == cfg.train.guidance == 1.0
    assert plain.shape == adapted.shape == (4, 64, 64, 3) and plain.dtype == adapted.dtype == np.uint8
    assert all(not np.array_equal(p, a) for p, a in zip(plain, adapted, strict=True))  # the LoRA changes each


def test_demo_pictures_write_both_pngs_and_a_rerun_keeps_them(
    pictures_setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    from flux_jax.commands import demo
    from flux_jax.lora_io.export import write_lora_file
    from flux_jax.model.config import PRESETS
    from flux_jax.sampling.images import read_png_text, side_by_side
    from flux_jax.sampling.sampler import SampleSettings
    from tests.helpers import lora_modules

    cfg, base, lora = pictures_setup["cfg"], pictures_setup["base"], pictures_setup["lora"]
    run = tmp_path / "run"
    run.mkdir()
    losses = [2.5, 2.25, 2.0, 1.9]
    records = "".join(f'{{"step": {i + 1}, "loss": {v}}}\n' for i, v in enumerate(losses))
    (run / "metrics.jsonl").write_text(records + '{"step": 5, "lo')  # and a line cut short by a kill
    rng = np.random.default_rng(0)
    plain, adapted = (rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    calls = []

    def fake_pair(cfg, *, base, lora, prompts):
        calls.append(list(prompts))
        return SampleSettings(width=32, height=32, steps=SAMPLE_STEPS), plain, adapted

    monkeypatch.setattr(demo, "sample_pair", fake_pair)
    prompts = ["a cat", "a dog"]
    pictures, curve = demo_pictures(cfg, base=base, lora=lora, run_dir=run, out=tmp_path, prompts=prompts)
    assert (pictures, curve) == (tmp_path / "demo_samples.png", tmp_path / "demo_loss.png") and calls == [prompts]
    expected = side_by_side([[plain[0], adapted[0]], [plain[1], adapted[1]]], ("base", "base + LoRA"))
    np.testing.assert_array_equal(np.asarray(Image.open(pictures).convert("RGB")), expected)
    text = read_png_text(pictures)
    assert text["prompts"] == "a cat\na dog" and text["lora"] == str(lora)
    assert np.asarray(Image.open(curve)).shape == (360, 640, 3)

    # A re-run with the same LoRA tensors and settings keeps the pictures; other LoRA tensors redraw them.
    assert demo_pictures(cfg, base=base, lora=lora, run_dir=run, out=tmp_path, prompts=prompts) == (pictures, curve)
    assert len(calls) == 1 and "there already" in capsys.readouterr().out
    other = write_lora_file(tmp_path / "other.safetensors", lora_modules.lora(alpha=4.0, seed=1), "kohya",
                            config=PRESETS["tiny"], dtype="fp32")  # fmt: skip
    demo_pictures(cfg, base=base, lora=other, run_dir=run, out=tmp_path, prompts=prompts)
    assert len(calls) == 2
    # A run that logged no loss: no curve, the pictures all the same.
    unlogged = tmp_path / "no_metrics"
    assert demo_pictures(cfg, base=base, lora=other, run_dir=unlogged, out=tmp_path, prompts=prompts)[1] is None
