"""A LoRA file for the tiny run (configs/tiny.yaml): random weights for every module it adapts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flux_jax.lora_io.adapters import lora_weights_from_model
from flux_jax.lora_io.export import write_lora_file
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.model.config import preset
from flux_jax.run_config import load_config
from flux_jax.sharding import make_mesh
from flux_jax.train import build

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
FILE_ALPHA = 3.0  # the run's alpha is 8 (configs/tiny.yaml): the file's alpha / rank must be folded in


def config(out: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={out}", "log.tensorboard=false", *overrides])


def random_lora(seed: int = 0, std: float = 1.0) -> dict[str, LoraWeights]:
    """Random normal LoRA weights (non-zero up, alpha FILE_ALPHA) for every module the tiny run adapts."""
    cfg = config(Path("unused"))
    model, _ = build.build_model(cfg.model, cfg.lora, mesh=make_mesh(-1, 1, 1), rules=cfg.mesh.rules)
    rng = np.random.default_rng(seed)
    return {
        k: LoraWeights(rng.normal(0, std, w.down.shape), rng.normal(0, std, w.up.shape), FILE_ALPHA)
        for k, w in lora_weights_from_model(model).items()
    }


def lora_file(path: Path, weights: dict[str, LoraWeights], fmt: str = "kohya") -> Path:
    model_cfg = preset(config(Path("unused")).model.preset)
    return write_lora_file(path, weights, fmt, config=model_cfg, dtype="fp32")
