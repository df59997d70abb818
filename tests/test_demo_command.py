"""`flux-jax demo` finds its config and photos as package data, from any working directory."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flux_jax.commands.demo import DEMO_CONFIG, DEMO_PHOTOS, demo_config

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
