"""The package's import layering is enforced by import-linter (contracts in pyproject.toml), not by a comment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the flux_jax package found in `root`, with `root`'s pyproject.toml contracts."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def test_the_layer_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """A copy of the package with one function-level import from model/ up into train/ fails the check."""
    shutil.copytree(ROOT / "flux_jax", tmp_path / "flux_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    config = tmp_path / "flux_jax" / "model" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _upward():\n    from flux_jax.train import loop  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "flux_jax.model.config -> flux_jax.train.loop" in result.stdout


def test_lora_io_never_imports_train(tmp_path):
    shutil.copytree(ROOT / "flux_jax", tmp_path / "flux_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    export = tmp_path / "flux_jax" / "lora_io" / "export.py"
    export.write_text(
        export.read_text() + "\n\ndef _run():\n    from flux_jax.train import checkpointing  # noqa: F401\n"
    )
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "LoRA file formats never import the trainer BROKEN" in " ".join(result.stdout.split())


def test_light_modules_do_not_start_jax():
    """The TPU launcher and config parsing run on machines (a laptop driving gcloud) where JAX need not load."""
    code = "import sys, flux_jax.tpu_launch, flux_jax.run_config; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
