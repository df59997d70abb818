"""Nothing a user should not see on a normal run: TFDS's "Downloading and preparing dataset" lines when the
cache's (or a folder's) TFDS dataset is written, and transformers' "PyTorch was not found" when the tokenizers
load without PyTorch installed (the normal install: torch is a test extra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TFDS_NOISE = ("Downloading and preparing dataset", "downloaded and prepared to", "Subsequent calls will reuse")
TORCH_NOISE = "PyTorch was not found"


def test_writing_the_cache_dataset_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import ml_dtypes

    from flux_jax.data.tfds_builders import write_latent_cache

    shapes = {"latent_dim": 4, "t5_length": 2, "t5_dim": 3, "clip_dim": 5}

    def examples():
        for i in range(3):
            yield {
                "latents": np.full((6, 4), i, ml_dtypes.bfloat16),
                "t5": np.full((2, 3), i, ml_dtypes.bfloat16),
                "clip": np.full((5,), i, np.float32),
                "height": 2,
                "width": 3,
                "bucket": 0,
                "group": i,
                "repeats": 1,
                "flipped": False,
                "caption": f"caption {i}",
                "source": f"{i}.jpg",
            }

    capfd.readouterr()
    written = write_latent_cache(tmp_path / "tfds", shapes, examples)
    out, err = capfd.readouterr()
    for noise in TFDS_NOISE:
        assert noise not in out and noise not in err, out + err
    # What was written is all there (the silenced lines were TFDS's only report of it).
    from flux_jax.data.tfds_builders import CacheShard

    dataset, shards = written
    assert [n for _, n in shards] == [3]
    with CacheShard(dataset / shards[0][0], shapes) as shard:
        assert len(shard) == 3 and shard.read(2)["source"] == b"2.jpg"


def test_packaging_a_folder_as_tfds_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from flux_jax.data.tfds_builders import build_folder_dataset

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "photos" / "red.png")
    capfd.readouterr()
    dataset = build_folder_dataset(tmp_path / "photos", tmp_path / "data")
    out, err = capfd.readouterr()
    for noise in TFDS_NOISE:
        assert noise not in out and noise not in err, out + err
    assert (dataset / "dataset_info.json").is_file()


# Runs with PyTorch hidden (as in an install without the test extra): find_spec("torch") is None.
_NO_TORCH = "import sys; sys.modules['torch'] = None\n"
_LOAD_TOKENIZERS = """
from flux_jax.encoders.tokenizers import build_tiny_tokenizers, load_clip_tokenizer, load_t5_tokenizer, tokenize_t5
clip_dir, t5_dir = build_tiny_tokenizers(sys.argv[1])
ids = tokenize_t5(load_t5_tokenizer(t5_dir), ["a photo of a cat"], 8).input_ids
load_clip_tokenizer(clip_dir)
from transformers.utils import is_torch_available
print("TOKENS", ids.shape, "TORCH", is_torch_available())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_tokenizers_without_pytorch_print_no_pytorch_warning(tmp_path: Path) -> None:
    # The control: importing transformers itself without PyTorch does print the warning in this environment, so
    # its absence below is the filter's doing.
    bare = _run(_NO_TORCH + "import transformers")
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert TORCH_NOISE in bare.stderr
    run = _run(_NO_TORCH + _LOAD_TOKENIZERS, str(tmp_path / "tok"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TOKENS (1, 8) TORCH False" in run.stdout
    assert TORCH_NOISE not in run.stderr and TORCH_NOISE not in run.stdout, run.stderr
